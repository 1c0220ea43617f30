"""Object-store I/O through fsspec: local paths, `file://`, `s3://` (any S3-compatible endpoint),
`https://`. The one place that turns a URI plus options into bytes, shared by the checkpoint
loader, the offline job and the endpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec

from imagebind_core.errors import InvalidInput, StoreUnavailable

StorageOptions = Mapping[str, Any]


# Timeouts and attempts of each S3 request (botocore's client config). s3fs retries each call
# that times out 5 times more on top of botocore's attempts (a constant of s3fs), so a store that
# accepts connections and never answers holds one operation for about
# 5 x S3_MAX_ATTEMPTS x S3_READ_TIMEOUT_S (7.5 min here); botocore's defaults (60 s, 5 legacy
# attempts) made that 25 min before any caller of ours retried it again.
S3_CONNECT_TIMEOUT_S = 10.0
S3_READ_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 3


def s3_storage_options(
    endpoint_url: str | None = None,
    region: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    anon: bool = False,
    connect_timeout_s: float = S3_CONNECT_TIMEOUT_S,
    read_timeout_s: float = S3_READ_TIMEOUT_S,
    max_attempts: int = S3_MAX_ATTEMPTS,
) -> dict[str, Any]:
    """fsspec/s3fs options for an S3-compatible store (AWS, MinIO, moto, ...).

    Credentials left as None fall back to the usual AWS chain (env vars, profile, instance role).
    `connect_timeout_s`, `read_timeout_s` (the longest wait for the next bytes of a response)
    and `max_attempts` (per request, the first included; botocore's "standard" retry mode:
    timeouts, connection errors, throttling and 5xx are retried with backoff) bound how long
    a request to a store that stops answering can take.
    """
    opts: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    if endpoint_url:
        opts["endpoint_url"] = endpoint_url
    if region:
        client_kwargs["region_name"] = region
    if key is not None:
        opts["key"] = key
    if secret is not None:
        opts["secret"] = secret
    if anon:
        opts["anon"] = True
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    opts["config_kwargs"] = {
        "connect_timeout": connect_timeout_s,
        "read_timeout": read_timeout_s,
        "retries": {"mode": "standard", "total_max_attempts": max_attempts},
    }
    return opts


def protocol_of(uri: str) -> str:
    """`s3`, `https`, `file`, ... (`file` for plain paths)."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def options_for(uri: str, storage_options: StorageOptions | None) -> dict[str, Any]:
    """Storage options apply to object stores only; local paths take none."""
    if protocol_of(uri) in ("s3", "s3a"):
        return dict(storage_options or {})
    return {}


# The URI schemes inputs, outputs, items and checkpoints may use (local paths are `file`).
SCHEMES = ("file", "s3", "s3a", "http", "https")


def filesystem(uri: str, storage_options: StorageOptions | None = None):
    """Return (fsspec filesystem, path within it) for `uri`."""
    if protocol_of(uri) == "file":
        # Local paths go straight to the local filesystem: fsspec's URL parsing would read
        # `a::b.jpg` as a chained URL and `a#b` as a fragment, and such names are legal files.
        return fsspec.filesystem("file"), _local_path(uri)
    # Never `fsspec.core.url_to_fs`: it reads `::` anywhere in the string as a chain of URLs
    # (`s3://bucket/a::http://host/x` would open `http://host/x` through an S3 cache), and a
    # user-supplied URI must name one object in one store. `::` is a legal character of an S3
    # key and stays part of the key here.
    protocol = protocol_of(uri)
    if protocol not in SCHEMES:
        # fsspec knows many more (gs, hdfs, ftp, ...), but opening them fails in ways that
        # name no URI (a missing driver's ImportError, libjvm, a TypeError for ftp), and the
        # product is built and tested on these.
        raise ValueError(
            f"unsupported URI scheme {protocol!r} in {uri!r}: use a local path, file://, "
            "s3:// (any S3-compatible store: storage.endpoint_url) or, for items, http(s)://"
        )
    cls = fsspec.get_filesystem_class(protocol)
    fs = fsspec.filesystem(protocol, **options_for(uri, storage_options))
    return fs, cls._strip_protocol(uri)


def _local_path(uri: str) -> str:
    """The absolute path of a local `uri` (a path or file://)."""
    path = uri[len("file://") :] if uri.lower().startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def canonical_uri(uri: str) -> str:
    """One spelling per location, to compare inputs across runs.

    A local path becomes absolute (no `file://`, no trailing `/`); an object-store URI gets a
    lower-case scheme and loses its trailing `/`.
    """
    if protocol_of(uri) == "file":
        return filesystem(uri)[1].rstrip("/") or "/"
    scheme, rest = uri.split("://", 1)
    return f"{scheme.lower()}://{rest.rstrip('/')}"


def store_name(uri: str, storage_options: StorageOptions | None = None) -> str:
    """The store behind `uri`, for messages: the configured endpoint URL, else the scheme's
    default (e.g. `s3 (default endpoint)`)."""
    protocol = protocol_of(uri)
    endpoint = options_for(uri, storage_options).get("endpoint_url")
    if endpoint:
        return str(endpoint)
    if protocol in ("http", "https"):
        return uri.split("/", 3)[2] if uri.count("/") >= 2 else uri
    return f"{protocol} (default endpoint)"


