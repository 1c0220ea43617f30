"""HTTP plumbing of the ingress: errors in OpenAI's shape, auth, the body and its deadline, JSON.

Every client fault is an `APIError` (a 4xx in the shape `{"error": {"message", "type",
"param", "code"}}`); a 500 means a bug. `RequestPolicy` holds what the application's arguments
say about a request before its content is looked at: the API key, the body limit, the deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import difflib
import hmac
import json
import os
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from serve.options import AppArgs

TIMEOUT_HEADER = "x-request-timeout"
# A body gets this long to start, plus the time its bytes take at `body_min_rate` (AppArgs), and
# at most max(request deadline, this): else 408. A client stalled mid-upload holds one of the
# ingress's slots (`max_ongoing_requests`), which every request, health checks included, waits
# for; ~130 stalled uploads held them all for the whole deadline. The floor also keeps a tiny
# X-Request-Timeout from turning the proxy's own body hand-off into a "client too slow".
BODY_READ_MIN_S = 5.0
CLIENT_CLOSED = 499  # nginx's status for a client that went away: counted, never answered

M = TypeVar("M", bound=BaseModel)


# The longest error message sent: messages quote what was sent (an unknown id, a value), and
# a 30 MB id came back whole as a 30 MB error body.
MAX_MESSAGE_CHARS = 2000


class APIError(Exception):
    """A request that cannot be served, as an HTTP status plus OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if len(message) > MAX_MESSAGE_CHARS:  # a message quoting what the client sent
            cut = len(message) - MAX_MESSAGE_CHARS
            message = f"{message[:MAX_MESSAGE_CHARS]}... ({cut:,} more characters)"
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        """The JSON response for this error."""
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def unknown_field_message(name: str, schema: type[BaseModel]) -> str:
    """`unknown field 'inputs' (did you mean 'input'?)`, or the list of the known fields."""
    known = list(schema.model_fields)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"unknown field {name!r} (did you mean {close[0]!r}?)"
    return f"unknown field {name!r}; the fields of this request are {', '.join(known)}"


# What a JSON value is, in JSON's words, for "input[2] is a number, not a string".
_JSON_TYPES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (type(None), "null"),
    (bool, "a boolean"),
    ((int, float), "a number"),
    (str, "a string"),
    (dict, "an object"),
    (list, "an array"),
)
# What an element of a list field must be, by pydantic's error type.
_WANTED = {
    "string_type": "a string",
    "float_type": "a number",
    "int_type": "an integer",
    "bool_type": "a boolean",
}


def json_type(value: Any) -> str:
    """`null`, `a number`, `an object`, ...: what a parsed JSON value is."""
    return next((name for t, name in _JSON_TYPES if isinstance(value, t)), type(value).__name__)


def _element_error(err: Mapping[str, Any], hints: Mapping[str, str]) -> tuple[str, str] | None:
    """`("input[2] is a number, not a string: input must be ...", "input[2]")` for an element
    of a list field of the wrong type; None for any other error. Union members' tags in the
    location (`input.list[str].2`) are left out."""
    parts = [p for p in err.get("loc", ()) if not (isinstance(p, str) and "[" in p)]
    wanted = _WANTED.get(err.get("type", ""))
    if wanted is None or len(parts) != 2 or not isinstance(parts[1], int):
        return None
    field, index = parts
    name = f"{field}[{index}]"
    got = json_type(err.get("input"))
    if got == wanted:  # the right type, out of its range (an integer of 400 digits)
        msg = f"{name} is {got} out of range (a float holds magnitudes up to about 1.8e308)"
    else:
        msg = f"{name} is {got}, not {wanted}"
    if field in hints:
        msg += f": {field} {hints[field]}"
    return msg, name


