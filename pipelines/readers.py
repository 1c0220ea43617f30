"""Input side of the embedding job: list a corpus into shards, and shards into item rows.

Three input formats, local or on an object store (`s3://...`):

- `manifest`: Parquet / CSV / JSONL files (each file one shard) with columns `uri` and
  `modality`, optionally `id`, inline `text`, and `fingerprint`/`size`/`mtime`. A relative
  `uri` is resolved against the manifest's folder.
- `webdataset`: tar shards as img2dataset / video2dataset write them; every member whose
  suffix names a media kind (`key.jpg`, `key.txt`, `key.wav`, ...) is one item, so one
  sample yields several rows. `key.json` and unknown suffixes are metadata, not items.
- `files`: a folder, prefix or glob of media files, kind from the extension (overridable);
  files are grouped into shards by a stable hash of their relative path.

Ids are stable across reruns and derive from the source key, never from block layout:
manifest `id` (else its `uri` as written, else `<shard>#<row>` for inline text), `<shard>#<member>`
for WebDataset (`wds_id`: the tar's path without its suffix, `%` and `#` in it written `%25` and
`%23`, so the first `#` always ends the shard and no two members of a corpus share an id), the
relative path for files. Paths and names starting with `_` or `.` are
skipped, as Spark/pyarrow do. An id is embedded once per corpus: a manifest row that repeats an
id of an earlier row — in the same manifest or in a manifest earlier in name order — is
skipped with a warning (first occurrence wins, the same on every rerun).

Planning and listing (`plan_job`, `list_items`) never read media bytes: manifests are read
(small), tar shards are walked header by header (seeking over payloads), files are listed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

import imagebind_core as ibc
from imagebind_core.io import StorageOptions, filesystem, protocol_of
from imagebind_core.kinds import KINDS
from pipelines.config import JobConfig
from pipelines.progress import report
from pipelines.writers import (
    ADDITION_RE,
    ITEM_SCHEMA,
    STATUS_EOS,
    STATUS_ERROR,
    STATUS_OK,
    Output,
    fingerprint_from_info,
    member_fingerprint,
    text_fingerprint,
)

logger = logging.getLogger(__name__)

# Pseudo-kind of rows rejected while reading (unknown modality, no uri/text): they skip
# preprocessing and encoding and go straight to the errors table.
INVALID = "invalid"

MANIFEST_SUFFIXES = (".parquet", ".csv", ".csv.gz", ".jsonl", ".jsonl.gz", ".ndjson", ".json")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
KIND_ALIASES = {"image": "vision", "img": "vision", "photo": "vision"}

LISTING_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("source", pa.string()),
        pa.field("fingerprint", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime", pa.float64()),
        pa.field("error", pa.string()),
    ]
)


class PlanError(ValueError):
    """The input cannot be planned (nothing found, unreadable manifest, name clash...)."""


class EmptyInput(PlanError):
    """The input exists but holds no items (every file deleted, or none with a media kind)."""


# ----------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class Source:
    """One listed object: its URI, path relative to the input root, and fingerprint."""

    uri: str
    rel: str
    fingerprint: str
    size: int | None
    mtime: float | None


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _to_uri(fs: fsspec.AbstractFileSystem, path: str, local: bool) -> str:
    return path if local else fs.unstrip_protocol(path)


def _hidden(rel: str) -> bool:
    return any(p.startswith(("_", ".")) for p in rel.split("/") if p)


def check_input(input_uri: str, storage_options: StorageOptions | None = None) -> None:
    """PlanError if `input_uri` names nothing: no file, folder or prefix there, and no match of
    a glob. Cheap (one metadata call): the CLIs check before they create anything."""
    fs, path = filesystem(input_uri, storage_options)
    if protocol_of(input_uri) == "file":
        path = os.path.abspath(path)
    fs.invalidate_cache()
    if fs.exists(path) or (_has_glob(path) and fs.glob(path)):
        return
    raise PlanError(f"input not found: {input_uri}")


def list_input(
    input_uri: str, storage_options: StorageOptions | None = None, exclude: str | None = None
) -> list[Source]:
    """List the objects of an input: one file, a folder/prefix (recursively) or a glob.

    `exclude` (an output URI) is skipped if it lies inside the input. Raises PlanError if
    nothing is found.
    """
    fs, path = filesystem(input_uri, storage_options)
    local = protocol_of(input_uri) == "file"
    if local:
        path = os.path.abspath(path)
    fs.invalidate_cache()
    # An existing folder or file is taken literally even if its name has glob characters
    # (`photos [2024]/`); only a path that does not exist is a pattern.
    if fs.isdir(path):
        root = path.rstrip("/")
        found = fs.find(path, detail=True)
    elif fs.exists(path):
        root = path.rsplit("/", 1)[0]
        found = {path: fs.info(path)}
    elif _has_glob(path):
        root = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        found = fs.glob(path, detail=True)
    else:
        raise PlanError(f"input not found: {input_uri}")
    skip = None
    if exclude is not None and protocol_of(exclude) == protocol_of(input_uri):
        _, skip = filesystem(exclude, storage_options)
        skip = (os.path.abspath(skip) if local else skip).rstrip("/") + "/"
    out = []
    for p, info in sorted(found.items()):
        if info.get("type") != "file":
            continue
        rel = p[len(root) + 1 :] if p.startswith(root + "/") else p.rsplit("/", 1)[-1]
        if _hidden(rel) or (skip is not None and p.startswith(skip)):
            continue
        fp, size, mtime = fingerprint_from_info(info)
        out.append(Source(_to_uri(fs, p, local), rel, fp, size, mtime))
    if not out:
        raise EmptyInput(f"no input files found at {input_uri}")
    return out


def _strip_suffix(rel: str, suffixes: Sequence[str]) -> str:
    low = rel.lower()
    for s in sorted(suffixes, key=len, reverse=True):
        if low.endswith(s):
            return rel[: -len(s)]
    return rel


def detect_format(sources: Sequence[Source]) -> str:
    """`webdataset` if every file is a tar, `manifest` if every file is a manifest, else `files`."""
    names = [s.rel.lower() for s in sources]
    if all(n.endswith(TAR_SUFFIXES) for n in names):
        return "webdataset"
    # `walk.imu.csv` / `walk.imu.json` are IMU recordings, not manifests.
    if all(n.endswith(MANIFEST_SUFFIXES) and ibc.infer_kind(n) is None for n in names):
        return "manifest"
    return "files"


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


def read_manifest(uri: str, storage_options: StorageOptions | None = None) -> pa.Table:
    """Read one manifest file; `id`, `uri`, `modality`, `text`, `fingerprint` become strings,
    `size` int64 and `mtime` float64 seconds (timestamps and ISO dates are converted).

    A 0-byte file is an empty manifest. Raises PlanError naming the file if it cannot be read,
    lacks the required columns, or has a `size`/`mtime` column of the wrong kind.
    """
    low = uri.lower()
    strings = ("id", "uri", "modality", "text", "fingerprint")
    fs, path = filesystem(uri, storage_options)
    try:
        if fs.size(path) == 0:
            empty = pa.array([], pa.string())
            return pa.table({"uri": empty, "modality": empty})
        with fs.open(path, "rb", compression="infer") as f:
            if low.endswith(".parquet"):
                table = pq.read_table(f)
            elif low.endswith((".csv", ".csv.gz")):
                table = pacsv.read_csv(
                    f,
                    convert_options=pacsv.ConvertOptions(
                        column_types={c: pa.string() for c in strings},
                        strings_can_be_null=True,
                    ),
                )
            else:
                table = pajson.read_json(f)
    except Exception as e:
        hint = ""
        if low.endswith((".json", ".jsonl", ".jsonl.gz", ".ndjson")) and _starts_with(
            fs, path, b"["
        ):
            hint = " (a JSON manifest is JSON Lines: one object per line, not an array)"
        raise PlanError(f"manifest {uri}: cannot read it: {e}{hint}") from None
    missing = [c for c in ("modality",) if c not in table.column_names]
    if missing or ("uri" not in table.column_names and "text" not in table.column_names):
        raise PlanError(
            f"manifest {uri}: needs columns 'uri' (or inline 'text') and 'modality'; "
            f"it has {table.column_names}"
        )
    for c in strings:
        if c not in table.column_names:
            continue
        col = table.column(c)
        if c == "id" and pa.types.is_floating(col.type):
            col = pa.array([_float_id(v) for v in col.to_pylist()], pa.string())
        elif col.type != pa.string():
            col = col.cast(pa.string())
        if c == "text":  # "" is no text, as CSV reads it, whatever the file format
            col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
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


def manifest_items(
    table: pa.Table, shard: str, manifest_uri: str, repeats: list[str] | None = None
) -> list[dict[str, Any]]:
    """Item rows of one manifest (without payload bytes, except inline text in `data`).

    Rows with an unknown modality, inline text for a non-text modality, or neither `uri` nor
    `text` get kind INVALID and an error. A repeated id keeps its first row (logged; the ids
    of the skipped rows are appended to `repeats` if given).
    """
    base = manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else ""
    cols = set(table.column_names)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    dups: list[str] = []
    # Column by column (rows as dicts cost Arrow a dict per row): None for an absent column.
    n = table.num_rows
    col = {
        name: table.column(name).to_pylist() if name in cols else [None] * n
        for name in ("modality", "text", "uri", "id", "fingerprint", "size", "mtime")
    }
    for i in range(n):
        raw_kind = col["modality"][i]
        kind = normalise_kind(raw_kind)
        text = col["text"][i]
        uri = col["uri"][i]
        uri = uri.strip() if isinstance(uri, str) and uri.strip() else None
        id_ = col["id"][i]
        if not id_:
            id_ = uri if uri else f"{shard}#{i}"
        if id_ in seen:
            dups.append(id_)
            continue
        seen.add(id_)
        full = resolve_uri(base, uri) if uri else None
        item: dict[str, Any] = {
            "id": id_,
            "uri": full or f"{manifest_uri}#{i}",
            "modality": kind or (str(raw_kind) if raw_kind is not None else None),
            "shard": shard,
            "fingerprint": col["fingerprint"][i],
            "size": col["size"][i],
            "mtime": col["mtime"][i],
            "status": STATUS_OK,
            "error": None,
            "data": None,
        }
        if kind is None:
            item["error"] = f"unknown modality {raw_kind!r}; expected one of {list(KINDS)}"
        elif text is not None:
            if kind != "text":
                item["error"] = f"inline text given for modality {kind!r}"
            else:
                item["data"] = text.encode("utf-8")
                item["fingerprint"] = text_fingerprint(text)
                item["size"] = len(item["data"])
        elif not uri:
            item["error"] = "row has neither 'uri' nor inline 'text'"
        if item["error"] is not None:
            item["status"] = STATUS_ERROR
            item["_kind"] = INVALID
        else:
            item["_kind"] = kind
        out.append(item)
    if dups:
        logger.warning(
            "manifest %s: %d rows repeat an id of an earlier row and are skipped, e.g. %s",
            shard,
            len(dups),
            sorted(set(dups))[:3],
        )
        if repeats is not None:
            repeats.extend(dups)
    return out


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
) -> Iterator[tuple[str, str, bytes | None, int, float]]:
    """(member name, kind, bytes or None, size, mtime) for the members `want` maps to a kind.

    Headers are read one by one and payloads of unwanted members are seeked over, so listing
    (`read=False`) or a caption-only pass does not download the images.
    """
    fs, path = filesystem(uri, storage_options)
    with (
        fs.open(path, "rb", block_size=1 << 20) as f,
        tarfile.open(fileobj=f, mode="r:*") as tf,
    ):
        for m in tf:
            if not m.isfile():
                continue
            kind = want(m.name)
            if kind is None:
                continue
            data = None
            if read:
                fobj = tf.extractfile(m)
                data = fobj.read() if fobj is not None else b""
            yield m.name, kind, data, int(m.size), float(m.mtime)


def peek_tar_kinds(
    uri: str, storage_options: StorageOptions | None, extensions: Mapping[str, str], n: int = 64
) -> list[str]:
    """Kinds among the first `n` members of a tar shard (headers only)."""
    kinds: set[str] = set()
    for i, (_, kind, _, _, _) in enumerate(
        iter_tar(uri, storage_options, lambda name: member_kind(name, extensions), read=False)
    ):
        kinds.add(kind)
        if i >= n:
            break
    return sorted(kinds)


# ----------------------------------------------------------------------------- planning


@dataclass
class ShardSpec:
    """One input shard and what the job must do with it.

    `items` (files format, or an explicit item list) holds the rows per kind; `include` (manifest
    and webdataset subsets) restricts a shard to some ids; None means every item. `exclude`
    (manifests) lists ids this shard repeats from an earlier shard: they are not its items.
    """

    name: str
    format: str
    uri: str
    fingerprint: str | None
    kinds: tuple[str, ...]
    items: dict[str, list[dict[str, Any]]] | None = None
    include: dict[str, list[str]] | None = None
    counts: dict[str, int] | None = None
    exclude: list[str] | None = None
    # What the shard's input is, to tell on a rerun whether a committed shard has new items:
    # the manifest's or tar's fingerprint (etag, else size and mtime), a digest of the ids of
    # a files bucket. None (explicit subsets): a committed shard is done.
    identity: str | None = None


@dataclass
class Plan:
    """What a run will read: the format, its shards, the kinds present."""

    format: str
    input: str
    shards: list[ShardSpec]
    kinds: tuple[str, ...]
    counts: dict[str, int] | None  # items per kind, when cheap to know
    skipped: list[str] = field(default_factory=list)  # files with no known media kind
    files_shards: int | None = None
    duplicates: int = 0  # manifest rows skipped: their id is in an earlier row or manifest


def shard_name(rel: str, suffixes: Sequence[str]) -> str:
    """The output name of an input shard: its relative path without the suffix, as it will
    be written (`//` is one `/`, no leading or trailing `/`: an object store may have keys
    `in/x.csv` and `in//x.csv`, whose outputs would both be `x.parquet`)."""
    return "/".join(p for p in _strip_suffix(rel, suffixes).split("/") if p)


def _shard_names(sources: Sequence[Source], suffixes: Sequence[str]) -> list[str]:
    names = [shard_name(s.rel, suffixes) for s in sources]
    by_name: dict[str, list[str]] = {}
    for src, n in zip(sources, names, strict=True):
        by_name.setdefault(n, []).append(src.uri)
    clash = {n: uris for n, uris in by_name.items() if len(uris) > 1}
    if clash:
        shown = "; ".join(f"{' and '.join(u)} -> {n!r}" for n, u in list(clash.items())[:3])
        raise PlanError(
            f"input shards would write the same output: {shown}. Their names differ only by "
            "extension or by repeated '/'; rename them or embed them in separate jobs."
        )
    bad = [s.uri for s, n in zip(sources, names, strict=True) if ADDITION_RE.search(n) or not n]
    if bad:
        raise PlanError(
            f"input shards {bad[:3]}: a name ending in '.add-<12 hex digits>' (or an empty "
            "name) is reserved for the output's additions; rename them"
        )
    return names


def _files_item(src: Source, kind: str, shard: str) -> dict[str, Any]:
    return {
        "id": src.rel,
        "uri": src.uri,
        "modality": kind,
        "shard": shard,
        "fingerprint": src.fingerprint,
        "size": src.size,
        "mtime": src.mtime,
    }


def plan_job(cfg: JobConfig, files_shards: int | None = None, *, scan_workers: int = 8) -> Plan:
    """List the input of `cfg` into shards without reading media bytes.

    Args:
        files_shards: the shard count recorded by an earlier run on the same output
            (files format); None on a first run.
    """
    so = cfg.storage_options()
    sources = list_input(cfg.input, so, exclude=cfg.output)
    fmt = detect_format(sources) if cfg.format == "auto" else cfg.format
    if fmt == "files":
        return _plan_files(cfg, sources, files_shards)
    if fmt == "manifest":
        bad = [s.rel for s in sources if not s.rel.lower().endswith(MANIFEST_SUFFIXES)]
        if bad:
            raise PlanError(f"format manifest: {bad[:3]} are not Parquet/CSV/JSONL manifests")
        names = _shard_names(sources, MANIFEST_SUFFIXES)

        def scan(args: tuple[Source, str]) -> tuple[ShardSpec, np.ndarray, int]:
            src, name = args
            repeats: list[str] = []
            items = manifest_items(read_manifest(src.uri, so), name, src.uri, repeats)
            counts = Counter(it["_kind"] for it in items)
            spec = ShardSpec(
                name,
                fmt,
                src.uri,
                src.fingerprint,
                tuple(sorted(counts)),
                counts=dict(counts),
                identity=src.fingerprint,
            )
            return spec, id_digests(it["id"] for it in items), len(repeats)

        with ThreadPoolExecutor(scan_workers) as ex:
            scanned = list(ex.map(scan, zip(sources, names, strict=True)))
        shards = [spec for spec, _, _ in scanned]
        duplicates = sum(n for _, _, n in scanned)
        duplicates += _exclude_repeated_ids(shards, [d for _, d, _ in scanned], so, scan_workers)
        total: Counter[str] = Counter()
        for s in shards:
            total.update(s.counts or {})
        kinds = tuple(sorted(k for k, n in total.items() if n))
        return Plan(fmt, cfg.input, shards, kinds, dict(total), duplicates=duplicates)
    if fmt == "webdataset":
        bad = [s.rel for s in sources if not s.rel.lower().endswith(TAR_SUFFIXES)]
        if bad:
            raise PlanError(f"format webdataset: {bad[:3]} are not tar shards")
        names = _shard_names(sources, TAR_SUFFIXES)
        kinds = cfg.webdataset.kinds
        if kinds is None:
            kinds = _peek_kinds(sources, so, cfg.webdataset.extensions)
        kinds_t = tuple(sorted(set(kinds)))
        shards = [
            ShardSpec(n, fmt, s.uri, s.fingerprint, kinds_t, identity=s.fingerprint)
            for s, n in zip(sources, names, strict=True)
        ]
        return Plan(fmt, cfg.input, shards, kinds_t, None)
    raise PlanError(f"unknown format {fmt!r}")


def ids_identity(ids: Iterable[str]) -> str:
    """The identity of a set of ids (order does not matter): `ids:<count>:<sha256>`."""
    h = hashlib.sha256()
    n = 0
    for i in sorted(ids):
        h.update(i.encode())
        h.update(b"\0")
        n += 1
    return f"ids:{n}:{h.hexdigest()[:32]}"


def id_digests(ids: Iterable[str]) -> np.ndarray:
    """(n, 2) uint64: a 128-bit BLAKE2b digest per id.

    Corpus-wide duplicate detection keeps 16 bytes per item on the driver instead of the id
    strings; at 128 bits a collision is out of reach (~1e-20 for a billion ids).
    """
    buf = b"".join(hashlib.blake2b(i.encode(), digest_size=16).digest() for i in ids)
    return np.frombuffer(buf, dtype=np.uint64).reshape(-1, 2)


def repeated_rows(digests: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per shard (in order), the row indices whose id already occurs in an earlier row —
    an earlier shard, or earlier in the same shard. One sort over all digests."""
    sizes = [len(d) for d in digests]
    if not sum(sizes):
        return [np.empty(0, np.int64) for _ in digests]
    allv = np.concatenate(digests)
    pos = np.arange(len(allv))
    order = np.lexsort((pos, allv[:, 1], allv[:, 0]))  # by digest, then first occurrence
    srt = allv[order]
    same = np.all(srt[1:] == srt[:-1], axis=1)
    later = np.sort(order[1:][same])
    starts = np.cumsum([0, *sizes])
    parts = np.split(later, np.searchsorted(later, starts[1:-1]))
    return [p - a for p, a in zip(parts, starts[:-1], strict=True)]


