"""The job's progress, logged on a timer: items read, preprocessed, embedded and committed.

The stages count what they finish into one small Ray actor (`ProgressCounter`, 0 CPUs,
fire-and-forget calls: a stage never waits for it); a driver thread (`ProgressReporter`) reads
the counts every `progress_interval_s` and logs one line, whether or not any block has reached
the driver:

    progress 00:40: read 212, preprocessed 180, embedded 148/400 (37%, 4.1 items/s, ETA 01:01),
    committed 1/5 shards (64 items)

The total (and so the percentage and ETA) is known for a files listing and for manifests;
tar shards are counted while they are read.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# The stages that report, in pipeline order, and the word each is logged with.
STAGES: dict[str, str] = {
    "read": "read",
    "preprocess": "preprocessed",
    "encode": "embedded",
}


# The tally of part rows the read tasks dropped (items changed or gone since the interrupted
# run that embedded them): the summary's reused items do not count them.
PARTS_DROPPED = "parts_dropped"

# Warnings a run's tasks send to the driver between two progress lines, at most (the rest are
# counted): Ray does not forward worker logs to the driver (`log_to_driver=False`, which keeps
# the console to the job's own lines), so what a user must see travels here.
MAX_NOTES = 100


class ProgressCounter:
    """Items done per stage, and the warnings tasks send to the driver (`notify`): a plain
    class; `counter_actor` runs it as a Ray actor."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.notes: list[str] = []
        self.notes_dropped = 0

    def add(self, stage: str, n: int) -> None:
        """Count `n` more items finished by `stage` (or any other tally a task keeps)."""
        self.counts[stage] += n

    def snapshot(self) -> dict[str, int]:
        """Items done so far per stage."""
        return dict(self.counts)

    def note(self, message: str) -> None:
        """Keep a warning for the driver to log."""
        if len(self.notes) < MAX_NOTES:
            self.notes.append(message)
        else:
            self.notes_dropped += 1

    def take_notes(self) -> tuple[list[str], int]:
        """The warnings kept since the last call, and how many more were not kept."""
        notes, dropped = self.notes, self.notes_dropped
        self.notes, self.notes_dropped = [], 0
        return notes, dropped


def counter_actor() -> Any:
    """A new `ProgressCounter` Ray actor (0 CPUs: it never takes a slot from the pipeline)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressCounter).remote()


def report(progress: Any, stage: str, n: int) -> None:
    """Tell the counter actor `progress` (None: nobody listens) that `stage` finished `n`
    items. Never raises and never waits: progress must not slow down or fail a stage."""
    if progress is None or n <= 0:
        return
    with contextlib.suppress(Exception):
        progress.add.remote(stage, n)


def notify(progress: Any, log: logging.Logger, message: str) -> None:
    """Log the warning `message` here (a worker's log) and send it to the driver, which logs
    it where the user reads the run (`ProgressReporter`). Never raises and never waits."""
    log.warning("%s", message)
    if progress is None:
        return
    with contextlib.suppress(Exception):
        progress.note.remote(message)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_progress(
    counts: dict[str, int],
    elapsed_s: float,
    total: int | None,
    shards_done: int,
    shards_total: int,
    committed_items: int,
) -> str:
    """One progress line (see the module docstring)."""
    parts = []
    for stage, word in STAGES.items():
        n = counts.get(stage, 0)
        if stage != "encode":
            parts.append(f"{word} {n}")
            continue
        rate = n / elapsed_s if elapsed_s > 0 else 0.0
        text = f"{word} {n}"
        if total:
            text += f"/{total} ({100 * n / total:.0f}%, {rate:.3g} items/s"
            if 0 < n < total:
                text += f", ETA {_clock((total - n) / rate)}"
            text += ")"
        else:
            text += f" ({rate:.3g} items/s)"
        parts.append(text)
    parts.append(f"committed {shards_done}/{shards_total} shards ({committed_items} items)")
    return f"progress {_clock(elapsed_s)}: " + ", ".join(parts)


# A run in which no item finishes any stage and no shard commits for this long gets a warning
# (then one more each time as long again passes): a line that keeps repeating the same counts
# is easy to miss in a log.
STALL_WARNING_S = 300.0


class ProgressReporter:
    """Logs a progress line every `interval_s` from a daemon thread, until `stop()`, and a
    warning when nothing has moved for `stall_warning_s`.

    Args:
        counter: the `counter_actor()` the stages report to.
        interval_s: seconds between lines.
        total: items this run embeds, when known.
        shards: a callable returning (shards committed, shards in the run, items committed).
        stall_warning_s: seconds without any progress before the warning.
    """

    def __init__(
        self,
        counter: Any,
        interval_s: float,
        total: int | None,
        shards: Callable[[], tuple[int, int, int]],
        stall_warning_s: float = STALL_WARNING_S,
    ) -> None:
        self.counter = counter
        self.interval_s = interval_s
        self.total = total
        self.shards = shards
        self.stall_warning_s = stall_warning_s
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._last: tuple[Any, float, int] | None = None  # (state, since, warnings given)
        self._thread = threading.Thread(target=self._run, name="embed-progress", daemon=True)

    def start(self) -> ProgressReporter:
        self._thread.start()
        return self

    def line(self) -> str:
        """The current progress line."""
        import ray

        counts = ray.get(self.counter.snapshot.remote(), timeout=10)
        done, in_run, items = self.shards()
        now = time.perf_counter()
        self.watch((sorted(counts.items()), done, items), now)
        return format_progress(counts, now - self._t0, self.total, done, in_run, items)

    def watch(self, state: Any, now: float) -> str | None:
        """Note the run's `state` (its counts) at time `now`; the warning logged (and returned)
        when it has not changed for another `stall_warning_s`, else None."""
        if self._last is None or self._last[0] != state:
            self._last = (state, now, 0)
            return None
        _, since, warned = self._last
        still = now - since
        if still < self.stall_warning_s * (warned + 1):
            return None
        self._last = (state, since, warned + 1)
        msg = (
            f"no progress for {_clock(still)}: no item finished reading, preprocessing or "
            "embedding and no shard committed. Something is waiting: a store that does not "
            "answer, a stuck worker, an encoder still loading a large checkpoint. The run goes "
            "on; Ctrl-C stops it, and the same command resumes it"
        )
        logger.warning("%s", msg)
        return msg

    def drain_notes(self) -> list[str]:
        """Log (WARNING) and return the warnings the tasks sent since the last call."""
        import ray

        notes, dropped = ray.get(self.counter.take_notes.remote(), timeout=10)
        if dropped:
            notes = [*notes, f"{dropped} more warnings from the run's tasks (in the Ray logs)"]
        for n in notes:
            logger.warning("%s", n)
        return notes

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.drain_notes()
                logger.info("%s", self.line())
            except Exception as e:  # a slow or restarting cluster: try at the next tick
                logger.debug("progress unavailable: %s", e)

    def stop(self) -> dict[str, int]:
        """Stop the thread; log the warnings not logged yet. Returns the final counts ({} if
        the counter cannot be read)."""
        import ray

        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        try:
            self.drain_notes()
            return ray.get(self.counter.snapshot.remote(), timeout=10)
        except Exception as e:
            logger.debug("progress unavailable: %s", e)
            return {}
