"""What an ingress replica knows of the app's deployments: replica counts from Serve's
controller, the chunks it has in flight per encoder, and which encoders have started.

`ScalingStatus` feeds GET /v1/status, /readyz and the Prometheus gauges; `Startup` answers 503
`starting` for an encoder that has not loaded its model yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.serve import metrics

import imagebind_core as ibc
from serve.http import APIError, retry_after

if TYPE_CHECKING:
    from serve.options import AppArgs

log = logging.getLogger(__name__)

# While an encoder has not answered once, a request waits this long for it before the 503
# `starting`: a fresh ingress replica next to running encoders (a restart, a scale-up) hears
# from them within milliseconds and must not refuse its first requests.
STARTUP_GRACE_S = 1.0


class ScalingStatus:
    """Replicas per deployment and state (from Serve's controller) and the chunks this ingress
    replica waits to hand to each encoder (no replica free, or none running) or has handed over.

    Args:
        args: the application's arguments (the autoscaling ranges reported).
        modalities: the model modalities of the app's encoder deployments.
    """

    def __init__(self, args: AppArgs, modalities: list[str]) -> None:
        self.args = args
        self.app_name: str | None = None  # set by `Ingress`; None: no Serve status (tests)
        self.waiting = dict.fromkeys(modalities, 0)
        self.ongoing = dict.fromkeys(modalities, 0)
        self._snapshot: dict[str, dict[str, Any]] = {}
        self._at = 0.0
        self._m_waiting = metrics.Gauge(
            "imagebind_encoder_waiting_chunks",
            description="Chunks an ingress replica waits to hand to the encoder (no replica "
            "free, or none running).",
            tag_keys=("modality",),
        )
        self._m_ongoing = metrics.Gauge(
            "imagebind_encoder_ongoing_chunks",
            description="Chunks an ingress replica has handed to encoder replicas, unanswered.",
            tag_keys=("modality",),
        )
        self._m_replicas = metrics.Gauge(
            "imagebind_deployment_replicas",
            description="Replicas of each deployment of the app by state, as Serve's "
            "controller reports them to each ingress replica.",
            tag_keys=("serve_deployment", "state"),
        )
        self._replica_tags: set[tuple[str, str]] = set()

    def refresh(self) -> dict[str, dict[str, Any]]:
        """Replica counts per deployment of this app from Serve's status API (blocking: call it
        from a thread), and the Prometheus gauges set from them and from the chunk counts."""
        for m in self.waiting:
            self._m_waiting.set(self.waiting[m], tags={"modality": m})
            self._m_ongoing.set(self.ongoing[m], tags={"modality": m})
        if self.app_name is None:
            return self._snapshot
        app = serve.status().applications.get(self.app_name)
        snap: dict[str, dict[str, Any]] = {}
        for name, d in (app.deployments if app else {}).items():
            states = {str(k): int(v) for k, v in d.replica_states.items()}
            snap[name] = {"status": str(getattr(d.status, "value", d.status)), "replicas": states}
        seen = set()
        for name, entry in snap.items():
            for state, n in entry["replicas"].items():
                seen.add((name, state))
                self._m_replicas.set(n, tags={"serve_deployment": name, "state": state})
        for name, state in self._replica_tags - seen:  # a state that emptied reads 0, not stale
            self._m_replicas.set(0, tags={"serve_deployment": name, "state": state})
        self._replica_tags |= seen
        self._snapshot, self._at = snap, time.monotonic()
        return snap

    def stale(self, max_age_s: float = 1.0) -> bool:
        """Whether the last snapshot is older than `max_age_s`."""
        return time.monotonic() - self._at > max_age_s

    def running_replicas(self, deployment: str) -> int | None:
        """RUNNING replicas of `deployment` in the last snapshot (None: not known)."""
        entry = self._snapshot.get(deployment)
        return None if entry is None else entry["replicas"].get("RUNNING", 0)

    def report(self) -> dict[str, Any]:
        """The body of GET /v1/status: per deployment, replicas by state, the autoscaling
        range, and this replica's waiting and ongoing chunks."""
        out: dict[str, Any] = {}
        for name, entry in self._snapshot.items():
            out[name] = {**entry, "running": entry["replicas"].get("RUNNING", 0)}
        for m in self.waiting:
            opts = self.args.encoder_options(m)
            out.setdefault(f"encoder-{m}", {"status": "UNKNOWN", "replicas": {}, "running": 0})
            out[f"encoder-{m}"].update(
                min_replicas=opts.min_replicas,
                max_replicas=opts.max_replicas,
                target_ongoing_requests=opts.target(),
                max_batch_size=opts.max_batch_size,
                waiting_chunks=self.waiting[m],
                ongoing_chunks=self.ongoing[m],
            )
        if "ingress" in out:
            ing = self.args.ingress
            out["ingress"].update(
                min_replicas=ing.min_replicas,
                max_replicas=ing.max_replicas,
                target_ongoing_requests=ing.target_ongoing_requests,
            )
        return {"object": "status", "application": self.app_name, "deployments": out}