def _exclude_repeated_ids(
    shards: list[ShardSpec],
    digests: Sequence[np.ndarray],
    storage_options: StorageOptions | None,
    workers: int,
) -> int:
    """Set `exclude` (and fix `counts`/`kinds`) on manifest shards that repeat ids of earlier
    shards; returns how many rows were excluded. Shards with repeats are read again to name
    the ids: a second read only when the corpus has duplicates."""
    rows = repeated_rows(digests)
    todo = [(s, r) for s, r in zip(shards, rows, strict=True) if len(r)]

    def fix(args: tuple[ShardSpec, np.ndarray]) -> int:
        spec, idx = args
        items = manifest_items(read_manifest(spec.uri, storage_options), spec.name, spec.uri)
        dup = [items[i] for i in idx.tolist()]
        spec.exclude = sorted({it["id"] for it in dup})
        counts = Counter(spec.counts or {})
        counts.subtract(it["_kind"] for it in dup)
        spec.counts = {k: n for k, n in counts.items() if n > 0}
        spec.kinds = tuple(sorted(spec.counts))
        logger.warning(
            "manifest %s: %d rows repeat ids of an earlier manifest and are skipped (first "
            "occurrence wins), e.g. %s",
            spec.name,
            len(dup),
            spec.exclude[:3],
        )
        return len(dup)

    with ThreadPoolExecutor(max(1, min(workers, len(todo)))) as ex:
        return sum(ex.map(fix, todo))


