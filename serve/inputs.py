"""Request inputs -> model input arrays: base64, `data:` URIs, allow-listed `s3://` URIs,
preprocessing on a thread pool.

What the ingress may read is decided here, on the URI string, before anything is fetched:
`s3_allowed` for request inputs, `media_allowed` for the search page's media endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import os
import re
import stat
import time
import urllib.parse
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

import imagebind_core as ibc
from serve.encoder import seconds_histogram
from serve.http import APIError, retry_after

if TYPE_CHECKING:
    from serve.options import AppArgs

log = logging.getLogger(__name__)

URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_INLINE_TEXT_CHARS = 2048
_WHITESPACE = {ord(c): None for c in " \t\r\n\v\f"}


class ByteBudget:
    """Bytes that the requests of one replica may hold at once, granted first come, first
    served: `async with budget.hold(n)` waits until `n` more fit (a request asking more than
    the whole budget waits until it can hold all of it alone). A waiter cancelled by its
    deadline or a closed connection leaves the queue; one granted gives its bytes back when
    its block ends, however it ends.

    Written here rather than taken from asyncio: `asyncio.Semaphore` counts units one by one
    and wakes waiters in no set order, so a stream of small requests could starve a large one.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        n = min(n, self.limit)
        if self._waiters or self.held + n > self.limit:
            fut = asyncio.get_running_loop().create_future()
            entry = (n, fut)
            self._waiters.append(entry)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():  # granted as it was cancelled
                    self._release(n)
                else:
                    self._waiters.remove(entry)
                    self._grant()  # the next in line may fit now
                raise
        else:
            self.held += n
        try:
            yield
        finally:
            self._release(n)

    def _release(self, n: int) -> None:
        self.held -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.held + self._waiters[0][0] <= self.limit:
            n, fut = self._waiters.popleft()
            self.held += n
            fut.set_result(None)


