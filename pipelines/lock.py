"""One writer per output: a lease lock `<output>/_lock` with stale-lock recovery.

Taken with a create-if-absent write (S3 `If-None-Match: *`; a flock-guarded check on a local
folder — the conditional store of `pipelines.store`), renewed by a heartbeat thread, and
released on exit. A second run on the same output is refused with a message naming the holder.
A lock is stale, and is broken with a conditional delete (so two runs recovering it at once
cannot both win), when its lease expired (the holder stopped renewing: crashed or lost its
node), or at once when the holder ran on this host, in this pid namespace, and its process is
gone (a `kill -9` followed by an immediate rerun). A pid means something only inside its pid
namespace: the lock records the namespace (`/proc/self/ns/pid`) with the pid, and a holder in
another namespace — a container sharing the host's network, hence its hostname — or one that
did not record it is judged by its lease alone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from imagebind_core.io import StorageOptions
from pipelines.store import PreconditionFailed, open_store

logger = logging.getLogger(__name__)

LOCK_KEY = "_lock"


def _lock_doc(raw: bytes) -> dict[str, Any] | None:
    """A lock file's document; None when it is not a JSON object (damaged, or not ours)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _number(doc: dict[str, Any], key: str) -> float:
    """`doc[key]` as a number; 0 when absent or not a number (an expired lease)."""
    try:
        return float(doc.get(key, 0))
    except (TypeError, ValueError):
        return 0.0


class OutputLocked(RuntimeError):
    """Another run is writing to this output."""


def _proc_start(pid: int) -> str | None:
    # Field 22 of /proc/<pid>/stat (start time in clock ticks): tells a reused pid apart.
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # a zombie is dead for our purposes
            return "zombie"
        return fields[19]
    except (OSError, IndexError):
        return None


def _pid_namespace() -> str | None:
    """This process's pid namespace (`pid:[<inode>]`), or None where it cannot be known."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _proc_start(pid)
    if now == "zombie":
        return False
    return start is None or now is None or now == start


class OutputLock:
    """The exclusive lease on an output URI. Use as a context manager. `what` names the URI
    in messages: "output" (the embedding job's) or "index root" (a re-index's)."""

    def __init__(
        self,
        output_uri: str,
        storage_options: StorageOptions | None = None,
        ttl_s: float = 300.0,
        what: str = "output",
    ) -> None:
        self.output_uri = output_uri
        self.what = what
        self.store = open_store(output_uri, storage_options)
        self.ttl_s = ttl_s
        self.etag: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        pid = os.getpid()
        self.doc_base: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": _proc_start(pid),
            "pid_ns": _pid_namespace(),
        }

    def _doc(self) -> bytes:
        now = time.time()
        return json.dumps(
            {**self.doc_base, "renewed_at": now, "expires_at": now + self.ttl_s}
        ).encode()

    def _stale_reason(self, doc: dict[str, Any] | None) -> str | None:
        if doc is None:
            return "it is not a lock this program wrote (unreadable)"
        if _number(doc, "expires_at") < time.time():
            return "its lease expired"
        pid = doc.get("pid")
        same_host = doc.get("host") == socket.gethostname()
        ns = self.doc_base["pid_ns"]
        # The pid is ours to check only in the same pid namespace, known on both sides.
        same_ns = ns is not None and doc.get("pid_ns") == ns
        alive = not (same_host and same_ns and isinstance(pid, int)) or _pid_alive(
            pid, doc.get("pid_start")
        )
        if not alive:
            return f"process {pid} on this host is gone"
        return None

    def acquire(self) -> OutputLock:
        """Take the lock or raise OutputLocked naming the current holder."""
        for _ in range(5):
            try:
                self.etag = self.store.put(LOCK_KEY, self._doc(), if_none_match=True)
                break
            except PreconditionFailed:
                pass
            cur = self.store.get(LOCK_KEY)
            if cur is None:
                continue
            doc = _lock_doc(cur[0])
            reason = self._stale_reason(doc)
            if reason is None:
                assert doc is not None
                raise OutputLocked(
                    f"{self.what} {self.output_uri} is being written by another run "
                    f"(host {doc.get('host')}, pid {doc.get('pid')}; lock {LOCK_KEY} renewed "
                    f"{time.time() - _number(doc, 'renewed_at'):.0f} s ago). Wait for it "
                    f"to finish, or write to another {self.what}."
                )
            try:
                self.store.delete(LOCK_KEY, if_match=cur[1])
            except PreconditionFailed:
                raise OutputLocked(
                    f"{self.what} {self.output_uri}: another run recovered the stale lock first"
                ) from None
            logger.warning("recovered a stale lock on %s (%s)", self.output_uri, reason)
        else:
            raise OutputLocked(
                f"{self.what} {self.output_uri}: could not take the lock (contended)"
            )
        self._thread = threading.Thread(target=self._beat, name="embed-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.etag = self.store.put(LOCK_KEY, self._doc(), if_match=self.etag)
            except PreconditionFailed:
                logger.error("lock on %s was taken over by another run", self.output_uri)
                self.lost.set()
                return
            except Exception as e:  # a transient store error: try again at the next beat
                logger.warning(
                    "renewing the lock on %s failed (%s: %s); trying again in %.0f s",
                    self.output_uri,
                    type(e).__name__,
                    str(e)[:300],
                    self.ttl_s / 3,
                )

    def release(self) -> None:
        """Stop renewing and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.etag is not None and not self.lost.is_set():
            try:
                self.store.delete(LOCK_KEY, if_match=self.etag)
            except (PreconditionFailed, FileNotFoundError):
                pass
            except Exception as e:  # never raised over the error that ends a run
                logger.warning(
                    "could not remove the lock of %s (%s: %s); the next run takes it over "
                    "once it sees this process gone or the lease of %.0f s expired",
                    self.output_uri,
                    type(e).__name__,
                    e,
                    self.ttl_s,
                )
        self.etag = None

    def __enter__(self) -> OutputLock:
        return self if self.etag is not None else self.acquire()  # acquired already: as is

    def __exit__(self, *exc: object) -> None:
        self.release()