def _peek_kinds(
    sources: Sequence[Source],
    storage_options: StorageOptions | None,
    extensions: Mapping[str, str],
    tries: int = 8,
) -> list[str]:
    """Kinds of a WebDataset corpus from its first readable shard (an empty or corrupt one is
    skipped here; reading it later records it in `_errors`)."""
    failures = []
    for src in sources[:tries]:
        try:
            kinds = peek_tar_kinds(src.uri, storage_options, extensions)
        except (tarfile.TarError, OSError, EOFError) as e:
            failures.append(f"{src.uri}: {type(e).__name__}: {e}")
            continue
        if not kinds:
            raise PlanError(
                f"{src.uri}: no member with a known media suffix; set webdataset.kinds / "
                "webdataset.extensions"
            )
        return kinds
    raise PlanError(
        f"cannot read the first {len(failures)} tar shard(s) to find the kinds (set "
        f"webdataset.kinds to skip this): {'; '.join(failures[:3])}"
    )


def _plan_files(cfg: JobConfig, sources: list[Source], files_shards: int | None) -> Plan:
    kinded: list[tuple[Source, str]] = []
    skipped = []
    for s in sources:
        k = file_kind(s.rel, cfg.files.kind, cfg.files.extensions)
        if k is None:
            skipped.append(s.rel)
        else:
            kinded.append((s, k))
    if skipped:
        logger.warning(
            "%d files have no known media extension and are not items (e.g. %s); map them "
            "with files.extensions or files.kind",
            len(skipped),
            skipped[:3],
        )
    if not kinded:
        raise EmptyInput(f"no media files (known extensions) at {cfg.input}")
    n = files_shards or max(1, math.ceil(len(kinded) / cfg.files.files_per_shard))
    buckets: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for s, k in kinded:
        b = zlib.crc32(s.rel.encode()) % n
        name = f"files-{b:05d}-of-{n:05d}"
        buckets.setdefault(name, {}).setdefault(k, []).append(_files_item(s, k, name))
    shards = [
        ShardSpec(
            name,
            "files",
            "",
            None,
            tuple(sorted(by_kind)),
            items=by_kind,
            counts={k: len(v) for k, v in by_kind.items()},
            identity=ids_identity(it["id"] for v in by_kind.values() for it in v),
        )
        for name, by_kind in sorted(buckets.items())
    ]
    counts = Counter(k for _, k in kinded)
    return Plan("files", cfg.input, shards, tuple(sorted(counts)), dict(counts), skipped, n)


