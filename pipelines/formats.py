"""The three input formats of the embedding job and how each yields item rows, local or on an
object store (`s3://...`):

- `manifest`: Parquet / CSV / JSONL files (each file one shard) with columns `uri` and
  `modality`, optionally `id`, inline `text`, and `fingerprint`/`size`/`mtime`. A relative
  `uri` is resolved against the manifest's folder.
- `webdataset`: tar shards as img2dataset / video2dataset write them; every member whose
  suffix names a media kind (`key.jpg`, `key.txt`, `key.wav`, ...) is one item, so one
  sample yields several rows. `key.json` and unknown suffixes are metadata, not items.
- `files`: a folder, prefix or glob of media files, kind from the extension (overridable);
  files are grouped into shards by a stable hash of their relative path (`pipelines.plan`).

Each format's `*_rows` function yields the item rows of one shard, used alike by the read
task and by the listing of re-indexing (`pipelines.plan.FORMATS` maps a format's name to it and
to its planning).

Ids are stable across reruns and derive from the source key, never from block layout:
manifest `id` (else its `uri` as written, else `<shard>#<row>` for inline text), `<shard>#<member>`
for WebDataset (`wds_id`: the tar's path without its suffix, `%` and `#` in it written `%25` and
`%23`, so the first `#` always ends the shard and no two members of a corpus share an id), the
relative path for files. An id is embedded once per corpus: a manifest row that repeats an
id of an earlier row — in the same manifest or in a manifest earlier in name order — is
skipped with a warning (first occurrence wins, the same on every rerun; `id_digests`,
`repeated_rows`).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import tarfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

import imagebind_core as ibc
from imagebind_core.io import StorageOptions, filesystem
from imagebind_core.kinds import KINDS
from pipelines.rows import (
    INVALID,
    STATUS_ERROR,
    STATUS_OK,
    first_occurrences,
    item_row,
    member_fingerprint,
    unreadable_shard_row,
)

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".parquet", ".csv", ".csv.gz", ".jsonl", ".jsonl.gz", ".ndjson", ".json")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
KIND_ALIASES = {"image": "vision", "img": "vision", "photo": "vision"}


class PlanError(ValueError):
    """The input cannot be planned (nothing found, unreadable manifest, name clash...)."""


class EmptyInput(PlanError):
    """The input exists but holds no items (every file deleted, or none with a media kind)."""


def normalise_kind(value: Any) -> str | None:
    """A manifest `modality` value as a kind ("image" is accepted for "vision"), or None."""
    if value is None:
        return None
    k = str(value).strip().lower()
    k = KIND_ALIASES.get(k, k)
    return k if k in KINDS else None


def file_kind(
    name: str, forced: str | None = None, extensions: Mapping[str, str] = {}
) -> str | None:
    """Kind of a media file: `forced`, else an `extensions` override, else `infer_kind`."""
    if forced:
        return forced
    low = name.lower()
    for suffix, kind in sorted(extensions.items(), key=lambda kv: -len(kv[0])):
        s = suffix.lower()
        if low.endswith(s if s.startswith(".") else "." + s):
            return kind
    return ibc.infer_kind(name)


# ----------------------------------------------------------------------------- manifests


_MANIFEST_STRINGS = ("id", "uri", "modality", "text", "fingerprint")


def read_manifest(uri: str, storage_options: StorageOptions | None = None) -> pa.Table:
    """Read one manifest file; `id`, `uri`, `modality`, `text`, `fingerprint` become strings,
    `size` int64 and `mtime` float64 seconds (timestamps and ISO dates are converted).

    A 0-byte file is an empty manifest. Raises PlanError naming the file if it cannot be read,
    lacks the required columns, or has a `size`/`mtime` column of the wrong kind.
    """
    table = _read_manifest_file(uri, storage_options)
    if "modality" not in table.column_names or (
        "uri" not in table.column_names and "text" not in table.column_names
    ):
        raise PlanError(
            f"manifest {uri}: needs columns 'uri' (or inline 'text') and 'modality'; "
            f"it has {table.column_names}"
        )
    return _manifest_column_types(table, uri)


def _read_manifest_file(uri: str, storage_options: StorageOptions | None) -> pa.Table:
    low = uri.lower()
    fs, path = filesystem(uri, storage_options)
    try:
        if fs.size(path) == 0:
            empty = pa.array([], pa.string())
            return pa.table({"uri": empty, "modality": empty})
        with fs.open(path, "rb", compression="infer") as f:
            if low.endswith(".parquet"):
                return pq.read_table(f)
            if low.endswith((".csv", ".csv.gz")):
                return pacsv.read_csv(
                    f,
                    convert_options=pacsv.ConvertOptions(
                        column_types={c: pa.string() for c in _MANIFEST_STRINGS},
                        strings_can_be_null=True,
                        # As in JSON Lines: a text that is not UTF-8 fails its own row
                        # (`imagebind_core.preprocess`), not the file; the other columns are
                        # checked by `_check_utf8`.
                        check_utf8=False,
                    ),
                )
            return pajson.read_json(f)
    except Exception as e:
        hint = ""
        if low.endswith((".json", ".jsonl", ".jsonl.gz", ".ndjson")) and _starts_with(
            fs, path, b"["
        ):
            hint = " (a JSON manifest is JSON Lines: one object per line, not an array)"
        raise PlanError(f"manifest {uri}: cannot read it: {e}{hint}") from None


def _check_utf8(col: pa.Array | pa.ChunkedArray, name: str, uri: str) -> None:
    """PlanError naming the row if a string column holds bytes that are not UTF-8 (CSV and
    JSON Lines readers leave them unchecked; ids, uris and modalities feed string kernels that
    would fail on them mid-run)."""
    start = 0
    for chunk in col.chunks if isinstance(col, pa.ChunkedArray) else [col]:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            for i, v in enumerate(chunk.cast(pa.binary()).to_pylist()):
                try:
                    if v is not None:
                        v.decode("utf-8")
                except UnicodeDecodeError as e:
                    row = start + i + 1
                    raise PlanError(
                        f"manifest {uri}: column {name!r} is not valid UTF-8 in row {row} "
                        f"({v!r}: {e.reason} at byte {e.start}); a manifest is UTF-8 text "
                        "(convert it, e.g. with iconv)"
                    ) from None
            raise
        start += len(chunk)


def _manifest_column_types(table: pa.Table, uri: str) -> pa.Table:
    for c in _MANIFEST_STRINGS:
        if c not in table.column_names:
            continue
        col = table.column(c)
        if c == "id" and pa.types.is_floating(col.type):
            col = pa.array([_float_id(v) for v in col.to_pylist()], pa.string())
        elif col.type != pa.string():
            try:
                col = col.cast(pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise PlanError(
                    f"manifest {uri}: column {c!r} of type {col.type} cannot be read as "
                    f"strings: {e}"
                ) from None
        if c == "text":  # "" is no text, as CSV reads it, whatever the file format
            col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
        else:
            _check_utf8(col, c, uri)
        table = table.set_column(table.column_names.index(c), c, col)
    for c, convert in (("size", _as_int64), ("mtime", _as_seconds)):
        if c in table.column_names:
            try:
                col = convert(table.column(c))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError) as e:
                raise PlanError(
                    f"manifest {uri}: column {c!r} of type {table.column(c).type} cannot be read "
                    f"as {'bytes (an integer)' if c == 'size' else 'a time'}: {e}"
                ) from None
            table = table.set_column(table.column_names.index(c), c, col)
    return table


def _starts_with(fs: fsspec.AbstractFileSystem, path: str, prefix: bytes) -> bool:
    try:
        with fs.open(path, "rb", compression="infer") as f:
            return f.read(256).lstrip().startswith(prefix)
    except Exception:
        return False


def _float_id(v: float | None) -> str | None:
    # pandas stores an integer id column with a gap as float64: 7.0 is id "7", NaN is no id.
    if v is None or v != v:
        return None
    return str(int(v)) if float(v).is_integer() else repr(v)


def _as_int64(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return col if col.type == pa.int64() else col.cast(pa.int64())


_PER_SECOND = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


def _as_seconds(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """An mtime column as float64 seconds since the epoch (numbers are taken as seconds)."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_date(t):
        col, t = col.cast(pa.timestamp("us")), pa.timestamp("us")
    if pa.types.is_timestamp(t):  # stored as UTC whatever the zone: the instant
        return pc.divide(col.cast(pa.int64()).cast(pa.float64()), _PER_SECOND[t.unit])
    return col.cast(pa.float64())


