"""What one `imagebind-embed` run did (`JobSummary`): printed at its end, as text or JSON
(`--json`; docs/pipelines.md lists the fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class JobSummary:
    """What a run did."""

    output: str
    shards_total: int
    shards_skipped: int  # already committed before this run, nothing new in them
    shards_committed: int  # committed by this run
    shards_extended: int = 0  # committed before, with new items: embedded into additions
    ok: dict[str, int] = field(default_factory=dict)  # items embedded by this run, per kind
    errors: dict[str, int] = field(default_factory=dict)  # items failed in this run, per kind
    seconds: float = 0.0
    # Items an interrupted earlier run embedded into parts of uncommitted shards, kept.
    items_reused: int = 0
    # From the start of the run to the first encoded batch's rows written (the encoder's first
    # batch plus one part write): what the job pays before its encoders produce anything.
    first_batch_seconds: float | None = None
    # From the start of the run to Ray being up (started or joined): first_batch_seconds minus
    # this is what the pipeline itself takes to its first batch.
    ray_up_seconds: float | None = None
    # Worker warm-up (`pipelines.warmup`): its tasks submitted, and the worker processes they
    # had imported the decoders into by the end of the run (0, 0: warm-up off or no Ray run).
    workers_warmed: int = 0
    warmup_tasks: int = 0

    @property
    def exit_status(self) -> int:
        """The command line's exit status after this run: 0 (item errors included)."""
        return 0

    def items_per_s(self, kind: str) -> float:
        n = self.ok.get(kind, 0) + self.errors.get(kind, 0)
        return n / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        kinds = sorted(set(self.ok) | set(self.errors))
        return {
            "output": self.output,
            "shards_total": self.shards_total,
            "shards_skipped": self.shards_skipped,
            "shards_committed": self.shards_committed,
            "shards_extended": self.shards_extended,
            "items_reused": self.items_reused,
            "seconds": round(self.seconds, 3),
            "first_batch_seconds": (
                None if self.first_batch_seconds is None else round(self.first_batch_seconds, 3)
            ),
            "ray_up_seconds": (
                None if self.ray_up_seconds is None else round(self.ray_up_seconds, 3)
            ),
            "workers_warmed": self.workers_warmed,
            "warmup_tasks": self.warmup_tasks,
            "kinds": {
                k: {
                    "embedded": self.ok.get(k, 0),
                    "errors": self.errors.get(k, 0),
                    "items_per_s": round(self.items_per_s(k), 2),
                }
                for k in kinds
            },
        }

    def format(self) -> str:
        lines = [
            f"imagebind-embed: done in {self.seconds:.1f} s -> {self.output}",
            f"  shards: {self.shards_committed} committed by this run, "
            f"{self.shards_skipped} already done, {self.shards_total} in total",
        ]
        if self.items_reused:
            lines.append(f"  reused {self.items_reused} items from earlier parts")
        if self.first_batch_seconds is not None:
            ray_up = (
                f" (Ray up after {self.ray_up_seconds:.1f} s)"
                if self.ray_up_seconds is not None
                else ""
            )
            lines.append(
                f"  first encoded batch written after {self.first_batch_seconds:.1f} s{ray_up}"
            )
        if self.warmup_tasks:
            lines.append(
                f"  worker warm-up: decoders imported into {self.workers_warmed} worker "
                f"processes ({self.warmup_tasks} warm-up tasks)"
            )
        if self.shards_extended:
            lines.append(
                f"  {self.shards_extended} shards committed earlier had new items (files or rows "
                "added since): embedded into additional files <shard>.add-<hash>.parquet"
            )
        for k in sorted(set(self.ok) | set(self.errors)):
            lines.append(
                f"  {k:8s} {self.ok.get(k, 0):8d} embedded {self.errors.get(k, 0):6d} errors "
                f"{self.items_per_s(k):9.2f} items/s"
            )
        if not self.ok and not self.errors and not self.shards_committed:
            lines.append("  nothing to do: every shard was already committed, nothing new in them")
        if sum(self.errors.values()):
            lines.append(f"  failed items and reasons: {self.output.rstrip('/')}/_errors/")
        return "\n".join(lines)