# ----------------------------------------------------------------------------- reruns


def reconcile(
    plan: Plan,
    output: Output,
    committed: set[str],
    storage_options: StorageOptions | None,
    workers: int = 16,
) -> tuple[list[ShardSpec], list[ShardSpec], list[ShardSpec]]:
    """Split the shards of `plan` for a rerun into (new, extended, unchanged).

    new: not committed yet. extended: committed, but the input has items that no committed
    file of the shard holds (a file added to a files bucket, rows appended to a manifest,
    members to a tar): their spec embeds only those. unchanged: committed, nothing new (their
    recorded input identity is the current one, or a comparison of ids found nothing new and
    recorded it). A committed file is never rewritten; extended shards get additions.

    Manifests: an id is embedded once per corpus, so when anything is new or changed, the ids
    committed in every shard are excluded from the new and extended shards (this reads the id
    column of every committed file once). Files and WebDataset ids belong to one shard only.
    """
    new = [s for s in plan.shards if s.name not in committed]
    done = [s for s in plan.shards if s.name in committed]
    with ThreadPoolExecutor(max(1, min(workers, len(done) or 1))) as ex:
        recorded = list(
            ex.map(lambda s: output.read_identity(s.name) if s.identity else None, done)
        )
    stale = [s for s, r in zip(done, recorded, strict=True) if s.identity and r != s.identity]
    stale_names = {s.name for s in stale}
    unchanged = [s for s in done if s.name not in stale_names]
    if not stale and not (plan.format == "manifest" and new and done):
        return new, [], unchanged
    logger.info(
        "%d committed shards changed since they were committed: looking for new items", len(stale)
    )
    with ThreadPoolExecutor(max(1, min(workers, len(done) or 1))) as ex:
        ids_of = dict(
            zip(
                [s.name for s in done],
                ex.map(output.committed_ids, [s.name for s in done]),
                strict=True,
            )
        )
    extended: list[ShardSpec] = []
    if plan.format == "files":
        for s in stale:
            have = ids_of[s.name]
            items = {
                k: [it for it in v if it["id"] not in have] for k, v in (s.items or {}).items()
            }
            items = {k: v for k, v in items.items() if v}
            if not items:
                output.write_identity(s.name, s.identity or "")
                unchanged.append(s)
                continue
            counts = {k: len(v) for k, v in items.items()}
            extended.append(
                ShardSpec(
                    s.name,
                    s.format,
                    s.uri,
                    s.fingerprint,
                    tuple(sorted(items)),
                    items=items,
                    counts=counts,
                    identity=s.identity,
                )
            )
        return new, extended, unchanged
    if plan.format == "webdataset":
        for s in stale:  # the tar is read again; members already committed are seeked over
            have = ids_of[s.name]
            # ids of outputs written under the earlier rule `<shard>/<member>`: the same members
            n = len(s.name) + 1
            have = have | {wds_id(s.name, i[n:]) for i in have if i.startswith(s.name + "/")}
            extended.append(
                ShardSpec(
                    s.name,
                    s.format,
                    s.uri,
                    s.fingerprint,
                    s.kinds,
                    exclude=sorted(have),
                    identity=s.identity,
                )
            )
        return new, extended, unchanged
    # manifests
    everywhere: set[str] = set().union(*ids_of.values()) if ids_of else set()

    def narrow(s: ShardSpec) -> ShardSpec:
        items = manifest_items(read_manifest(s.uri, storage_options), s.name, s.uri)
        excl = set(s.exclude or ())
        excl |= {it["id"] for it in items if it["id"] in everywhere}
        counts = Counter(it["_kind"] for it in items if it["id"] not in excl)
        return ShardSpec(
            s.name,
            s.format,
            s.uri,
            s.fingerprint,
            tuple(sorted(counts)),
            counts=dict(counts),
            exclude=sorted(excl),
            identity=s.identity,
        )

    with ThreadPoolExecutor(max(1, min(workers, len(stale) + len(new)))) as ex:
        narrowed_new = list(ex.map(narrow, new))
        narrowed_stale = list(ex.map(narrow, stale))
    for s in narrowed_stale:
        if not s.kinds:
            output.write_identity(s.name, s.identity or "")
            unchanged.append(s)
        else:
            extended.append(s)
    return narrowed_new, extended, unchanged


