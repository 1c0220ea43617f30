"""The typed application builder: `serve run serve.app:app preset=tiny`.

    serve run serve.app:app preset=tiny                       # laptop, random weights
    serve run serve.app:app preset=huge checkpoint=s3://b/imagebind_huge.pth device=cuda ...
    serve run configs/serve.yaml                              # the same, from a config file

One `encoder-{modality}` deployment per model input the served kinds need (video shares
`encoder-vision`), an `ingress` deployment in front, and a `search` deployment when `index_uri`
is set (with `search_groups` > 1: a `search` fan-out over `search-group-<g>` deployments).
"""

# No `from __future__ import annotations` here: Serve inspects the builder's annotation and
# must see the AppArgs class itself (not a string) to validate the arguments into it.

import logging
import os
from typing import Any

from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from serve.encoder import EncoderDeployment
from serve.ingress import Ingress
from serve.options import AppArgs, EncoderOptions

log = logging.getLogger(__name__)

# Serve runs replica user code on an event loop in a second thread, and the handle router on a
# third, by default. Our replicas never block their loop (models and decoders run on worker
# threads), so both go back onto the replica's main loop: one thread hop less each way and less
# GIL traffic next to the model thread (measured by benchmarks/bench_serve.py: docs/serve.md).
REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def _actor_options(num_cpus: float, num_gpus: float = 0.0, memory: int | None = None) -> dict:
    actor: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "runtime_env": {"env_vars": dict(REPLICA_ENV)},
    }
    if memory:
        actor["memory"] = memory
    return actor


def _autoscaling(
    min_replicas: int, max_replicas: int, target: float, **delays: Any
) -> AutoscalingConfig:
    # initial_replicas >= 1: a deployment allowed to scale to zero still starts with one
    # replica (the app comes up ready and its weights are checked once), then stops it after
    # downscale_to_zero_delay_s of idling.
    return AutoscalingConfig(
        min_replicas=min_replicas,
        initial_replicas=max(1, min_replicas),
        max_replicas=max_replicas,
        target_ongoing_requests=target,
        **delays,
    )


def _encoder_autoscaling(opts: EncoderOptions) -> AutoscalingConfig:
    return _autoscaling(
        opts.min_replicas,
        opts.max_replicas,
        opts.target(),
        upscale_delay_s=opts.upscale_delay_s,
        downscale_delay_s=opts.downscale_delay_s,
        downscale_to_zero_delay_s=opts.downscale_to_zero_delay_s,
        look_back_period_s=opts.look_back_period_s,
        **({"metrics_interval_s": opts.metrics_interval_s} if opts.metrics_interval_s else {}),
    )


def _dtype(args: AppArgs, opts: EncoderOptions) -> str | None:
    """`dtype: auto` resolved where the app is built, so every replica of a deployment (and the
    lineage it reports) has the same concrete dtype."""
    if args.dtype != "auto":
        return args.dtype
    from imagebind_core.checkpoint import auto_dtype  # torch: only when asked for

    return auto_dtype("cuda" if opts.num_gpus > 0 and args.device != "cpu" else "cpu")


def encoder_app(modality: str, args: AppArgs, opts: EncoderOptions) -> Application:
    """The bound `encoder-{modality}` deployment."""
    return EncoderDeployment.options(
        name=f"encoder-{modality}",
        ray_actor_options=_actor_options(opts.num_cpus, opts.num_gpus, opts.memory_bytes),
        autoscaling_config=_encoder_autoscaling(opts),
        max_ongoing_requests=opts.max_ongoing_requests,
        max_queued_requests=opts.max_queued_requests,
        health_check_period_s=opts.health_check_period_s,
        user_config={
            "max_batch_size": opts.max_batch_size,
            "batch_wait_timeout_s": opts.batch_wait_timeout_s,
        },
    ).bind(
        modality,
        preset=args.preset,
        checkpoint=args.checkpoint,
        sha256=args.sha256,
        dtype=_dtype(args, opts),
        device=args.device,
        seed=args.seed,
        storage_options=args.storage_options() if args.checkpoint else None,
        torch_threads=opts.torch_threads,
    )


def build_app(args: AppArgs) -> Application:
    """The whole application for `args` (also what tests call)."""
    encoders = {m: encoder_app(m, args, args.encoder_options(m)) for m in args.model_modalities()}
    search = None
    if args.index_uri:
        # Imported only here: the search deployment (and faiss) is optional.
        from serve.search import SearchIndex

        actor = _actor_options(args.ingress.num_cpus)
        storage_options = args.storage_options()
        n = args.search_groups
        cache = args.search_vectors_cache

        def group_cache(g: int) -> str | None:
            return os.path.join(cache, f"group-{g}") if cache else None

        if n == 1:
            search = SearchIndex.options(name="search", ray_actor_options=actor).bind(
                args.index_uri, storage_options=storage_options, vectors_cache=group_cache(0)
            )
        else:
            from serve.search import SearchFanout

            groups = [
                SearchIndex.options(name=f"search-group-{g}", ray_actor_options=actor).bind(
                    args.index_uri,
                    storage_options=storage_options,
                    group=g,
                    groups=n,
                    vectors_cache=group_cache(g),
                )
                for g in range(n)
            ]
            search = SearchFanout.options(name="search", ray_actor_options=actor).bind(groups)
    ing = args.ingress
    return Ingress.options(
        name="ingress",
        ray_actor_options=_actor_options(ing.num_cpus),
        autoscaling_config=_autoscaling(
            ing.min_replicas, ing.max_replicas, ing.target_ongoing_requests
        ),
        max_ongoing_requests=ing.max_ongoing_requests,
        max_queued_requests=ing.max_queued_requests,
        # Overload at the proxy: 503 with Retry-After instead of an unbounded queue.
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s),
    ).bind(args.model_dump(), encoders, search)


def app(args: AppArgs) -> Application:
    """Typed application builder for `serve run serve.app:app key=value ...` and config files."""
    log.info(
        "building imagebind app: preset=%s modalities=%s", args.preset, ",".join(args.modalities)
    )
    return build_app(args)
