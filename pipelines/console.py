"""What the CLIs print around a run: logging with Ray's false alarms filtered, and Ctrl-C.

Filtered (each is about Ray's own defaults, not something a user of these commands can act
on; docs/pipelines.md, "Logs", lists them):

- Ray Data's "Progress bars disabled. To enable, set `ray.data.DataContext...`" and its
  other progress-UI hints: the CLIs choose the bars (`ray.progress_bars`, `--no-progress`)
  and log their own progress lines (`pipelines.progress`).
- The driver's error-level `core_worker.cc ... has constructor arguments in the object store
  and max_restarts > 0` line (ray#53727): Ray Data gives every actor pool `max_restarts=-1`
  and stores every actor's constructor arguments in the object store, so it is printed for
  any actor pool, ours or a one-line probe's. The job keeps Ray Data's restarts (a lost node's
  encoder actors come back). It is printed by Ray's C++ core to file descriptor 2, so the
  CLIs pass their stderr through a line filter (`filtered_stderr`).
- faiss's INFO lines about the CPU-specific builds it could not load, before the generic one
  (shown with `--log-level DEBUG`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

# (logger name, message pattern) of Ray log records the CLIs drop.
QUIET_RECORDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "ray.data._internal.progress",
        re.compile(
            r"^(Progress bars disabled|Progress bars for operators disabled|Progress will be "
            r"logged because|\[dataset\]: A new progress UI is available)"
        ),
    ),
)
# Lines Ray's C++ core writes to stderr that the CLIs drop (see the module docstring).
QUIET_NATIVE_LINES: tuple[re.Pattern[str], ...] = (
    re.compile(
        r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*has constructor arguments "
        r"in the object store and max_restarts > 0"
    ),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def configure_logging(level: str) -> None:
    """Log records at `level` and above to stderr, without Ray's false alarms."""
    try:
        logging.basicConfig(
            level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    except ValueError as e:
        raise SystemExit(f"--log-level {level!r}: {e}") from None
    for name, pattern in QUIET_RECORDS:
        logging.getLogger(name).addFilter(_DropMatching(pattern))
    if logging.getLogger().level > logging.DEBUG:
        # faiss logs each CPU-specific build it cannot import (`ModuleNotFoundError ...
        # swigfaiss_avx512`) at INFO before it loads the generic one: expected, not news.
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """File descriptor 2 through a pipe that drops `QUIET_NATIVE_LINES`, for the duration.

    Python's writes and Ray's C++ core's go through the same descriptor, so both are filtered
    and keep their order. A no-op where stderr has no descriptor (an embedding host).
    """
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    read_end, write_end = os.pipe()
    out = os.dup(real)  # the pump's own: `real` is closed when the block ends
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as src, os.fdopen(out, "wb", 0) as dst:
            for line in src:
                text = line.decode(errors="replace")
                if not any(p.search(text) for p in QUIET_NATIVE_LINES):
                    dst.write(line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        # The pipe's last writer closes and the pump stops, unless a process started meanwhile
        # (a local Ray's) still holds it: its later lines go on through the daemon pump.
        os.dup2(real, 2)
        os.close(real)
        thread.join(timeout=1)


def ignore_further_interrupts() -> None:
    """Ctrl-C again while an interrupted run shuts down: ignored (the shutdown is short)."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def shutdown_ray() -> None:
    """Stop this process's Ray workers (a local Ray) or disconnect (a cluster)."""
    with contextlib.suppress(Exception):
        import ray

        if ray.is_initialized():
            ray.shutdown()


def resume_command(prog: str, argv: Sequence[str] | None) -> str:
    """The command line that reruns this one, quoted for a POSIX shell."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join([prog, *args])