# ----------------------------------------------------------------------------- listing items


def list_items(cfg: JobConfig, *, stat: bool = True, threads: int = 16) -> pa.Table:
    """Every item of the corpus as rows (LISTING_SCHEMA) without reading payload bytes.

    Columns: id, uri, modality (kind; "invalid" for rejected manifest rows), shard, source
    (the manifest/tar URI, or the file), fingerprint, size, mtime, error. For manifest rows
    that reference objects and carry no fingerprint, `stat=True` asks the store for each
    object's metadata (a HEAD request, no body). This is what re-indexing diffs against the
    `fingerprint` column of a previous output.
    """
    so = cfg.storage_options()
    plan = plan_job(cfg)
    rows: list[dict[str, Any]] = []
    for shard in plan.shards:
        if plan.format == "files":
            for kind_items in (shard.items or {}).values():
                for it in kind_items:
                    rows.append({**it, "source": it["uri"], "error": None})
        elif plan.format == "manifest":
            skip = set(shard.exclude or ())
            for it in manifest_items(read_manifest(shard.uri, so), shard.name, shard.uri):
                if it["id"] in skip:
                    continue
                it = {k: v for k, v in it.items() if k in LISTING_SCHEMA.names}
                if it["error"] is not None:
                    it["modality"] = INVALID if it["modality"] not in KINDS else it["modality"]
                rows.append({**it, "source": shard.uri})
        else:
            want = _wds_want(set(shard.kinds), cfg.webdataset.extensions)
            try:
                for name, kind, _, size, mtime in iter_tar(shard.uri, so, want, read=False):
                    rows.append(
                        {
                            "id": wds_id(shard.name, name),
                            "uri": f"{shard.uri}#{name}",
                            "modality": kind,
                            "shard": shard.name,
                            "source": shard.uri,
                            "fingerprint": member_fingerprint(shard.fingerprint or "", name),
                            "size": size,
                            "mtime": mtime,
                            "error": None,
                        }
                    )
            except (tarfile.TarError, OSError, EOFError) as e:
                # The rows the job records for an unreadable shard (see `_item_rows`).
                for kind in shard.kinds:
                    rows.append(
                        {
                            "id": f"{shard.name}#unreadable-{kind}",
                            "uri": shard.uri,
                            "modality": kind,
                            "shard": shard.name,
                            "source": shard.uri,
                            "fingerprint": shard.fingerprint,
                            "size": None,
                            "mtime": None,
                            "error": f"cannot read tar shard: {type(e).__name__}: {e}",
                        }
                    )
    if stat:
        need = [r for r in rows if r["fingerprint"] is None and r["error"] is None]

        def fill(r: dict[str, Any]) -> None:
            try:
                fs, p = filesystem(r["uri"], so)
                r["fingerprint"], r["size"], r["mtime"] = fingerprint_from_info(fs.info(p))
            except FileNotFoundError:
                r["error"] = f"object not found: {r['uri']}"
            except Exception as e:
                r["error"] = f"cannot stat {r['uri']}: {e}"

        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(fill, need))
    return pa.Table.from_pylist(
        [{k: r.get(k) for k in LISTING_SCHEMA.names} for r in rows], schema=LISTING_SCHEMA
    )