def _unavailable_reason(e: BaseException) -> str | None:
    """Why the store (not the object) failed, or None if `e` is about the object.

    No credentials and connection failures (refused, DNS, timeouts) are the store's; a missing
    or unreadable object is the item's.
    """
    try:
        from botocore import exceptions as be
    except ImportError:  # no S3 support installed
        be = None
    if be is not None:
        if isinstance(e, be.NoCredentialsError | be.PartialCredentialsError):
            return f"no credentials to sign requests with ({e})"
        if isinstance(e, be.CredentialRetrievalError):
            return f"credentials could not be retrieved ({e})"
        if isinstance(e, be.ConnectionError | be.HTTPClientError):
            return f"cannot connect ({e})"
    if isinstance(e, ConnectionError | TimeoutError):
        return f"cannot connect ({e})"
    return None


def read_bytes(
    uri: str,
    storage_options: StorageOptions | None = None,
    *,
    max_bytes: int | None = None,
    modality: str = "file",
) -> bytes:
    """Read a whole object, refusing (InvalidInput) one larger than `max_bytes` or missing.

    A store that cannot be reached, or that there are no credentials for, raises
    `StoreUnavailable` instead: that is not the item's fault.

    The size is checked before the body is read when the store reports it, and again while
    reading, so a lying server cannot make us buffer more than `max_bytes` + 1.
    """
    try:
        if protocol_of(uri) == "file":
            data = _read_local(_local_path(uri), uri, max_bytes, modality)
        else:
            data = _read_remote(uri, storage_options, max_bytes, modality)
    except InvalidInput:
        raise
    except FileNotFoundError:
        raise InvalidInput(modality, f"object not found: {uri}", uri) from None
    except Exception as e:
        unavailable = _unavailable_reason(e)
        if unavailable is None:
            if isinstance(e, OSError | ValueError):
                raise InvalidInput(modality, f"cannot read {uri}: {e}", uri) from None
            raise
        raise StoreUnavailable(store_name(uri, storage_options), unavailable, uri) from e
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidInput(modality, f"object is over the limit of {max_bytes} bytes", uri)
    return data


def _read_remote(
    uri: str, storage_options: StorageOptions | None, max_bytes: int | None, modality: str
) -> bytes:
    fs, path = filesystem(uri, storage_options)
    if max_bytes is not None:
        try:
            size = fs.size(path)
        except (FileNotFoundError, OSError):
            raise
        except Exception as e:  # some HTTP servers do not report a size
            if _unavailable_reason(e) is not None:
                raise
            size = None
        if size is not None and size > max_bytes:
            raise InvalidInput(
                modality, f"object is {size} bytes, over the limit of {max_bytes}", uri
            )
    with fs.open(path, "rb") as f:
        return f.read() if max_bytes is None else f.read(max_bytes + 1)


def _read_local(path: str, uri: str, max_bytes: int | None, modality: str) -> bytes:
    """A local file's bytes: one open, one fstat, one read (not fsspec's stat, size and
    buffered open: a local corpus's reads cost about half as much CPU,
    benchmarks/results/pipeline-cpu-2core.md). Opened without blocking, so that a FIFO (whose
    open waits for a writer) and a device (/dev/zero never ends) are refused by the fstat of
    what was opened, not hung on; the size is checked before the read and what is read is
    bounded by the limit."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)  # FileNotFoundError: "object not found", as for any store
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise InvalidInput(modality, f"cannot read {uri}: {what}", uri)
        if max_bytes is not None and st.st_size > max_bytes:
            raise InvalidInput(
                modality, f"object is {st.st_size} bytes, over the limit of {max_bytes}", uri
            )
        # Read to the end, but never more than the limit + 1 bytes (the caller refuses that):
        # a file may have grown since the fstat, and some report no size at all (/proc's).
        # The first read asks for the fstat's size and a byte more, so a file of the size it
        # reports takes one read and one that finds its end, and no copy.
        limit = None if max_bytes is None else max_bytes + 1
        chunks: list[bytes] = []
        size, want = 0, st.st_size + 1
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while limit is None or size < limit:
                chunk = f.read(want if limit is None else min(want, limit - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                want = max(st.st_size, 1 << 20)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def listed_sizes(fs: Any, path: str) -> dict[str, int]:
    """{path: size} of the files directly in the folder `path` of `fs` (empty when it does not
    exist), listed afresh: fsspec's listing cache is dropped first, since a size is read to
    check what is there now (what a run committed, what an index segment holds)."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {e["name"]: int(e.get("size") or 0) for e in entries if e.get("type") == "file"}


def base_name(path: str) -> str:
    """The last part of a listed path (fsspec names folders with or without a trailing /)."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def local_cache_dir() -> str:
    """Where downloaded checkpoints are cached: $IMAGEBIND_CACHE or ~/.cache/imagebind-ray."""
    return os.environ.get(
        "IMAGEBIND_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "imagebind-ray")
    )


def durable_tmp(path: str, data: bytes) -> str:
    """`data` written and fsynced to a hidden temporary file beside local `path` (its folder
    created); the caller renames or links it into place."""
    d, name = os.path.split(path)
    os.makedirs(d or ".", exist_ok=True)
    tmp = os.path.join(d, f".{name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def is_durable_tmp(name: str) -> bool:
    """Whether a file name is one of `durable_tmp`'s (a writer that died before its rename or
    link left it behind)."""
    return name.startswith(".") and name.endswith(".tmp")


def write_atomic(path: str, data: bytes) -> None:
    """Write local `path` so that readers see the old content or the new, never a mix: a
    durable temporary file renamed into place."""
    os.replace(durable_tmp(path, data), path)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive `flock` on the local file `path` while the block runs (between
    processes of one host).

    The lock file exists only while someone holds it: created, locked, checked to still be the
    file at its path (a holder that finished may have removed it after we opened it; then we
    lock the new one), and removed by the holder before it unlocks.
    """
    while True:
        f = open(path, "a+b")  # noqa: SIM115 (closed below, after the unlink)
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            f.close()
            raise
        if same:
            break
        f.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        f.close()  # releases the flock