class Inputs:
    """Decodes and preprocesses the inputs of requests under the application's limits.

    Args:
        args: the application's arguments (limits, allow-lists, object-store options).
        pool: the threads that decode and preprocess (also used to read media).
    """

    def __init__(self, args: AppArgs, pool: ThreadPoolExecutor) -> None:
        self.args = args
        self.pool = pool
        self.budget = ByteBudget(args.ingress.max_held_input_bytes)
        self._storage_options: dict[str, Any] | None = None
        self._m_preprocess = seconds_histogram(
            "imagebind_preprocess_seconds", "Decode + preprocess time of one input.", ("modality",)
        )

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for s3:// inputs (made once)."""
        if self._storage_options is None:
            self._storage_options = self.args.storage_options()
        return self._storage_options

    # --- bytes -------------------------------------------------------------------------------
    def load_bytes(self, kind: str, index: int, value: str) -> bytes:
        """A media input's bytes from base64, a `data:` URI or an allow-listed `s3://` URI."""
        param = f"input[{index}]"
        if value[:5].lower() == "data:":  # RFC 2397; the media type is not trusted
            header, sep, payload = value.partition(",")
            if not sep:
                raise APIError(
                    400,
                    f"{param}: malformed data: URI (no comma)",
                    param=param,
                    code="invalid_input",
                )
            if not header.lower().endswith(";base64"):
                return self._check_size(param, urllib.parse.unquote_to_bytes(payload))
            value = payload
        else:
            m = URI_SCHEME.match(value)
            if m:
                return self._read_uri(kind, index, value, m.group(1).lower())
        # base64: refuse by length before decoding (4 characters carry 3 bytes, line breaks
        # none: they are counted out only when the length alone is over), then by the bytes.
        over = self.args.max_input_bytes + 3
        if _b64_size_bound(value) > over and _b64_size_bound(value.translate(_WHITESPACE)) > over:
            self._check_size(param, None)
        data = _b64decode(kind, param, value)
        if not data:
            raise ibc.InvalidInput(kind, "empty input", param)
        return self._check_size(param, data)

    def _check_size(self, param: str, data: bytes | None) -> bytes:
        """`data`, or 400 when it is over `max_input_bytes` (None: known to be over)."""
        limit = self.args.max_input_bytes
        if data is None or len(data) > limit:
            raise APIError(
                400, f"{param}: over the limit of {limit} bytes", param=param, code="too_large"
            )
        return data

    def _read_uri(self, kind: str, index: int, uri: str, scheme: str) -> bytes:
        param = f"input[{index}]"
        if scheme != "s3":
            raise APIError(
                400,
                f"{param}: {scheme}:// URIs are not accepted; only s3:// under the allowed "
                "prefixes",
                param=param,
                code="uri_not_allowed",
            )
        if not self.s3_allowed(uri):
            raise APIError(
                400,
                f"{param}: {uri!r} is not under an allowed prefix "
                f"({self.args.s3_allowed_prefixes or 'none configured'})",
                param=param,
                code="uri_not_allowed",
            )
        return ibc.read_bytes(
            uri, self.storage_options(), max_bytes=self.args.max_input_bytes, modality=kind
        )

    def read_media(self, item: dict) -> bytes:
        """The bytes of a published index item (at most `max_input_bytes`); InvalidInput when
        it is missing, too large or (a local file) not inside `media_local_dirs` when opened,
        StoreUnavailable when the store cannot be reached."""
        uri, kind = item["uri"], item["modality"]
        m = URI_SCHEME.match(uri)
        if m is None or m.group(1).lower() == "file":
            return self._read_local_media(uri[len("file://") :] if m else uri, kind)
        return ibc.read_bytes(
            uri, self.storage_options(), max_bytes=self.args.max_input_bytes, modality=kind
        )

    def _read_local_media(self, path: str, kind: str) -> bytes:
        """A local file's bytes, opened one path component at a time from the media folder
        that holds its resolved path, never following a link (`O_NOFOLLOW`): a file or folder
        swapped for a link between `media_allowed`'s check and the read (a race a writer of
        the corpus could win) fails the read instead of reading outside the folders. Links
        inside the corpus that stay inside still work: the path is resolved first."""
        limit = self.args.max_input_bytes
        try:
            real = os.path.realpath(path)
            root = next(
                (d for d in self.args.media_local_dirs if os.path.commonpath([real, d]) == d),
                None,
            )
            if root is None:
                raise ibc.InvalidInput(kind, "not inside media_local_dirs")
            parts = [p for p in os.path.relpath(real, root).split(os.sep) if p not in ("", ".")]
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for i, part in enumerate(parts):
                    last = i == len(parts) - 1
                    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                    # A FIFO would block an open for reading: never wait for a writer.
                    flags |= os.O_NONBLOCK if last else os.O_DIRECTORY
                    nxt = os.open(part, flags, dir_fd=fd)
                    os.close(fd)
                    fd = nxt
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise ibc.InvalidInput(kind, "not a regular file")
                if st.st_size > limit:
                    raise ibc.InvalidInput(kind, f"{st.st_size} bytes, over the limit of {limit}")
                with os.fdopen(os.dup(fd), "rb") as f:
                    data = f.read(limit + 1)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise ibc.InvalidInput(kind, "file not found") from None
        except OSError as e:  # ELOOP: a link where the check saw none; EISDIR, EACCES, ...
            raise ibc.InvalidInput(kind, f"cannot read it ({e.strerror or e})") from None
        if len(data) > limit:
            raise ibc.InvalidInput(kind, f"over the limit of {limit} bytes")
        return data

    # --- allow-lists -------------------------------------------------------------------------
    def s3_allowed(self, uri: str) -> bool:
        """Whether `uri` is under one of `s3_allowed_prefixes`. Checked on the string, before
        any request leaves this process; dot segments are refused so that no normalisation
        downstream can step outside a prefix."""
        parts = uri[len("s3://") :].split("/")
        allowed = any(uri.startswith(p) for p in self.args.s3_allowed_prefixes)
        return allowed and not any(p in (".", "..") for p in parts)

    def media_allowed(self, uri: str) -> bool:
        """Whether the media endpoints may read `uri`: an s3:// URI under the allowed prefixes,
        or a local file (a path or file://) inside one of `media_local_dirs`, symlinks
        resolved. Nothing else (https://, other schemes) is ever read for the page."""
        m = URI_SCHEME.match(uri)
        scheme = m.group(1).lower() if m else "file"
        if scheme == "s3":
            return self.s3_allowed(uri)
        if scheme != "file" or not self.args.media_local_dirs:
            return False
        try:
            path = os.path.realpath(uri[len("file://") :] if m else uri)
        except (OSError, ValueError):  # a link changing while it is resolved, a NUL byte
            return False
        return any(os.path.commonpath([path, d]) == d for d in self.args.media_local_dirs)

    # --- preprocessing -----------------------------------------------------------------------
    def prepare(self, kind: str, index: int, value: str) -> np.ndarray:
        """One media input -> its model input array. Runs on the preprocessing pool."""
        # The submodule, not `ibc.preprocess`: the package attribute of that name is lazy.
        from imagebind_core.preprocess import preprocess_array

        t0 = time.perf_counter()
        # compact: images go to the encoder replica as uint8 pixels, a quarter of the bytes of
        # the float input; the replica expands them (imagebind_core.expand)
        data = self.load_bytes(kind, index, value)
        x = preprocess_array(kind, data, item_id=f"input[{index}]")
        self._m_preprocess.observe(time.perf_counter() - t0, tags={"modality": kind})
        return x

    def prepare_texts(self, texts: list[str]) -> tuple[list[np.ndarray], int]:
        """Tokenise a request's texts in one call (`preprocess_texts`: one tokenizer pass for
        the batch, as the offline job does); the lowest-index bad text -> 400."""
        from imagebind_core.preprocess import preprocess_texts

        t0 = time.perf_counter()
        ids = [f"input[{i}]" for i in range(len(texts))]
        tokens, bad = preprocess_texts(texts, item_ids=ids)
        if bad:
            first = min(bad)
            raise self._refusal("text", first, bad[first])
        per_input = (time.perf_counter() - t0) / max(1, len(texts))
        for _ in texts:
            self._m_preprocess.observe(per_input, tags={"modality": "text"})
        return list(tokens), int(np.count_nonzero(tokens))  # padding is token id 0

    def held(self, kind: str, n: int) -> contextlib.AbstractAsyncContextManager[None]:
        """Room in this replica's budget (`ingress.max_held_input_bytes`) for `n` preprocessed
        inputs of `kind`, held from before they are decoded until their vectors are back: a
        burst of video requests waits for it instead of exhausting the replica's memory (a
        video is 18 MB of float32 clips, 64 of them 1.2 GB)."""
        from imagebind_core.preprocess import item_nbytes

        return self.budget.hold(n * item_nbytes(kind, compact=True))

    async def prepare_all(self, kind: str, inputs: list[str]) -> tuple[list[np.ndarray], int]:
        """Preprocess every input on the pool; the lowest-index bad input -> 400."""
        if kind == "text":
            try:
                if sum(map(len, inputs)) <= _INLINE_TEXT_CHARS:
                    # Tokenising a few short texts takes microseconds: cheaper on the event
                    # loop than a thread hand-off, which costs milliseconds on a busy machine.
                    return self.prepare_texts(inputs)
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self.pool, self.prepare_texts, inputs)
            except ibc.WorkerBroken as e:
                raise self._refusal(kind, 0, e) from e
        loop = asyncio.get_running_loop()
        # The pool is shared and first-in first-out: a request queues at most one pool's worth
        # of its inputs at a time, so requests' inputs interleave. Queued all at once, 64 heavy
        # images of one request held every later request's media for their whole decode.
        slots = asyncio.Semaphore(self.args.ingress.preprocess_threads)

        async def one(i: int, v: str) -> Any:
            async with slots:
                return await loop.run_in_executor(self.pool, self.prepare, kind, i, v)

        results = await asyncio.gather(
            *(one(i, v) for i, v in enumerate(inputs)), return_exceptions=True
        )
        for i, r in enumerate(results):
            if isinstance(r, BaseException):
                raise self._refusal(kind, i, r)
        return results, 0  # tokens count texts only

    def _refusal(self, kind: str, index: int, e: BaseException) -> BaseException:
        """What input `index` failing with `e` answers: 400 for a bad input, 503 when the store
        cannot be reached (the store or this endpoint's credentials, not the request) or this
        replica can no longer preprocess (WorkerBroken: its health check fails and Serve
        replaces it), else `e` itself."""
        param = f"input[{index}]"
        if isinstance(e, ibc.InvalidInput):
            return APIError(
                400, f"{param}: invalid {kind} input: {e.reason}", param=param, code="invalid_input"
            )
        if isinstance(e, ibc.StoreUnavailable):
            log.warning("%s: %s", param, e)
            return APIError(
                503,
                f"{param}: {e}; retry later",
                type="server_error",
                param=param,
                code="store_unavailable",
                headers=retry_after(self.args.retry_after_s),
            )
        if isinstance(e, ibc.WorkerBroken):
            log.error("%s: %s", param, e)
            return APIError(
                503,
                f"{param}: this replica cannot preprocess {kind} inputs any more and is being "
                "replaced; retry later",
                type="server_error",
                param=param,
                code="replica_broken",
                headers=retry_after(self.args.retry_after_s),
            )
        return e


def _b64_size_bound(value: str) -> int:
    """At least the bytes `value` decodes to, give or take its padding (<= 2)."""
    return len(value) // 4 * 3


def _b64decode(kind: str, param: str, value: str) -> bytes:
    """What clients send: line-wrapped (MIME, `base64` without -w0), the URL-safe alphabet,
    padding dropped. All are unambiguous; anything else is a 400."""
    compact = value.translate(_WHITESPACE)
    if "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(
            400,
            f"{param}: not valid base64 ({e}); send {kind} inputs as base64 (standard or "
            "URL-safe alphabet), a data: URI or an allowed s3:// URI",
            param=param,
            code="invalid_input",
        ) from None
