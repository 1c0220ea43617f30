"""Encoder deployments: one per model modality, each holding only that modality's weights.

The ingress sends already preprocessed, collated arrays (decoding never runs here, so a model
replica never waits on a decoder); still images come as compact uint8 pixels, expanded here on
the model's device (`imagebind_core.expand`). `serve.batching.ContinuousBatcher` merges the
arrays of concurrent requests into one model call, taking a batch whenever the model is free
(why not `@serve.batch`: see that module); the batch limits come from the deployment's
`user_config` via `reconfigure`, so they can change without restarting a replica.

`EncoderCore` is the logic, usable without Ray (tests inject a model); `EncoderDeployment` is
the thin Serve deployment holding one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve
from ray.serve import metrics

from serve.batching import ContinuousBatcher

log = logging.getLogger(__name__)

# Histogram buckets: batch sizes and seconds (queue waits are ms-scale, compute up to seconds).
_BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
TIME_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


@dataclass
class EncodeCall:
    """One call from the ingress: a chunk of one request's inputs, collated.

    Args:
        x: (k, ...) model input of k items, k <= the encoder's max_batch_size.
        normalize: unit-length output (True) or the reference's raw output.
        sent_at: `time.time()` when the ingress sent it; queue time is measured from here.
    """

    x: np.ndarray
    normalize: bool = True
    sent_at: float = 0.0


def call_size(call: EncodeCall) -> int:
    """Items in one call: what `max_batch_size` counts (inputs, not requests)."""
    return int(call.x.shape[0])


class EncoderCore:
    """Runs one modality's encoder over batches of `EncodeCall`s. No Ray needed.

    A thin wrapper over `imagebind_core.EncoderRunner` (the offline job's encoder actors use
    the same runner): this class only groups calls into batches.

    Args:
        modality: the model input this replica serves (`vision` also serves video clips).
        model: an `imagebind_core` model to use instead of loading one (tests inject TINY).
        preset, checkpoint, sha256, dtype, device, seed, storage_options: the
            `imagebind_core.ModelSpec` to load; only `modality`'s weights are loaded.
        torch_threads: `torch.set_num_threads` for this process (None keeps the default).
    """

    def __init__(
        self,
        modality: str,
        *,
        model: Any = None,
        preset: str = "tiny",
        checkpoint: str | None = None,
        sha256: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        seed: int = 0,
        storage_options: dict[str, Any] | None = None,
        torch_threads: int | None = None,
    ) -> None:
        import torch

        import imagebind_core as ibc

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.modality = str(ibc.Modality(modality))
        spec = ibc.ModelSpec(
            preset=model.config.name if model is not None else preset,
            checkpoint=checkpoint,
            checkpoint_sha256=sha256,
            dtype=dtype or "float32",
            device=device,
            seed=seed,
            storage_options=storage_options,
        )
        self.runner = ibc.EncoderRunner(spec, self.modality, model=model)

    @property
    def model(self) -> Any:
        return self.runner.model

    def encode(self, calls: list[EncodeCall]) -> list[np.ndarray]:
        """One model call per (input shape, dtype, normalize) group; outputs in call order.

        Images (3,H,W) and video clips (S,3,T,H,W) reach the same vision encoder but cannot be
        stacked, and `normalize` is a model argument: a mixed batch runs once per group.
        """
        from imagebind_core.runner import RowParts

        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(calls):
            groups.setdefault((c.x.shape[1:], c.x.dtype.str, c.normalize), []).append(i)
        out: list[np.ndarray | None] = [None] * len(calls)
        for (_, _, normalize), idx in groups.items():
            # The requests' arrays as parts of one batch: the runner copies each once (into
            # pinned memory on CUDA; joined on the CPU), not joined here first.
            xs = [calls[i].x for i in idx]
            x = xs[0] if len(xs) == 1 else RowParts(xs)
            y = self.runner.encode(self.modality, x, normalize=normalize)  # (N, D) float32
            start = 0
            for i in idx:
                k = calls[i].x.shape[0]
                out[i] = y[start : start + k]
                start += k
        return out  # type: ignore[return-value]

    def info(self) -> dict[str, Any]:
        """Modality, embedding size and lineage of the loaded weights."""
        return {
            "modality": self.modality,
            "embed_dim": int(self.model.embed_dim),
            "lineage": self.runner.lineage(),
        }


def seconds_histogram(name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    """A Prometheus histogram of durations in seconds (`TIME_BUCKETS_S`)."""
    return metrics.Histogram(
        name, description=description, boundaries=TIME_BUCKETS_S, tag_keys=tag_keys
    )


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class EncoderDeployment:
    """Serve deployment `encoder-{modality}`: dynamic batching around an `EncoderCore`.

    Args:
        modality, **kwargs: the `EncoderCore` to hold.
    """

    def __init__(self, modality: str, **kwargs: Any) -> None:
        self.core = EncoderCore(modality, **kwargs)
        self.modality = self.core.modality
        # The model runs on one worker thread: the replica's event loop stays free to accept
        # and queue the next requests while a batch computes.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"encode-{modality}")
        self._batcher = ContinuousBatcher(self._run_batch, 16, 0.0, size=call_size)
        tags = ("modality",)
        self._m_items = metrics.Counter(
            "imagebind_encoder_items", description="Inputs encoded.", tag_keys=tags
        )
        self._m_batch = metrics.Histogram(
            "imagebind_encoder_batch_size",
            description="Inputs per model call.",
            boundaries=_BATCH_BUCKETS,
            tag_keys=tags,
        )
        self._m_queue = seconds_histogram(
            "imagebind_encoder_queue_seconds",
            "From the ingress sending a chunk to its batch starting to compute.",
            tags,
        )
        self._m_compute = seconds_histogram(
            "imagebind_encoder_compute_seconds", "Model time of one batch.", tags
        )
        for m in (self._m_items, self._m_batch, self._m_queue, self._m_compute):
            # A fresh dict each time: Serve adds its own tags to the one it is given.
            m.set_default_tags({"modality": self.modality})

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Batch limits from `user_config`: {max_batch_size, batch_wait_timeout_s}."""
        self._batcher.set_limits(
            int(config.get("max_batch_size", self._batcher.max_batch_size)),
            float(config.get("batch_wait_timeout_s", self._batcher.batch_wait_timeout_s)),
        )

    async def embed(self, call: EncodeCall) -> np.ndarray:
        """Encode one chunk: (k, ...) -> (k, D) float32, batched with concurrent calls."""
        return await self._batcher.submit(call)

    async def _run_batch(self, calls: list[EncodeCall]) -> list[np.ndarray]:
        start = time.time()
        for c in calls:
            self._m_queue.observe(max(0.0, start - c.sent_at))
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self._pool, self.core.encode, calls)
        n = sum(map(call_size, calls))
        self._m_compute.observe(time.time() - start)
        self._m_batch.observe(n)
        self._m_items.inc(n)
        return out

    def ready(self) -> dict[str, Any]:
        """Readiness probe for the ingress: a replica exists only after its model loaded."""
        return self.core.info()