def plan_items(cfg: JobConfig, items: pa.Table) -> Plan:
    """A plan that embeds exactly `items` (rows of `list_items`, e.g. the new and changed ones).

    Rows keep their shard: the output has one file per touched shard, named as a full run
    would name it.
    """
    fmt = cfg.format
    if fmt == "auto":
        fmt = detect_format(
            [
                Source(u, u.rsplit("/", 1)[-1], "", None, None)
                for u in set(items.column("source").to_pylist())
            ]
        )
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for r in items.to_pylist():
        by_shard.setdefault(r["shard"], []).append(r)
    shards = []
    counts: Counter[str] = Counter()
    for name, rs in sorted(by_shard.items()):
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for r in rs:
            kind = r["modality"] if r["modality"] in KINDS and not r.get("error") else INVALID
            by_kind.setdefault(kind, []).append(r)
            counts[kind] += 1
        if fmt == "files":
            shards.append(ShardSpec(name, fmt, "", None, tuple(sorted(by_kind)), items=by_kind))
        else:
            src = rs[0]["source"]
            fp = None
            if fmt == "webdataset":
                fp = rs[0]["fingerprint"].rsplit("#", 1)[0] if rs[0]["fingerprint"] else None
            # Rows the listing already failed (e.g. an unreadable tar's `#unreadable-<kind>`)
            # travel as explicit rows: no reading task would produce them again.
            invalid = by_kind.get(INVALID)
            shards.append(
                ShardSpec(
                    name,
                    fmt,
                    src,
                    fp,
                    tuple(sorted(by_kind)),
                    items={INVALID: invalid} if invalid else None,
                    include={k: [r["id"] for r in v] for k, v in by_kind.items() if k != INVALID},
                )
            )
    return Plan(fmt, cfg.input, shards, tuple(sorted(counts)), dict(counts))