def resolve_uri(base: str, uri: str) -> str:
    """`uri` as an absolute URI/path: relative ones are resolved against the folder `base`."""
    if "://" in uri or uri.startswith("/") or not base:
        return uri
    scheme, sep, path = base.partition("://")
    if not sep:
        return posixpath.normpath(posixpath.join(base, uri))
    return f"{scheme}://{posixpath.normpath(posixpath.join(path, uri))}"


_MANIFEST_COLUMNS = ("modality", "text", "uri", "id", "fingerprint", "size", "mtime")
_KIND = "_kind"


def _null_if_blank(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Strings with whitespace stripped; "" -> null."""
    col = pc.utf8_trim_whitespace(col)
    return pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)


def _row_refs(prefix: str, rows: np.ndarray) -> pa.Array:
    """`<prefix><row>` for each row index."""
    return pc.binary_join_element_wise(
        pa.scalar(prefix, pa.string()), pa.array(rows).cast(pa.string()), ""
    )


def _manifest_kinds(raw: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """(kind or null, the modality column as rows will carry it) of a manifest's `modality`
    values (`normalise_kind`, column at a time). A manifest holds a few distinct values: they
    are normalised once each and taken back to the rows (a null value stays null)."""
    enc = raw.combine_chunks().dictionary_encode()
    values = enc.dictionary
    low = pc.utf8_lower(pc.utf8_trim_whitespace(values))
    for alias, kind in KIND_ALIASES.items():
        low = pc.if_else(pc.equal(low, alias), kind, low)
    valid = pc.fill_null(pc.is_in(low, pa.array(list(KINDS))), False)
    kind = pc.if_else(valid, low, pa.scalar(None, pa.string()))
    modality = pc.coalesce(kind, values)
    return (
        pa.chunked_array([kind.take(enc.indices)], pa.string()),
        pa.chunked_array([modality.take(enc.indices)], pa.string()),
    )


def _manifest_errors(
    raw: pa.ChunkedArray, kind: pa.ChunkedArray, text: pa.ChunkedArray, uri: pa.ChunkedArray
) -> pa.Array:
    """The reason each rejected row is rejected (null for the others): an unknown modality,
    inline text for a non-text modality, neither uri nor text."""
    unknown = pc.is_null(kind).to_numpy(zero_copy_only=False)
    has_text = pc.is_valid(text).to_numpy(zero_copy_only=False)
    is_text = pc.fill_null(pc.equal(kind, "text"), False).to_numpy(zero_copy_only=False)
    no_uri = pc.is_null(uri).to_numpy(zero_copy_only=False)
    errors: list[str | None] = [None] * len(kind)
    if not (unknown | (has_text & ~is_text) | (~has_text & no_uri)).any():
        return pa.nulls(len(kind), pa.string())
    # Rejected rows are few: their messages are written one by one (with the value's repr).
    raws, kinds = raw.to_pylist(), kind.to_pylist()
    for i in np.flatnonzero(unknown):
        errors[i] = f"unknown modality {raws[i]!r}; expected one of {list(KINDS)}"
    for i in np.flatnonzero(~unknown & has_text & ~is_text):
        errors[i] = f"inline text given for modality {kinds[i]!r}"
    for i in np.flatnonzero(~unknown & ~has_text & no_uri):
        errors[i] = "row has neither 'uri' nor inline 'text'"
    return pa.array(errors, pa.string())


def _resolved_uris(uri: pa.ChunkedArray, manifest_uri: str) -> pa.ChunkedArray:
    """`resolve_uri` of each row's uri against the manifest's folder (null stays null)."""
    base = manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else ""
    if not base:
        return uri
    absolute = pc.fill_null(pc.or_(pc.match_substring(uri, "://"), pc.starts_with(uri, "/")), True)
    relative = np.flatnonzero(~absolute.to_numpy(zero_copy_only=False))
    if not len(relative):
        return uri
    values = uri.to_pylist()  # relative uris are joined and normalised one by one
    for i in relative.tolist():
        values[i] = resolve_uri(base, values[i])
    return pa.chunked_array([pa.array(values, pa.string())])


class _ManifestKeys(NamedTuple):
    keep: np.ndarray  # the rows kept (an id's first row), in order
    ids: pa.ChunkedArray
    kind: pa.ChunkedArray  # the kind, or null when the modality is unknown
    modality: pa.ChunkedArray  # the modality as rows carry it
    text: pa.ChunkedArray
    uri: pa.ChunkedArray  # as written, blanks null
    error: pa.Array  # why a row is rejected, or null

    def kinds(self) -> pa.ChunkedArray:
        """Each kept row's kind, INVALID when rejected (`_kind`)."""
        return pc.if_else(pc.is_null(self.error), self.kind, INVALID)


def _column(table: pa.Table, name: str, typ: pa.DataType = pa.string()) -> pa.ChunkedArray:
    if name in table.column_names:
        return table.column(name)
    return pa.chunked_array([pa.nulls(table.num_rows, typ)], typ)


# The within-manifest repeat warnings this process has given: planning, re-reading for a rerun
# and listing each read a manifest, and the warning is said once.
_REPEATS_SAID: set[tuple[str, int, tuple[str, ...]]] = set()


def warn_manifest_repeats(shard: str, dups: Sequence[str]) -> None:
    """Say that manifest `shard` skips rows repeating the ids `dups` of earlier rows (once per
    process: a run reads a manifest more than once)."""
    said = (shard, len(dups), tuple(sorted(set(dups))[:3]))
    if said not in _REPEATS_SAID:
        _REPEATS_SAID.add(said)
        logger.warning(
            "manifest %s: %d rows repeat an id of an earlier row and are skipped, e.g. %s",
            *said[:2],
            list(said[2]),
        )


def _manifest_keys(table: pa.Table, shard: str, repeats: list[str] | None) -> _ManifestKeys:
    """The ids, kinds and rejections of a manifest's rows (see `manifest_table`)."""
    n = table.num_rows
    uri = _null_if_blank(_column(table, "uri"))
    ids = _column(table, "id")
    ids = pc.if_else(pc.equal(ids, ""), pa.scalar(None, pa.string()), ids)
    ids = pc.coalesce(ids, uri)
    if ids.null_count:
        ids = pc.coalesce(ids, _row_refs(f"{shard}#", np.arange(n)))
    keep = first_occurrences(ids)
    if len(keep) != n:
        dup_mask = np.ones(n, bool)
        dup_mask[keep] = False
        dups = pc.filter(ids, pa.array(dup_mask)).to_pylist()
        warn_manifest_repeats(shard, dups)
        if repeats is not None:
            repeats.extend(dups)
    rows = pa.array(keep)
    raw, text, uri, ids = (
        c.take(rows) for c in (_column(table, "modality"), _column(table, "text"), uri, ids)
    )
    kind, modality = _manifest_kinds(raw)
    error = _manifest_errors(raw, kind, text, uri)
    return _ManifestKeys(keep, ids, kind, modality, text, uri, error)


def manifest_keys(
    table: pa.Table, shard: str, repeats: list[str] | None = None, facts: dict | None = None
) -> pa.Table:
    """`id` and `_kind` of `manifest_table(table, shard, ...)`, without its other columns (no
    uri resolution, no fingerprints of inline texts): what planning needs of a manifest.
    `facts`, if given, gets `lists_alone`: True when every row's listing follows from the
    manifest alone (each row has a `fingerprint`, inline text, or an error), False when a
    listing must ask the store for some object's fingerprint."""
    k = _manifest_keys(table, shard, repeats)
    if facts is not None:
        fp = _column(table, "fingerprint").take(pa.array(k.keep))
        asks = pc.and_(pc.and_(pc.is_null(fp), pc.is_null(k.text)), pc.is_null(k.error))
        facts["lists_alone"] = not pc.any(asks).as_py()
    return pa.table({"id": k.ids, _KIND: k.kinds()})


def manifest_table(
    table: pa.Table, shard: str, manifest_uri: str, repeats: list[str] | None = None
) -> pa.Table:
    """Item rows of one manifest as a table (ITEM_SCHEMA without `branch` and `count`, plus
    `_kind`: the row's kind, INVALID when rejected), built column by column: no Python per
    row but for the fingerprints of inline texts and the messages of rejected rows.

    Rows with an unknown modality, inline text for a non-text modality, or neither `uri` nor
    `text` get kind INVALID and an error. Ids: the `id` column, else the `uri` as written, else
    `<shard>#<row>`. A repeated id keeps its first row (logged; the ids of the skipped rows are
    appended to `repeats` if given).
    """
    k = _manifest_keys(table, shard, repeats)
    rows = pa.array(k.keep)
    inline = pc.and_(pc.is_valid(k.text), pc.is_null(k.error))
    data = pc.if_else(inline, k.text, pa.scalar(None, pa.string())).cast(pa.large_binary())
    fingerprint = _column(table, "fingerprint").take(rows)
    size = _column(table, "size", pa.int64()).take(rows)
    if pc.any(inline).as_py():
        # = text_fingerprint(text), from the UTF-8 bytes already made
        fingerprint = pa.array(
            [
                f if t is None else "sha256:" + hashlib.sha256(t).hexdigest()
                for t, f in zip(data.to_pylist(), fingerprint.to_pylist(), strict=True)
            ],
            pa.string(),
        )
        size = pc.if_else(inline, pc.binary_length(data).cast(pa.int64()), size)
    uri = _resolved_uris(k.uri, manifest_uri)
    if uri.null_count:  # inline texts: `<manifest>#<row>`
        uri = pc.coalesce(uri, _row_refs(f"{manifest_uri}#", k.keep))
    status = pc.if_else(pc.is_null(k.error), STATUS_OK, STATUS_ERROR)
    return pa.table(
        {
            "id": k.ids,
            "uri": uri,
            "modality": k.modality,
            "shard": pa.array([shard], pa.string()).take(np.zeros(len(k.keep), np.int64)),
            "fingerprint": fingerprint,
            "size": size,
            "mtime": _column(table, "mtime", pa.float64()).take(rows),
            "status": status,
            "error": k.error,
            "data": data,
            _KIND: k.kinds(),
        }
    )


def manifest_items(
    table: pa.Table, shard: str, manifest_uri: str, repeats: list[str] | None = None
) -> list[dict[str, Any]]:
    """`manifest_table` as row dicts (with `_kind`)."""
    return manifest_table(table, shard, manifest_uri, repeats).to_pylist()


# ----------------------------------------------------------------------------- webdataset


def wds_id(shard: str, member: str) -> str:
    """The id of WebDataset member `member` of tar shard `shard`: `<shard>#<member>`.

    Unique by construction: `#` and `%` in the shard name are escaped, so the first `#` ends
    the shard (`a.tar` member `b/x.txt` is `a#b/x.txt`, `a/b.tar` member `x.txt` is `a/b#x.txt`).
    """
    return f"{shard.replace('%', '%25').replace('#', '%23')}#{member}"


def wds_member(id_: str) -> str:
    """The member name of a `wds_id`."""
    return id_.split("#", 1)[1]


def member_kind(name: str, extensions: Mapping[str, str] = {}) -> str | None:
    """Kind of a WebDataset member from the suffix after its sample key, or None (metadata)."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return None
    suffix = base.split(".", 1)[1].lower()
    for s, k in extensions.items():
        if suffix == s.lower().lstrip("."):
            return k
    return ibc.infer_kind(base)


def iter_tar(
    uri: str,
    storage_options: StorageOptions | None,
    want: Callable[[str], str | None],
    *,
    read: bool = True,
) -> Iterator[tuple[str, str, bytes | None, int, float, str | None]]:
    """(member name, kind, bytes or None, size, mtime, error) for the members `want` maps to a
    kind. `error` is None, or why the member cannot be read: a symbolic or hard link (links
    are not followed: a shard's items are its own files), then with no bytes.

    Headers are read one by one and payloads of unwanted members are seeked over, so listing
    (`read=False`) or a caption-only pass does not download the images.
    """
    fs, path = filesystem(uri, storage_options)
    with (
        fs.open(path, "rb", block_size=1 << 20) as f,
        tarfile.open(fileobj=f, mode="r:*") as tf,
    ):
        # Seeking over a payload does not read it: a member cut short by a truncated file would
        # be listed although reading it fails (the job then records the shard unreadable from
        # that member on, and a re-index would list the member as new on every run). In an
        # uncompressed tar the payload's end must lie within the file.
        end = fs.size(path) if not read and tf.fileobj is f else None
        for m in tf:
            link = m.issym() or m.islnk()
            if not (m.isfile() or link):
                continue
            kind = want(m.name)
            if kind is None:
                continue
            if link:
                how = "symbolic" if m.issym() else "hard"
                why = f"tar member {m.name!r} is a {how} link to {m.linkname!r}, not a file"
                yield m.name, kind, None, 0, float(m.mtime), why
                continue
            if end is not None and m.offset_data + m.size > end:
                raise tarfile.ReadError(f"member {m.name!r} is cut short: the file ends first")
            data = None
            if read:
                fobj = tf.extractfile(m)
                data = fobj.read() if fobj is not None else b""
            yield m.name, kind, data, int(m.size), float(m.mtime), None


def peek_tar_kinds(
    uri: str, storage_options: StorageOptions | None, extensions: Mapping[str, str], n: int = 64
) -> list[str]:
    """Kinds among the first `n` members of a tar shard (headers only)."""
    kinds: set[str] = set()
    for i, (_, kind, *_) in enumerate(
        iter_tar(uri, storage_options, lambda name: member_kind(name, extensions), read=False)
    ):
        kinds.add(kind)
        if i >= n:
            break
    return sorted(kinds)


def _wds_want(kinds: Collection[str], extensions: Mapping[str, str]) -> Callable[[str], str | None]:
    def want(name: str) -> str | None:
        k = member_kind(name, extensions)
        return k if k in kinds else None

    return want


# ----------------------------------------------------------------------------- shard rows
# `rows(shard, uri, fingerprint, kinds, *, storage_options, extensions, items, read, skip)`:
# ITEM_SCHEMA rows (`ok`, or `error` with the reason) of the given kinds of one shard. `items`:
# a files shard's listed items per kind; `read=False` lists without payload bytes; ids in
# `skip` are not read (tar members are seeked over).


def files_rows(
    shard: str,
    uri: str,
    fingerprint: str | None,
    kinds: Collection[str],
    items: Mapping[str, Sequence[Mapping[str, Any]]] | None,
    **_: Any,
) -> Iterator[dict[str, Any]]:
    # The items the planner listed (a files shard has no file of its own).
    for kind in sorted(kinds):
        for it in (items or {}).get(kind, ()):
            yield item_row(
                it["id"],
                it["uri"],
                it["modality"],
                shard,
                it.get("fingerprint"),
                it.get("size"),
                it.get("mtime"),
            )


def manifest_rows(
    shard: str,
    uri: str,
    fingerprint: str | None,
    kinds: Collection[str],
    storage_options: StorageOptions | None,
    **_: Any,
) -> Iterator[dict[str, Any]]:
    yield from manifest_shard_table(shard, uri, fingerprint, kinds, storage_options).to_pylist()


def manifest_shard_table(
    shard: str,
    uri: str,
    fingerprint: str | None,
    kinds: Collection[str],
    storage_options: StorageOptions | None,
    repeats: list[str] | None = None,
    **_: Any,
) -> pa.Table:
    """`manifest_rows` as one table (the read task's path for manifests: no dict per row).
    `repeats`: as for `manifest_table`."""
    table = manifest_table(read_manifest(uri, storage_options), shard, uri, repeats)
    mask = pc.is_in(table.column(_KIND), pa.array(sorted(kinds), pa.string()))
    return table.filter(mask).drop_columns([_KIND])


def tar_rows(
    shard: str,
    uri: str,
    fingerprint: str | None,
    kinds: Collection[str],
    storage_options: StorageOptions | None,
    extensions: Mapping[str, str],
    read: bool = True,
    skip: Collection[str] = frozenset(),
    **_: Any,
) -> Iterator[dict[str, Any]]:
    kind_of = _wds_want(kinds, extensions)

    def want(name: str) -> str | None:  # members already done are seeked over, not read
        return None if wds_id(shard, name) in skip else kind_of(name)

    try:
        members = iter_tar(uri, storage_options, want, read=read)
        for name, kind, data, size, mtime, error in members:
            fp = member_fingerprint(fingerprint or "", name)
            yield item_row(
                wds_id(shard, name),
                f"{uri}#{name}",
                kind,
                shard,
                fp,
                size,
                mtime,
                data=data,
                error=error,
            )
    except (tarfile.TarError, OSError, EOFError) as e:
        # A truncated or corrupt shard: its readable members were emitted; the rest cannot
        # be enumerated, so the shard itself is recorded as a failed item per kind.
        for kind in sorted(kinds):
            yield unreadable_shard_row(shard, uri, kind, fingerprint, e)


# ----------------------------------------------------------------------------- ids


def ids_identity(ids: Iterable[str]) -> str:
    """The identity of a set of ids (order does not matter): `ids:<count>:<sha256>`."""
    h = hashlib.sha256()
    n = 0
    for i in sorted(ids):
        h.update(i.encode())
        h.update(b"\0")
        n += 1
    return f"ids:{n}:{h.hexdigest()[:32]}"


# The seed of Polars' 64-bit string hash that makes an id's digest.
_DIGEST_SEED = 0x5EED_1D5


def id_digests(ids: pa.Array | pa.ChunkedArray | Iterable[str]) -> np.ndarray:
    """(n,) uint64: a 64-bit digest per id (Polars' string hash).

    Corpus-wide duplicate detection keeps 8 bytes per item on the driver instead of the id
    strings. The hash is vectorised (about 15x faster than a Python loop over BLAKE2b, which
    was most of planning a manifest corpus) but not cryptographic and only stable within one
    Polars version: digests only ever find candidates, and `repeated_rows` compares the ids
    of candidates before it calls a row a repeat, so a collision never drops an item. At
    64 bits collisions are rare (about n^2 / 2^65 pairs: 0.03 for 10^9 ids), and each one
    costs only a second read of the manifests that hold it.
    """
    import polars as pl

    if not isinstance(ids, pa.Array | pa.ChunkedArray):
        ids = pa.array(list(ids), pa.string())
    return pl.Series(ids.cast(pa.large_string())).hash(seed=_DIGEST_SEED).to_numpy()


def repeated_rows(
    digests: Sequence[np.ndarray],
    read_ids: Callable[[list[int]], Sequence[pa.Array | pa.ChunkedArray]] | None = None,
) -> list[np.ndarray]:
    """Per shard (in order), the row indices whose id already occurs in an earlier row —
    an earlier shard, or earlier in the same shard. One sort over all digests (`id_digests`:
    one uint64 per row).

    `read_ids(ks)`: the ids of each shard k in `ks` (the rows `digests[k]` was made from).
    When given, the ids of rows that share a digest are compared, so different ids whose
    digests collide are not repeats; it is called once, with the shards that hold such rows,
    and only if there are any.
    Without it, equal digests are taken for equal ids."""
    sizes = [len(d) for d in digests]
    if not sum(sizes):
        return [np.empty(0, np.int64) for _ in digests]
    allv = np.concatenate(digests)
    # Only rows whose digest occurs twice can repeat. One unstable sort finds those digests
    # (numpy's SIMD quicksort, several times faster than a stable argsort); the sort by
    # (digest, position) then runs on their rows alone.
    srt_all = np.sort(allv)
    shared = srt_all[1:][srt_all[1:] == srt_all[:-1]]
    del srt_all
    cand = _rows_in(allv, shared)
    sub = allv[cand]
    at = np.lexsort((cand, sub))
    order, srt = cand[at], sub[at]
    same = srt[1:] == srt[:-1]
    starts = np.cumsum([0, *sizes])
    if read_ids is None:
        later = np.sort(order[1:][same])
    else:
        later = _true_repeats(order, same, starts, read_ids)
    parts = np.split(later, np.searchsorted(later, starts[1:-1]))
    return [p - a for p, a in zip(parts, starts[:-1], strict=True)]


def _rows_in(values: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """The positions of `values` that `subset` holds, ascending. Polars' hash lookup: np.isin
    would sort `values` and `subset` together once `subset` holds more than a few dozen
    values (a second copy of every digest, and seconds at 10^6 rows)."""
    import polars as pl

    if not len(subset):
        return np.empty(0, np.int64)
    hit = pl.Series(values).is_in(pl.Series(subset).implode()).to_numpy()
    return np.flatnonzero(hit)


def _true_repeats(
    order: np.ndarray,
    same: np.ndarray,
    starts: np.ndarray,
    read_ids: Callable[[list[int]], Sequence[pa.Array | pa.ChunkedArray]],
) -> np.ndarray:
    """The rows (global, ascending) that repeat an earlier row's id, among the groups of
    rows that share a digest (`order` sorted by digest, then position; `same[i]`: row
    order[i + 1] has order[i]'s digest). Only the candidates' ids become Python strings."""
    member = np.zeros(len(order), bool)
    member[1:] |= same
    member[:-1] |= same
    rows = order[member]
    group = np.cumsum(~np.concatenate([[False], same]))[member]  # a group number per row
    shard = np.searchsorted(starts, rows, side="right") - 1
    if not len(rows):
        return rows.astype(np.int64)
    ids = np.empty(len(rows), object)
    ks = np.unique(shard).tolist()
    for k, shard_ids in zip(ks, read_ids(ks), strict=True):
        at = shard == k
        ids[at] = shard_ids.take(pa.array(rows[at] - starts[k])).to_pylist()
    later = []
    seen: set[str] = set()
    for i in range(len(rows)):
        if i and group[i] != group[i - 1]:
            seen = set()
        if ids[i] in seen:
            later.append(rows[i])
        seen.add(ids[i])
    return np.sort(np.array(later, np.int64))
