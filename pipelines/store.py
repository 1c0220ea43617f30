"""Where the embedding job's output lives: the `Output` folder, the job record, atomic writes,
transient-error retries, and the conditional local/S3 store that `pipelines.lock` and
`pipelines.publish` build on.

Layout under the output URI (local folder or `s3://bucket/prefix`):

    <shard>.parquet                committed embeddings of one input shard (the commit marker)
    <shard>.add-<hash>.parquet     items found in that shard after it was committed (additions)
    _errors/<shard>[.add-<hash>].parquet   items of that shard that failed, with the reason
    _parts/<shard>/*.parquet       work in progress: one file per (block, shard, kind)
    _inputs/<shard>.json           the input identity the shard's committed files cover
    _job.json                      what produced this output (model lineage, input, shard count)
    _lock                          held by the run writing here (see pipelines.lock)

Every file is written atomically (temporary name + rename on a local disk; one PUT on S3).
`Output.create_atomic` creates a file only if it does not exist (a hard link on a local disk,
`If-None-Match: *` on S3): the commit marker of a shard. Readers of the output (pyarrow, Ray
Data, DuckDB) ignore `_`-prefixed folders by default (`hidden`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import fsspec.asyn
import pyarrow as pa
import pyarrow.parquet as pq

from imagebind_core.errors import StoreUnavailable
from imagebind_core.index import join_uri
from imagebind_core.io import (
    StorageOptions,
    base_name,
    canonical_uri,
    durable_tmp,
    file_lock,
    filesystem,
    is_durable_tmp,
    listed_sizes,
    protocol_of,
    store_name,
    write_atomic,
)

logger = logging.getLogger(__name__)

PARTS_DIR = "_parts"
ERRORS_DIR = "_errors"
INPUTS_DIR = "_inputs"
JOB_RECORD = "_job.json"
# `<shard>.add-<12 hex>`: an addition to a committed shard. No shard may be named like this
# (`pipelines.plan` refuses such input names).
ADDITION_RE = re.compile(r"\.add-[0-9a-f]{12}$")


def hidden(rel: str) -> bool:
    """True if a relative path has a part starting with `_` or `.` (skipped, as Spark and
    pyarrow skip them: job state, temporary files)."""
    return any(p.startswith(("_", ".")) for p in rel.split("/") if p)


_TRANSIENT_CODES = {"500", "502", "503", "504", "SlowDown", "ServiceUnavailable", "InternalError"}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then each exception it was raised from (a Ray task error's `cause` included),
    each once: the chain a traceback shows, so `raise ... from None` ends it (an "object not
    found" raised from None is not the connection error fsspec's HTTP store caught first)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError keeps it here
        if isinstance(cause, BaseException):
            e = cause
        elif e.__cause__ is not None or e.__suppress_context__:
            e = e.__cause__
        else:
            e = e.__context__


E = TypeVar("E", bound=BaseException)


def find_cause(exc: BaseException, cls: type[E]) -> E | None:
    """The first exception of type `cls` in `exc`'s chain (`_causes`: a Ray task's included)."""
    return next((e for e in _causes(exc) if isinstance(e, cls)), None)


def transient_store_error(exc: BaseException) -> bool:
    """True if `exc` (or an exception it was raised from) says the store is unreachable or
    overloaded rather than that the object is bad."""
    return _transient_cause(exc) is not None


def _transient_cause(exc: BaseException) -> BaseException | None:
    """The exception in `exc`'s chain that says the store is unreachable or overloaded (an
    fsspec FileNotFoundError raised from aiohttp's connection error: the latter)."""
    for e in _causes(exc):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return e
        # by name: botocore and aiohttp are optional; a Ray task error subclasses its cause
        names = {c.__name__ for c in type(e).__mro__}
        if names & {
            "StoreUnavailable",
            "EndpointConnectionError",
            "ConnectionClosedError",
            "ReadTimeoutError",
            "ConnectTimeoutError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ClientOSError",
        }:
            return e
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _TRANSIENT_CODES or status in _TRANSIENT_CODES:
                return e
    return None


# Errors that come after waiting a timeout out (the names of botocore's, aiohttp's and
# fsspec's; Python's own is TimeoutError).
_TIMEOUTS = {"ReadTimeoutError", "ConnectTimeoutError", "FSTimeoutError", "ServerTimeoutError"}