# ----------------------------------------------------------------------------- tasks


def shard_tasks(plan: Plan, cfg: JobConfig, shards: Sequence[ShardSpec]) -> dict[str, list[dict]]:
    """One task per (shard, kind), grouped by kind: the rows of the reading stage's input."""
    by_kind: dict[str, list[dict]] = {}
    for s in shards:
        for kind in s.kinds:
            task = {
                "shard": s.name,
                "kind": kind,
                "format": s.format,
                "uri": s.uri,
                "fingerprint": s.fingerprint,
                "items": (s.items or {}).get(kind) if s.items is not None else None,
                "include": (s.include or {}).get(kind) if s.include is not None else None,
                "exclude": s.exclude,
                "wds_extensions": dict(cfg.webdataset.extensions),
            }
            by_kind.setdefault(kind, []).append({"task": json.dumps(task)})
    return by_kind


def _wds_want(kinds: set[str], extensions: Mapping[str, str]) -> Callable[[str], str | None]:
    def want(name: str) -> str | None:
        k = member_kind(name, extensions)
        return k if k in kinds else None

    return want


def _item_rows(
    task: dict[str, Any], storage_options: StorageOptions | None, skip: frozenset[str] = frozenset()
) -> Iterator[dict]:
    kind = task["kind"]
    fmt = task["format"]
    shard = task["shard"]
    if task["items"] is not None and kind != INVALID:  # files: rows listed by the planner
        for it in task["items"]:
            yield {**it, "status": STATUS_OK, "error": None, "data": None}
        return
    if task["items"] is not None:  # rows rejected while listing (plan_items)
        for it in task["items"]:
            yield {
                **{k: it.get(k) for k in ("id", "uri", "modality", "fingerprint", "size", "mtime")},
                "shard": shard,
                "status": STATUS_ERROR,
                "error": it.get("error") or "invalid item",
                "data": None,
            }
        return
    if fmt == "manifest":
        for it in manifest_items(read_manifest(task["uri"], storage_options), shard, task["uri"]):
            if it.pop("_kind") == kind:
                yield it
        return
    if fmt == "webdataset":
        kind_of = _wds_want({kind}, task["wds_extensions"])

        def want(name: str) -> str | None:  # members already done are seeked over, not read
            return None if wds_id(shard, name) in skip else kind_of(name)

        try:
            for name, k, data, size, mtime in iter_tar(task["uri"], storage_options, want):
                yield {
                    "id": wds_id(shard, name),
                    "uri": f"{task['uri']}#{name}",
                    "modality": k,
                    "shard": shard,
                    "fingerprint": member_fingerprint(task["fingerprint"] or "", name),
                    "size": size,
                    "mtime": mtime,
                    "status": STATUS_OK,
                    "error": None,
                    "data": data,
                }
        except (tarfile.TarError, OSError, EOFError) as e:
            # A truncated or corrupt shard: its readable members were emitted; the rest cannot
            # be enumerated, so the shard itself is recorded as a failed item.
            yield {
                "id": f"{shard}#unreadable-{kind}",
                "uri": task["uri"],
                "modality": kind,
                "shard": shard,
                "fingerprint": task["fingerprint"],
                "size": None,
                "mtime": None,
                "status": STATUS_ERROR,
                "error": f"cannot read tar shard: {type(e).__name__}: {e}",
                "data": None,
            }
        return
    raise PlanError(f"unknown format {fmt!r}")


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    # Arrow's row converter: ~10x cheaper per row than gathering each column in Python.
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