class Startup:
    """Refuses requests for an encoder until its first replica has loaded its model.

    While an app starts, the ingress is up within seconds and the encoders load their weights
    for much longer; a request handed to an encoder with no replica yet would wait for one.
    Until each encoder with `min_replicas >= 1` has answered its first `ready` call, its
    requests are answered 503 `code: starting` with `Retry-After` (within `STARTUP_GRACE_S`),
    never held until the model is there. An encoder allowed to scale to zero is not tracked: a
    request is what starts its replica (bounded by `replica_wait_timeout_s`).

    Args:
        args: the application's arguments.
        encoders: `{model modality: handle}`.
        on_info: called with the first encoder's `ready` answer (its model info).
    """

    def __init__(
        self, args: AppArgs, encoders: Mapping[str, Any], on_info: Callable[[dict], None]
    ) -> None:
        self.args = args
        self.encoders = encoders
        self.on_info = on_info
        # `{model modality: set once its encoder has answered}`; None: not tracked (a service
        # outside Serve, as tests build it).
        self._started: dict[str, asyncio.Event] | None = None
        self._watch: asyncio.Task | None = None

    def track(self) -> None:
        """Start tracking (in the Serve replica)."""
        self._started = {}
        for m in self.encoders:
            self._started[m] = asyncio.Event()
            if self.args.encoder_options(m).min_replicas == 0:
                self._started[m].set()
        self.ensure_watch()

    def ensure_watch(self) -> None:
        """The task waiting for the encoders' first replicas, started once on the running loop
        (the replica's constructor may run outside it: then the first request starts it)."""
        if self._started is None or self._watch is not None or not self.starting():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._watch = loop.create_task(self._await_encoders())

    async def _await_encoders(self) -> None:
        async def first_answer(m: str) -> None:
            while True:
                try:
                    info = await self.encoders[m].ready.remote()
                except Exception as e:  # a replica failed while starting: Serve starts another
                    log.info("encoder-%s not started yet: %s", m, e)
                    await asyncio.sleep(1.0)
                    continue
                if isinstance(info, dict):
                    self.on_info(info)
                assert self._started is not None
                self._started[m].set()
                log.info("encoder-%s has a replica; requests for it are served", m)
                return

        waiting = [m for m, ev in (self._started or {}).items() if not ev.is_set()]
        await asyncio.gather(*(first_answer(m) for m in waiting))

    def starting(self) -> list[str]:
        """The encoder deployments that have not answered once yet (empty when not tracked)."""
        return [f"encoder-{m}" for m, ev in (self._started or {}).items() if not ev.is_set()]

    async def check_started(self, kind: str) -> None:
        """503 with Retry-After while the encoder of `kind` has not loaded its model yet
        (after at most `STARTUP_GRACE_S` of waiting for it)."""
        m = str(ibc.model_modality(kind))
        started = (self._started or {}).get(m)
        if started is None or started.is_set():
            return
        self.ensure_watch()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(started.wait(), STARTUP_GRACE_S)
        if not started.is_set():
            header = retry_after(self.args.retry_after_s)
            raise APIError(
                503,
                f"the {kind} encoder (encoder-{m}) is still starting (loading its model); "
                f"retry in {header['Retry-After']} s, or poll GET /readyz until it answers 200",
                type="server_error",
                code="starting",
                headers=header,
            )