def timed_out_error(exc: BaseException) -> bool:
    """True if `exc` (or an exception it was raised from) is a request that timed out."""
    for e in _causes(exc):
        if isinstance(e, TimeoutError) or {c.__name__ for c in type(e).__mro__} & _TIMEOUTS:
            return True
    return False


class OutputUnwritable(RuntimeError):
    """The output cannot be written (read-only, full, no permission): the operator's to fix;
    a rerun then resumes."""


# The errnos that mean the output itself refuses writes, whatever the item.
_UNWRITABLE = {errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EDQUOT}


def unwritable_error(exc: BaseException, under: str) -> OSError | None:
    """The write refused by the file system (read-only, full, no permission) on a path under
    `under` (a local folder or object-store URI) that `exc` is, or was raised from (a Ray
    task's cause included); None if there is none."""
    prefix = canonical_uri(under).split("://", 1)[-1].rstrip("/") + "/"
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno in _UNWRITABLE:
            name = str(e.filename or "")
            path = canonical_uri(name).split("://", 1)[-1] if name else ""
            if not name or (path + "/").startswith(prefix):
                return e
    return None


def with_store_retries(
    fn: Any,
    what: str,
    uri: str,
    storage_options: StorageOptions | None = None,
    retries: int = 4,
) -> Any:
    """Call `fn()`; while it fails because the store behind `uri` is unreachable
    (`transient_store_error`), wait (1, 2, 4, 8 s) and call it again — for idempotent
    operations only. Then `StoreUnavailable` naming the store and `what` (e.g. "reading <uri>"):
    the item is not at fault, so the block fails and a rerun resumes.

    A call that timed out is not called again: the S3 client under it has already retried
    it (botocore's attempts, each retried by s3fs: `imagebind_core.io.S3_MAX_ATTEMPTS`), and
    retrying here too would multiply the time a store that stopped answering holds the run
    (five times 25 minutes at botocore's defaults). Refused connections and 5xx, which fail
    fast, are retried: a store restarting comes back within these waits."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if not transient_store_error(e):
                raise
            timed_out = timed_out_error(e)
            if attempt == retries or timed_out:
                how = "timed out" if timed_out else f"failed after {attempt + 1} attempts"
                cause = _transient_cause(e) or e
                raise StoreUnavailable(
                    store_name(uri, storage_options),
                    f"{what} {how}: {type(cause).__name__}: {cause}",
                    uri,
                ) from e
            time.sleep(min(2.0**attempt, 10.0))
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- file helpers


def parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    """`table` as Parquet file bytes: zstd (or `compression`), dictionary encoding only where
    it can pay.

    Vector columns (float lists: `embedding`; fixed-size binary: a part's vector bytes,
    `pipelines.rows.part_embedding_type`) are written without dictionary encoding: Parquet
    tries a dictionary by default, and for embeddings, where no two values repeat, it hashes
    every value, gives up and falls back to plain pages (figures in
    benchmarks/results/null-encoder-text-profile-2core.txt). Plain + zstd is readable by every
    Parquet reader.
    """
    no_dict = {
        f.name
        for f in table.schema
        if pa.types.is_fixed_size_binary(f.type)
        or (
            (
                pa.types.is_list(f.type)
                or pa.types.is_fixed_size_list(f.type)
                or pa.types.is_large_list(f.type)
            )
            and pa.types.is_floating(f.type.value_type)
        )
    }
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression=compression,
        use_dictionary=[n for n in table.column_names if n not in no_dict] if no_dict else True,
    )
    return sink.getvalue().to_pybytes()


class OutputDamaged(RuntimeError):
    """A file of the output that a run must read is not what a run wrote there (emptied,
    truncated, edited): the message names it and what to do."""


class Output:
    """The output location: an fsspec filesystem plus the root path inside it."""

    def __init__(self, uri: str, storage_options: StorageOptions | None = None) -> None:
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self.fs, root = filesystem(uri, storage_options)
        self.root = root.rstrip("/") or root
        self.local = protocol_of(uri) == "file"

    def path(self, *parts: str) -> str:
        return join_uri(self.root, *parts)

    def uri_of(self, path: str) -> str:
        """`path` (of this output's filesystem) as the URI a user would type."""
        return path if self.local else f"{protocol_of(self.uri)}://{path}"

    def _ids(self, path: str) -> list[str]:
        return self.read_table(path, columns=["id"]).column("id").to_pylist()

    def shard_path(self, shard: str) -> str:
        return self.path(f"{shard}.parquet")

    def errors_path(self, shard: str) -> str:
        return self.path(ERRORS_DIR, f"{shard}.parquet")

    def parts_dir(self, shard: str) -> str:
        return self.path(PARTS_DIR, shard)

    def inputs_path(self, shard: str) -> str:
        return self.path(INPUTS_DIR, f"{shard}.json")

    def _sized_family(self, folder: str, shard: str) -> dict[str, int]:
        # `<shard>.parquet` and its additions `<shard>.add-<hash>.parquet`, in `folder`: sizes.
        d, _, base = join_uri(folder, shard).rpartition("/")
        out = {}
        for f, size in self.ls_sizes(d).items():
            name = f.rsplit("/", 1)[-1][: -len(".parquet")]
            if name == base or (name.startswith(base) and ADDITION_RE.fullmatch(name[len(base) :])):
                out[f] = size
        return out

    def _shard_family(self, folder: str, shard: str) -> list[str]:
        return sorted(self._sized_family(folder, shard))

    def shard_files(self, shard: str) -> list[str]:
        """The committed embedding files of `shard`: the main file and its additions."""
        return self._shard_family(self.root, shard)

    def error_files(self, shard: str) -> list[str]:
        """The committed error files of `shard`."""
        return self._shard_family(self.path(ERRORS_DIR), shard)

    def committed_ids(self, shard: str) -> set[str]:
        """Every id the committed files (embeddings and errors) of `shard` hold."""
        ids: set[str] = set()
        for p in self.shard_files(shard) + self.error_files(shard):
            try:
                ids.update(self._ids(p))
            except pa.ArrowInvalid as e:  # a format error; the store's own are OSErrors
                raise OutputDamaged(
                    f"committed file {self.uri_of(p)} is not readable ({e}). Delete it and "
                    "rerun: the items of its shard that it held are embedded again."
                ) from None
        return ids

    def read_identity(
        self, shard: str, files: Mapping[str, Mapping[str, int]] | None = None
    ) -> str | None:
        """The input identity recorded when `shard` was last committed or brought up to date.
        With `files` (`committed_files_by_shard`), None when the shard's committed files are
        not the ones recorded then, by name and size (one cut short, emptied, deleted or
        added outside a run): the run then reads their ids instead of trusting the record,
        which names a file it cannot read (OutputDamaged) and embeds again what a deleted
        one held. A record without sizes (written by an earlier version) is trusted."""
        path = self.inputs_path(shard)
        try:
            doc = self.read_json(path)
        except ValueError as e:  # damaged: a cache, so the run compares ids instead
            logger.warning("%s is not readable (%s): ignored", self.uri_of(path), e)
            return None
        if not isinstance(doc, dict):
            return None
        recorded = doc.get("files")
        if files is not None and isinstance(recorded, dict):
            now = dict(files.get(shard, {}))
            if recorded != now:
                changed = sorted(
                    k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k)
                )
                logger.warning(
                    "shard %s: committed files changed since the shard was committed (%s): "
                    "reading their ids instead of trusting %s",
                    shard,
                    ", ".join(
                        f"{self.uri_of(self.path(k))}: {recorded.get(k, 'absent')} -> "
                        f"{now.get(k, 'absent')} bytes"
                        for k in changed[:5]
                    )
                    + (f" and {len(changed) - 5} more" if len(changed) > 5 else ""),
                    self.uri_of(path),
                )
                return None
        return doc.get("identity")

    def write_identity(
        self, shard: str, identity: str, files: Mapping[str, int] | None = None
    ) -> None:
        """Record `identity` for `shard`, with the sizes of its committed files (`files`,
        paths relative to the root; default: listed now, two folder listings) that the
        record vouches for."""
        # A cache: when absent or stale the next run compares ids instead (correct, slower).
        if files is None:
            files = self.shard_file_sizes(shard)
        self.write_bytes_atomic(
            self.inputs_path(shard),
            json.dumps({"identity": identity, "files": dict(sorted(files.items()))}).encode(),
        )

    def shard_file_sizes(self, shard: str) -> dict[str, int]:
        """{path relative to the root: size} of `shard`'s committed files (embeddings and
        errors, main files and additions)."""
        out = {}
        for folder in (self.root, self.path(ERRORS_DIR)):
            for p, size in self._sized_family(folder, shard).items():
                out[self.relative(p)] = size
        return out

    def sizes_of(self, paths: Sequence[str]) -> dict[str, int]:
        """{path relative to the root: size} of those of `paths` that exist."""
        out = {}
        for p in paths:
            with contextlib.suppress(Exception):
                self.fs.invalidate_cache(p)
            try:
                out[self.relative(p)] = int(self.fs.info(p)["size"])
            except FileNotFoundError:
                continue
        return out

    def relative(self, path: str) -> str:
        """`path` (of this output's filesystem) relative to the root."""
        prefix = self.root.rstrip("/") + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path

    def committed_files(self) -> dict[str, int]:
        """{path relative to the root: size} of every committed file (a shard's main file,
        its additions, their error files), from one listing of the output."""
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for f, info in found.items():
            rel = self.relative(f)
            if not rel.endswith(".parquet") or info.get("type", "file") != "file":
                continue
            inner = rel[len(ERRORS_DIR) + 1 :] if rel.startswith(ERRORS_DIR + "/") else rel
            if not hidden(inner):
                out[rel] = int(info.get("size") or 0)
        return out

    @staticmethod
    def committed_files_by_shard(files: Mapping[str, int]) -> dict[str, dict[str, int]]:
        """`committed_files()` grouped by the shard each file belongs to."""
        out: dict[str, dict[str, int]] = {}
        for rel, size in files.items():
            inner = rel[len(ERRORS_DIR) + 1 :] if rel.startswith(ERRORS_DIR + "/") else rel
            shard = ADDITION_RE.sub("", inner[: -len(".parquet")])
            out.setdefault(shard, {})[rel] = size
        return out

    def makedirs(self, path: str) -> None:
        if self.local:
            os.makedirs(path, exist_ok=True)

    def exists(self, path: str) -> bool:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def ls_files(self, path: str) -> list[str]:
        """Files directly under `path` (none if it does not exist); hidden/temporary excluded."""
        return sorted(self.ls_sizes(path))

    def ls_sizes(self, path: str) -> dict[str, int]:
        """`ls_files` with each file's size."""
        return {
            p: n
            for p, n in listed_sizes(self.fs, path).items()
            if not base_name(p).startswith(".") and p.endswith(".parquet")
        }

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Write `path` so that readers see all of it or nothing."""
        if self.local:
            write_atomic(path, data)
        else:  # one PUT (or a multipart upload completed on close): atomic on S3
            with self.fs.open(path, "wb") as f:
                f.write(data)

    def create_atomic(self, path: str, data: bytes) -> bool:
        """Create `path` with `data` unless it exists; False (nothing written) if it does.

        Atomic against a concurrent creator on a local disk (a hard link fails if the name
        exists) and on S3 (`If-None-Match: *`). On another store the check and the write are
        two requests: two writers racing in between can both write (last one wins).
        """
        if self.local:
            tmp = durable_tmp(path, data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        if protocol_of(self.uri) in ("s3", "s3a"):
            bucket, _, key = path.partition("/")
            try:
                open_store(f"s3://{bucket}", self.storage_options).put(
                    key, data, if_none_match=True
                )
                return True
            except PreconditionFailed:
                return False
            finally:
                with contextlib.suppress(Exception):
                    self.fs.invalidate_cache(path)
        if self.exists(path):
            return False
        self.write_bytes_atomic(path, data)
        return True

    @staticmethod
    def _parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
        return parquet_bytes(table, compression)

    def write_table_atomic(self, path: str, table: pa.Table, compression: str = "zstd") -> None:
        """Write a Parquet file atomically (`parquet_bytes`)."""
        self.write_bytes_atomic(path, self._parquet_bytes(table, compression))

    def create_table(self, path: str, table: pa.Table) -> bool:
        """Create a Parquet file unless it exists (see `create_atomic`)."""
        return self.create_atomic(path, self._parquet_bytes(table))

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    def read_json(self, path: str) -> dict | None:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def rm_tree(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    def rm_parts(self, shard: str) -> None:
        """Delete the part files of `shard` — only its own: `_parts/a/b/` (shard `a/b`) lies
        inside `_parts/a/` (shard `a`) — then the folders this leaves empty."""
        d = self.parts_dir(shard)
        for f in self.ls_files(d):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(f)
        if self.local:
            # A writer killed mid-write (an interrupted run) leaves its hidden temporary file
            # (`durable_tmp`) beside the parts: it would keep the folders from being removed.
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for name in os.listdir(d):
                    if is_durable_tmp(name):
                        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                            os.remove(os.path.join(d, name))
            stop = self.path(PARTS_DIR)
            while d.startswith(stop):
                try:
                    os.rmdir(d)
                except OSError:
                    break
                d = os.path.dirname(d)
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.path(PARTS_DIR))

    def prune_parts_dir(self) -> None:
        """Remove `_parts/` when it holds nothing (a local folder; object stores have no
        empty folders)."""
        if self.local:
            with contextlib.suppress(OSError):
                os.rmdir(self.path(PARTS_DIR))

    def parts_shards(self) -> set[str]:
        """Shards that have part files."""
        base = self.path(PARTS_DIR)
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(base)
        try:
            files = self.fs.find(base)
        except FileNotFoundError:
            return set()
        prefix = base.rstrip("/") + "/"
        return {
            f[len(prefix) :].rsplit("/", 1)[0]
            for f in files
            if f.startswith(prefix) and f.endswith(".parquet") and "/." not in f[len(prefix) - 1 :]
        }

    def committed_shards(self, files: Mapping[str, int] | None = None) -> set[str]:
        """Names of the shards whose `<shard>.parquet` exists (in `files`, a
        `committed_files()` listing, when given)."""
        if files is None:
            files = self.committed_files()
        return {
            rel[: -len(".parquet")]
            for rel in files
            if not rel.startswith(ERRORS_DIR + "/")
            and not ADDITION_RE.search(rel[: -len(".parquet")])  # an addition
        }

    def leftover_parts(self, committed: set[str]) -> list[str]:
        """Committed shards that still have part files: a run that died between a commit and
        deleting the parts, or while embedding additions. Reruns fold them in (`commit_shard`)."""
        return sorted(s for s in self.parts_shards() if s in committed)

    def part_ids(self, shard: str) -> set[str]:
        """Ids already written to parts of an uncommitted shard (resume inside a shard)."""
        ids: set[str] = set()
        for p in self.ls_files(self.parts_dir(shard)):
            try:
                ids.update(self._ids(p))
            except pa.ArrowInvalid as e:  # work in progress: its items are simply redone
                logger.warning(
                    "part file %s is not readable (%s): deleted; its items are embedded again",
                    self.uri_of(p),
                    e,
                )
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(p)
        return ids


# ------------------------------------------------------------------------- the job record


def read_job_record(output: Output) -> dict | None:
    """`<output>/_job.json`, or None on a fresh output. OutputDamaged if it is not a job
    record (emptied or edited): it says which job the output's files belong to, and a run
    neither guesses that nor overwrites it."""
    path = output.path(JOB_RECORD)
    try:
        rec = output.read_json(path)
    except ValueError as e:
        why = f"not JSON: {e}"
    else:
        if rec is None or (isinstance(rec, dict) and isinstance(rec.get("key"), dict)):
            return rec
        why = "no job key in it"
    raise OutputDamaged(
        f"{output.uri_of(path)} is not a job record ({why}); it records which job (model, "
        f"input, format) wrote the output. Restore it, or delete {output.uri} to start over."
    )


def write_job_record(output: Output, record: Mapping[str, Any]) -> None:
    output.write_bytes_atomic(
        output.path(JOB_RECORD), json.dumps(dict(record), indent=2, sort_keys=True).encode()
    )


# --------------------------------------------------------------------------- conditional store


class PreconditionFailed(Exception):
    """A conditional write or delete lost: the object changed (or appeared) since it was read."""


class _Store:
    """Small-object operations on keys below an index root, with optional preconditions."""

    def get(self, key: str) -> tuple[bytes, str] | None:
        """(content, etag) of `key`, or None if absent."""
        raise NotImplementedError

    def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        """Write `key`; returns its new etag. Raises PreconditionFailed if a condition fails."""
        raise NotImplementedError

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete `key` (only if its etag is `if_match`, when given)."""
        raise NotImplementedError