def read_shard_task(
    task: dict[str, Any],
    output_uri: str,
    storage_options: StorageOptions | None,
    *,
    chunk_rows: int = 64,
    chunk_bytes: int = 64 << 20,
) -> Iterator[pa.Table]:
    """Item rows of one (shard, kind) task in chunks, then its end-of-shard marker.

    Ids already in the shard's part files (an interrupted earlier run), ids outside `include`
    and ids in `exclude` (repeats of an earlier shard) are skipped; the marker's `count` is the
    number of items emitted. An `include`d id the shard does not yield (the object changed
    since it was listed, or the tar breaks before it) becomes an error row: it must not vanish.
    """
    done = Output(output_uri, storage_options).part_ids(task["shard"])
    done.update(task.get("exclude") or ())
    include = set(task["include"]) if task.get("include") is not None else None
    emitted = 0
    seen: set[str] = set()
    buf: list[dict[str, Any]] = []
    nbytes = 0
    broken: str | None = None  # why the shard stopped yielding, if it did
    for row in _item_rows(task, storage_options, frozenset(done)):
        row["branch"] = task["kind"]
        id_ = row["id"]
        if include is not None and id_ not in include:
            if row["status"] == STATUS_ERROR and id_.endswith(f"#unreadable-{task['kind']}"):
                broken = row["error"]
            continue
        if id_ in done or id_ in seen:
            continue
        seen.add(id_)
        buf.append(row)
        emitted += 1
        nbytes += len(row["data"] or b"")
        if len(buf) >= chunk_rows or nbytes >= chunk_bytes:
            yield _to_table(buf)
            buf, nbytes = [], 0
    for id_ in sorted((include or set()) - seen - done):
        member = wds_member(id_) if task["format"] == "webdataset" and "#" in id_ else None
        buf.append(
            {
                "id": id_,
                "uri": f"{task['uri']}#{member}" if member else task["uri"],
                "modality": task["kind"],
                "shard": task["shard"],
                "branch": task["kind"],
                # The listing's fingerprint: the failure is kept until the member changes.
                "fingerprint": member_fingerprint(task["fingerprint"] or "", member)
                if member
                else None,
                "status": STATUS_ERROR,
                "error": broken or "listed, but not found when the shard was read",
            }
        )
        emitted += 1
    buf.append(
        {
            "id": f"{task['shard']}#eos-{task['kind']}",
            "shard": task["shard"],
            "modality": task["kind"],
            "branch": task["kind"],
            "status": STATUS_EOS,
            "count": emitted,
        }
    )
    yield _to_table(buf)


def read_tasks(
    batch: pa.Table,
    output_uri: str,
    storage_options: StorageOptions | None,
    progress: Any = None,
) -> Iterator[pa.Table]:
    """Ray Data `map_batches` function: task rows (`task` JSON) -> item rows. `progress`: the
    job's `pipelines.progress.counter_actor()` (None: not counted)."""
    for t in batch.column("task").to_pylist():
        for table in read_shard_task(json.loads(t), output_uri, storage_options):
            report(progress, "read", sum(s != STATUS_EOS for s in table["status"].to_pylist()))
            yield table
