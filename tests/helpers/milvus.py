"""milvus-lite 2.5 (Milvus' C++ engine as one local process) on a unix socket, for
tests/test_milvus_sink.py and benchmarks/bench_milvus_sink.py.

The server's binary is started the way `milvus_lite.server.Server` starts it, without
importing `milvus_lite`: its `__init__` imports `pkg_resources`, which setuptools >= 81 no
longer ships (so `MilvusClient("./x.db")` fails there too).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator


def milvus_lite_lib() -> str | None:
    """The folder holding milvus-lite's `milvus` binary and libraries; None if not installed."""
    spec = importlib.util.find_spec("milvus_lite")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = os.path.join(spec.submodule_search_locations[0], "lib")
    return lib if os.path.exists(os.path.join(lib, "milvus")) else None


@contextlib.contextmanager
def milvus_lite(timeout_s: float = 60.0) -> Iterator[str]:
    """Run a milvus-lite server on a fresh database; yields its URI (`unix:/tmp/…/m.sock`)."""
    lib = milvus_lite_lib()
    if lib is None:
        raise RuntimeError("milvus-lite 2.x is not installed (pip install '.[milvus]')")
    work = tempfile.mkdtemp(prefix="mvl")  # short: a socket path has ~100 characters
    sock, db, lock = f"{work}/m.sock", f"{work}/m.db", f"{work}/.m.db.lock"
    lock_fd = open(lock, "a")  # noqa: SIM115 - held while the server runs
    fcntl.lockf(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    env = {**os.environ, "LD_LIBRARY_PATH": lib + ":" + os.environ.get("LD_LIBRARY_PATH", "")}
    proc = subprocess.Popen(
        [os.path.join(lib, "milvus"), db, f"unix:{sock}", "ERROR", lock], env=env, cwd=work
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(sock):
            if proc.poll() is not None:
                raise RuntimeError(f"milvus-lite exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"milvus-lite did not open {sock} in {timeout_s:.0f} s")
            time.sleep(0.05)
        yield f"unix:{sock}"
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)  # the server exits when its lock is released
        lock_fd.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