def _is_precondition_failure(exc: BaseException) -> bool:
    """s3fs turns a 412 into FileExistsError (If-None-Match) or OSError(EINVAL) (If-Match)."""
    if isinstance(exc, FileExistsError):
        return True
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        # ConditionalRequestConflict (409): S3's answer to two conditional writes in flight.
        return code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (
            409,
            412,
        )
    return isinstance(exc, OSError) and exc.errno == errno.EINVAL


class _S3Store(_Store):
    """Conditional S3 requests (If-Match / If-None-Match) through s3fs's aiobotocore client."""

    def __init__(self, root: str, storage_options: StorageOptions | None) -> None:
        self.fs, path = filesystem(root, storage_options)
        self.bucket, _, self.prefix = path.partition("/")
        self.prefix = self.prefix.strip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, method: str, **kwargs: Any) -> Any:
        return fsspec.asyn.sync(self.fs.loop, self.fs._call_s3, method, **kwargs)

    def get(self, key: str) -> tuple[bytes, str] | None:
        async def _get() -> tuple[bytes, str] | None:
            try:
                resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(key))
            except FileNotFoundError:
                return None
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return data, resp["ETag"]

        return fsspec.asyn.sync(self.fs.loop, _get)

    def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        cond: dict[str, str] = {}
        if if_match is not None:
            cond["IfMatch"] = if_match
        if if_none_match:
            cond["IfNoneMatch"] = "*"
        try:
            resp = self._call(
                "put_object", Bucket=self.bucket, Key=self._key(key), Body=data, **cond
            )
        except FileNotFoundError as e:  # If-Match on an object that is gone
            if if_match is not None:
                raise PreconditionFailed(key) from e
            raise
        except OSError as e:
            if cond and _is_precondition_failure(e):
                raise PreconditionFailed(key) from e
            raise
        return resp["ETag"]

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        cond = {"IfMatch": if_match} if if_match is not None else {}
        try:
            self._call("delete_object", Bucket=self.bucket, Key=self._key(key), **cond)
        except FileNotFoundError as e:
            if if_match is not None:
                raise PreconditionFailed(key) from e
        except OSError as e:
            if cond and _is_precondition_failure(e):
                raise PreconditionFailed(key) from e
            raise