def validation_message(
    e: ValidationError, schema: type[BaseModel] | None = None
) -> tuple[str, str | None, str]:
    """The error to report as `field: message`, the field as `param`, and the error code.

    An unknown top-level field comes first, named with the closest known one: `{"inputs":
    ...}` is a typo of `input`, not a request missing its input. Then an element of a list of
    the wrong type, named with its index (`input[2]`) and what it is (`a number`)."""
    errors = e.errors()
    for err in errors:
        loc = err.get("loc", ())
        if err.get("type") == "extra_forbidden" and len(loc) == 1 and schema is not None:
            return unknown_field_message(str(loc[0]), schema), str(loc[0]), "unknown_field"
    hints = getattr(schema, "field_hints", {})
    for err in errors:
        element = _element_error(err, hints)
        if element is not None:
            return element[0], element[1], "invalid_request"
    err = errors[0]
    parts = [str(p) for p in err.get("loc", ())]
    msg = err.get("msg", "invalid value")
    if err.get("type") == "value_error" and "error" in err.get("ctx", {}):
        msg = str(err["ctx"]["error"])  # a validator's own sentence, without "Value error, "
    # What a field of this schema must be (`field_hints`), for a value of the wrong type:
    # pydantic's own message for a union names each member tried (`input.str`).
    if parts and parts[0] in hints and err.get("type") != "missing":
        return f"{parts[0]} {hints[parts[0]]}", parts[0], "invalid_request"
    loc = ".".join(parts)
    return (f"{loc}: {msg}" if loc else msg), (loc or None), "invalid_request"


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (which one wins differs between parsers: a
    proxy that checks the first and a server that uses the last is a known attack)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# A `\uD800`-`\uDFFF` escape: only then can a parsed string hold an unpaired surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: Any, path: str) -> tuple[str, int] | None:
    """(where, code point) of the first string in `value` holding an unpaired surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, ord(value[e.start])
        return None
    items: Any = ()
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else k, v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    for where, v in items:
        found = _lone_surrogate(v, where)
        if found is not None:
            return found
    return None


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object: UTF-8, standard JSON (no NaN/Infinity), each key of
    an object once, no unpaired UTF-16 surrogate in a string; else a 400 saying which.

    The standard library's C parser with a pairs hook: on this box as fast as orjson (2M
    short texts: ~130 ms; a 16 MB base64 image: ~12 ms), and it sees every key."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(
            400,
            f"the body is not valid UTF-8 (byte {e.start}): send JSON encoded as UTF-8",
            code="invalid_request",
        ) from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _DuplicateKey as e:
        key = str(e.args[0])
        raise APIError(
            400,
            f"duplicate key {key!r} in the JSON body: give each field once",
            param=key,
            code="duplicate_key",
        ) from None
    except json.JSONDecodeError as e:
        raise APIError(
            400,
            f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}",
            code="invalid_request",
        ) from None
    except RecursionError:
        raise APIError(400, "invalid JSON: nested too deeply", code="invalid_request") from None
    except ValueError as e:  # NaN/Infinity, an integer of over 4300 digits
        raise APIError(400, f"invalid JSON: {e}", code="invalid_request") from None
    if not isinstance(obj, dict):
        raise APIError(
            400, f"the body must be a JSON object, got {json_type(obj)}", code="invalid_request"
        )
    if _SURROGATE_ESCAPE.search(body):
        found = _lone_surrogate(obj, "")
        if found is not None:
            where, code = found
            raise APIError(
                400,
                f"{where}: the text holds an unpaired UTF-16 surrogate (\\u{code:04x}), which "
                "is not a character: send valid Unicode (a surrogate pair, or the character "
                "itself in UTF-8)",
                param=where,
                code="invalid_request",
            )
    return obj


_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,9}")


def check_query(request: Request, names: tuple[str, ...], whole: tuple[str, ...] = ()) -> None:
    """400 for a query parameter of `names` given more than once (`?id=a&id=b`: which one the
    client meant is not ours to guess), or one of `whole` that is not written as a whole number
    in digits: FastAPI's lax parsing takes `256.0`, `+256`, `2_56` and ` 256 ` for 256."""
    for name in names:
        values = request.query_params.getlist(name)
        if len(values) > 1:
            raise APIError(
                400,
                f"{name}: given {len(values)} times (query parameter); give it once",
                param=name,
                code="duplicate_parameter",
            )
        if values and name in whole and not _WHOLE_NUMBER.fullmatch(values[0]):
            raise APIError(
                400,
                f"{name}: expected a whole number written in digits "
                f"(query parameter, got {values[0]!r})",
                param=name,
                code="invalid_request",
            )


def retry_after(seconds: float, floor: int = 1) -> dict[str, str]:
    """The `Retry-After` header of a 503: `seconds` rounded, at least `floor`."""
    return {"Retry-After": str(max(floor, round(seconds)))}


def api_key(args: AppArgs) -> bytes | None:
    """The bearer token clients must send: `api_key`, else the variable named by `api_key_env`
    (an empty one is an error: an operator who named a secret expects auth to be on)."""
    key = args.api_key
    if key is None and args.api_key_env:
        key = os.environ.get(args.api_key_env) or None
        if key is None:
            raise RuntimeError(
                f"api_key_env={args.api_key_env!r} is set but that environment variable "
                "is empty in the ingress replica"
            )
    return key.encode() if key else None


