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
- Ray Data's WARNING "Specifying both num_cpus and num_gpus for map tasks is experimental",
  once per GPU encoder pool: the job's GPU actors ask for `num_cpus` 1 by default, the CPU
  that feeds the GPU (`encoder_defaults.num_cpus`), which is what Ray Data itself gives a
  GPU map task that names no `num_cpus`; it warns only because the job spells it out.
- faiss's INFO lines about the CPU-specific builds it could not load, before the generic one
  (shown with `--log-level DEBUG`).
- Ray Data's Python warning that an operator "only received N input(s)", fewer than its task
  or actor concurrency, with the advice to raise `override_num_blocks`: a job of few shards
  (one manifest) or few blocks starts fewer read tasks or uses fewer encoder actors than the
  job's sizing allows. Neither the advice nor the setting is open to a user of these
  commands, and nothing is wrong.
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
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

# (logger name, message pattern) of Ray log records the CLIs drop.
QUIET_RECORDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "ray.data._internal.progress",
        re.compile(
            r"^(Progress bars disabled|Progress bars for operators disabled|Progress will be "
            r"logged because|\[dataset\]: A new progress UI is available)"
        ),
    ),
    (
        "ray.data._internal.execution.operators.map_operator",
        re.compile(r"^Specifying both num_cpus and num_gpus for map tasks is experimental"),
    ),
)
# (module, message pattern) of Python warnings the CLIs drop (see the module docstring).
QUIET_WARNINGS: tuple[tuple[str, str], ...] = (
    (
        r"ray\.data\.",
        r"The (maximum|minimum) number of concurrent (tasks|actors) for .* but the operator "
        r"only received \d+ input",
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
    for module, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message, UserWarning, module)
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


# How long an interrupted command line may take to clean up (stop Ray, release its lock, read
# what the output keeps) before it exits anyway: the store it talks to may be what stopped
# answering.
INTERRUPT_GRACE_S = 30.0


@contextlib.contextmanager
def bounded_interrupts(
    prog: str, argv: Sequence[str] | None, grace_s: float = INTERRUPT_GRACE_S
) -> Iterator[None]:
    """Ctrl-C on a command line. The first raises KeyboardInterrupt where the run is, as
    Python's default does, so the run stops and cleans up; the cleanup gets `grace_s`
    seconds, and a second Ctrl-C ends the process at once. Either way the status is 130 and
    stderr says how to resume. A lock left behind is taken over at once by a rerun on this
    host (its holder's process is gone), elsewhere when its lease ends. Only for the command
    line's own process: the handler is process-wide."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    timer: threading.Timer | None = None

    def give_up(why: str) -> None:
        with contextlib.suppress(Exception):
            print(
                f"{prog}: {why}: exiting now, without finishing the cleanup (a lock this run "
                "held is taken over at once by a rerun on this host, elsewhere when its lease "
                f"ends).\n  resume with the same command:\n    {resume_command(prog, argv)}",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(0.3)  # for `filtered_stderr`'s pump to pass the lines on
        exit_now(130)

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal timer
        if timer is not None:
            give_up("interrupted again")
        timer = threading.Timer(
            grace_s, give_up, (f"the cleanup did not finish within {grace_s:g} s",)
        )
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if timer is not None:
            timer.cancel()


def exit_now(status: int) -> None:
    """End an interrupted command line without the interpreter's finalization. Ctrl-C can
    abandon native work in flight (pyarrow cancels a scan on SIGINT while its I/O threads
    still hold tasks that call back into Python); such a thread taking the GIL during
    finalization aborts the process (SIGABRT, a C++ stack trace) instead of exiting with
    `status`. The log and the standard streams are flushed here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


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