class _LocalStore(_Store):
    """The same contract on a local folder: check-and-replace under an exclusive flock."""

    def __init__(self, root: str) -> None:
        self.root = root[len("file://") :] if root.startswith("file://") else root
        os.makedirs(self.root, exist_ok=True)
        self._flock = os.path.join(self.root, ".store.flock")

    def _read(self, key: str) -> tuple[bytes, str] | None:
        try:
            with open(os.path.join(self.root, key), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()[:32]

    def get(self, key: str) -> tuple[bytes, str] | None:
        return self._read(key)

    def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        path = os.path.join(self.root, key)
        with file_lock(self._flock):
            cur = self._read(key)
            if if_none_match and cur is not None:
                raise PreconditionFailed(key)
            if if_match is not None and (cur is None or cur[1] != if_match):
                raise PreconditionFailed(key)
            write_atomic(path, data)
        return hashlib.sha256(data).hexdigest()[:32]

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        with file_lock(self._flock):
            cur = self._read(key)
            if if_match is not None and (cur is None or cur[1] != if_match):
                raise PreconditionFailed(key)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.root, key))


def open_store(root: str, storage_options: StorageOptions | None = None) -> _Store:
    """The conditional store for `root`: S3 (s3://, s3a://) or a local folder."""
    proto = protocol_of(root)
    if proto in ("s3", "s3a"):
        return _S3Store(root, storage_options)
    if proto == "file":
        return _LocalStore(root)
    raise ValueError(
        f"index root {root!r}: publishing needs atomic conditional writes, supported on s3:// "
        f"and local folders, not on {proto}://"
    )