class RequestPolicy:
    """Auth, body limit and deadline of every request, from the application's arguments."""

    def __init__(self, args: AppArgs) -> None:
        self.max_body_bytes = args.max_body_bytes
        self.body_min_rate = args.body_min_rate
        self.request_timeout_s = args.request_timeout_s
        self.retry_after_header = retry_after(args.retry_after_s)
        self._api_key = api_key(args)

    def check_auth(self, request: Request) -> None:
        """401 unless auth is off or the bearer token matches (constant-time compare)."""
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._api_key
        ):
            raise APIError(
                401,
                "missing or invalid API key: send `Authorization: Bearer <key>`",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def read_body(
        self, request: Request, stream: AsyncIterator[bytes] | None = None
    ) -> bytes:
        """The request body (from `stream`, default the request's), refusing (413) one over
        `max_body_bytes` before buffering it and (415) a compressed one."""
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise APIError(
                415,
                f"Content-Encoding {encoding!r} is not supported: send the JSON body uncompressed",
                code="unsupported_encoding",
            )
        limit = self.max_body_bytes
        too_big = APIError(
            413,
            f"request body is over the limit of {limit} bytes",
            code="request_too_large",
        )
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise too_big
            except ValueError:
                raise APIError(
                    400,
                    f"Content-Length is not a number: {declared!r}",
                    param="Content-Length",
                    code="invalid_header",
                ) from None
        body = bytearray()
        async for part in stream if stream is not None else request.stream():
            body += part
            if len(body) > limit:
                raise too_big
        return bytes(body)

    async def read_body_in_time(self, request: Request, deadline_s: float) -> bytes:
        """`read_body`, or 408 when the body arrives too slowly: by BODY_READ_MIN_S plus the
        time its bytes so far take at `body_min_rate`, and within max(deadline, that floor)."""
        cap = max(deadline_s, BODY_READ_MIN_S)
        rate = self.body_min_rate
        start = time.monotonic()
        got = 0

        async def paced() -> AsyncIterator[bytes]:
            nonlocal got
            parts = request.stream().__aiter__()
            while True:
                allowed = min(cap, BODY_READ_MIN_S + got / rate)
                async with asyncio.timeout(allowed - (time.monotonic() - start)):
                    try:
                        part = await parts.__anext__()
                    except StopAsyncIteration:
                        return
                got += len(part)
                yield part

        try:
            return await self.read_body(request, paced())
        except TimeoutError:
            took = time.monotonic() - start
            if took < cap - 0.5:
                why = (
                    f"request body too slow: {got} bytes in {took:.0f} s (it must start "
                    f"within {BODY_READ_MIN_S:g} s and then arrive at {rate} bytes/s or more)"
                )
            else:
                why = f"request body not received within {cap:g} s"
            raise APIError(408, why, code="request_timeout") from None

    def deadline_s(self, request: Request) -> float:
        """The server's request timeout, shortened by an `X-Request-Timeout` header (seconds)."""
        limit = self.request_timeout_s
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return limit
        try:
            asked = float(raw)
        except ValueError:
            raise APIError(
                400,
                f"{TIMEOUT_HEADER} must be a number of seconds, got {raw!r}",
                param=TIMEOUT_HEADER,
                code="invalid_header",
            ) from None
        if not asked > 0:
            raise APIError(
                400,
                f"{TIMEOUT_HEADER} must be positive, got {raw!r}",
                param=TIMEOUT_HEADER,
                code="invalid_header",
            )
        return min(limit, asked)

    @contextlib.asynccontextmanager
    async def json_request(self, request: Request, schema: type[M]) -> AsyncIterator[M]:
        """Read the body (408 if it does not arrive in time) and validate it into `schema`
        (400 naming the field), then run the block under what is left of the request's
        deadline (504 when it runs out)."""
        deadline = self.deadline_s(request)
        started = time.monotonic()
        body = await self.read_body_in_time(request, deadline)
        async with self._until(deadline, deadline - (time.monotonic() - started)):
            try:
                req = schema.model_validate(parse_json_object(body))
            except ValidationError as e:
                msg, param, code = validation_message(e, schema)
                raise APIError(400, msg, param=param, code=code) from None
            yield req

    def deadline(self, request: Request) -> contextlib.AbstractAsyncContextManager[None]:
        """Run the block of a request without a body (a GET) under its deadline (504 when it
        runs out)."""
        deadline = self.deadline_s(request)
        return self._until(deadline, deadline)

    @staticmethod
    @contextlib.asynccontextmanager
    async def _until(deadline: float, left: float) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(max(0.0, left)):
                yield
        except TimeoutError:
            raise APIError(
                504,
                f"request timed out after {deadline:g} s",
                type="server_error",
                code="timeout",
            ) from None


def encode_vector(v: np.ndarray, fmt: str) -> np.ndarray | str:
    """float: a float32 array (a JSON list in `json_response`); base64: little-endian float32
    bytes, as OpenAI sends them."""
    if fmt == "base64":
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
    return np.ascontiguousarray(v, dtype=np.float32)


def json_response(content: Any, status_code: int = 200, headers: dict | None = None) -> Response:
    """JSON with numpy arrays written by orjson: float32 values in their shortest exact form
    (~11 characters instead of the ~19 of `json.dumps` on Python floats), 0.02 ms instead of
    0.5 ms for one 1024-d vector; a client parsing them back to float32 gets the same bits."""
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")
