"""Listing and planning of the embedding job: list a corpus into shards (`plan_job`) without
reading media bytes, split them for a rerun (`reconcile`), list every item for re-indexing
(`list_items` on the driver, `list_items_on_ray` in Ray tasks, `plan_items`), and turn shards
into the read tasks (`shard_tasks`).

Planning and listing never read media bytes: manifests are read (small), tar shards are walked
header by header (seeking over payloads), files are listed. Paths and names starting with `_`
or `.` are skipped, as Spark/pyarrow do (`pipelines.store.hidden`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import tarfile
import zlib
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import imagebind_core as ibc
from imagebind_core.errors import StoreUnavailable
from imagebind_core.io import StorageOptions, filesystem, protocol_of, store_name
from imagebind_core.kinds import KINDS
from pipelines.config import JobConfig
from pipelines.formats import (
    MANIFEST_SUFFIXES,
    TAR_SUFFIXES,
    EmptyInput,
    PlanError,
    file_kind,
    files_rows,
    id_digests,
    ids_identity,
    manifest_items,
    manifest_keys,
    manifest_rows,
    manifest_shard_table,
    peek_tar_kinds,
    read_manifest,
    repeated_rows,
    tar_rows,
    wds_id,
)
from pipelines.rows import (
    INVALID,
    LISTING_SCHEMA,
    fingerprint_from_info,
    first_occurrences,
    item_row,
)
from pipelines.store import ADDITION_RE, Output, hidden, transient_store_error

logger = logging.getLogger(__name__)


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


@contextlib.contextmanager
def store_errors(uri: str, what: str, storage_options: StorageOptions | None) -> Iterator[None]:
    """Name `what` (`input`, `output`, `index root`) at `uri` in the store's errors of a call
    the CLIs make before a run: an unreachable store is StoreUnavailable (exit 1), refused
    credentials and a missing bucket are PlanError (exit 2), not tracebacks."""
    try:
        yield
    except (PlanError, StoreUnavailable):
        raise
    except Exception as e:
        store = store_name(uri, storage_options)
        if transient_store_error(e):
            raise StoreUnavailable(store, f"{what} {uri}: {type(e).__name__}: {e}", uri) from e
        if isinstance(e, PermissionError):
            raise PlanError(
                f"{what} {uri}: access denied by {store} ({e}); check the credentials and the "
                "bucket's policy"
            ) from e
        if any(c.__name__ == "NoCredentialsError" for c in type(e).__mro__):  # botocore's
            raise PlanError(
                f"{what} {uri}: no credentials for {store}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or storage.anon for a public bucket"
            ) from e
        if isinstance(e, FileNotFoundError) and protocol_of(uri) != "file":
            raise PlanError(f"{what} {uri}: {e}") from e
        raise


def _filesystem(uri: str, what: str, storage_options: StorageOptions | None) -> tuple[Any, str]:
    """`filesystem(uri)`, an unknown scheme a PlanError naming `what`."""
    try:
        return filesystem(uri, storage_options)
    except ValueError as e:
        raise PlanError(f"{what} {uri}: {e}") from None


def check_input(input_uri: str, storage_options: StorageOptions | None = None) -> None:
    """PlanError if `input_uri` names nothing: no file, folder or prefix there, and no match of
    a glob. Cheap (one metadata call): the CLIs check before they create anything."""
    fs, path = _filesystem(input_uri, "input", storage_options)
    if protocol_of(input_uri) == "file":
        path = os.path.abspath(path)
    fs.invalidate_cache()
    with store_errors(input_uri, "input", storage_options):
        if fs.exists(path) or (_has_glob(path) and fs.glob(path)):
            return
    raise PlanError(f"input not found: {input_uri}")


def check_folder(uri: str, what: str, storage_options: StorageOptions | None = None) -> None:
    """PlanError if `uri`, where a run writes a folder (`what`: "output", "index root"), is an
    existing file, or (local) lies under one: it must be a folder or an object-store prefix."""
    fs, path = _filesystem(uri, what, storage_options)
    if protocol_of(uri) != "file":
        with store_errors(uri, what, storage_options):
            if fs.isfile(path):
                raise PlanError(f"{what} {uri} is an existing file; give a folder or a prefix")
        return
    at = os.path.abspath(path)
    while not os.path.isdir(at):
        if os.path.lexists(at):
            raise PlanError(
                f"{what} {uri}: {at} is a file, not a folder; give a folder"
                if at != os.path.abspath(path)
                else f"{what} {uri} is an existing file; give a folder"
            )
        at = os.path.dirname(at)


def list_input(
    input_uri: str, storage_options: StorageOptions | None = None, exclude: str | None = None
) -> list[Source]:
    """List the objects of an input: one file, a folder/prefix (recursively) or a glob.

    `exclude` (an output URI) is skipped if it lies inside the input; an input that is the
    output is a PlanError. In a local folder a symbolic link that leads outside it is followed
    (to a file, or a folder and its files; each folder once), one that leads inside it is
    skipped (its target is listed under its own name), and links that lead nowhere, FIFOs,
    sockets and devices, and files whose names are not UTF-8 (ids and URIs are UTF-8 strings)
    are skipped with a warning naming them. Raises EmptyInput if nothing is found.
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
    elif not local:  # a prefix whose objects were all deleted does not exist either
        raise EmptyInput(f"input not found: {input_uri}")
    else:
        raise PlanError(f"input not found: {input_uri}")
    skip = None
    if exclude is not None and protocol_of(exclude) == protocol_of(input_uri):
        _, skip = filesystem(exclude, storage_options)
        skip = (os.path.abspath(skip) if local else skip).rstrip("/")
        if skip in (path.rstrip("/"), root):
            raise PlanError(f"the output {exclude} is the input {input_uri}; give another folder")
        # Only an output inside the input is skipped; an input inside the output is listed.
        skip = skip + "/" if skip.startswith(root + "/") else None
    skipped: list[str] = []
    if local:
        found = _through_links(fs, found, root, skipped)
    out = []
    for p, info in sorted(found.items()):
        kind = info.get("type")
        if kind not in ("file", "other"):
            continue
        rel = p[len(root) + 1 :] if p.startswith(root + "/") else p.rsplit("/", 1)[-1]
        if not rel or rel.endswith("/"):  # an object store's folder marker (`key/`)
            continue
        if hidden(rel) or (skip is not None and p.startswith(skip)):
            continue
        if kind == "other":  # a local FIFO, socket or device: reading it could block forever
            skipped.append(f"{_printable(p)} (not a regular file)")
            continue
        if not _utf8(p):
            skipped.append(f"{_printable(p)} (its name is not UTF-8)")
            continue
        fp, size, mtime = fingerprint_from_info(info)
        out.append(Source(_to_uri(fs, p, local), rel, fp, size, mtime))
    if skipped:
        logger.warning(
            "input %s: %d entries skipped, e.g. %s", input_uri, len(skipped), skipped[:5]
        )
    if not out:
        raise EmptyInput(f"no input files found at {input_uri}")
    return out


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a local name (surrogate escapes)
        return False
    return True


def _printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _through_links(
    fs: fsspec.AbstractFileSystem, found: dict[str, Any], root: str, skipped: list[str]
) -> dict[str, Any]:
    """`found` (a local listing under `root`) with its symbolic links followed: a link to a
    file outside `root` is that file (under the link's name), a link to a folder outside it
    adds the folder's files (each real folder once, so loops end); a link that leads inside
    a listed folder is dropped (its target is listed already) and one that leads nowhere is
    named in `skipped`."""
    walked = [os.path.realpath(root)]
    files: set[str] = set()  # real paths of the files reached through links

    def inside_walked(real: str) -> bool:
        return any(real == w or real.startswith(w.rstrip("/") + "/") for w in walked)

    out: dict[str, Any] = {}
    # Breadth first, in name order: a file reached twice keeps its shortest, first name.
    todo = deque((p, info, False) for p, info in sorted(found.items()))
    while todo:
        p, info, via_link = todo.popleft()
        if not info.get("islink") or info.get("type") in ("file", "directory"):
            if via_link and info.get("type") == "file":
                real = os.path.realpath(p)  # reached twice (two links, or a link and a loop)
                if real.startswith(walked[0].rstrip("/") + "/") or real in files:
                    continue
                files.add(real)
            out[p] = info
            continue
        real = os.path.realpath(p)
        try:
            target = fs.info(p)  # follows the link
        except OSError:
            skipped.append(f"{_printable(p)} (a link to nothing: {_printable(real)})")
            continue
        if inside_walked(real):
            continue
        if target.get("type") == "directory":
            walked.append(real)
            todo.extend((q, i, True) for q, i in sorted(fs.find(p, detail=True).items()))
        elif real not in files:
            files.add(real)
            out[p] = {**target, "name": p}
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
    # The shard's listing rows follow from its file alone (a tar; a manifest whose rows each
    # carry a fingerprint or inline text): a re-index may carry a shard of the same identity
    # without listing it (`pipelines.reindex`). False when listing asks the store for objects'
    # fingerprints, which can change while the shard's file does not.
    lists_alone: bool = False


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
    return item_row(src.rel, src.uri, kind, shard, src.fingerprint, src.size, src.mtime)


def plan_job(cfg: JobConfig, files_shards: int | None = None, *, scan_workers: int = 8) -> Plan:
    """List the input of `cfg` into shards without reading media bytes.

    Args:
        files_shards: the shard count recorded by an earlier run on the same output
            (files format); None on a first run.
    """
    fmt, sources = input_sources(cfg)
    return fmt.plan(cfg, sources, files_shards, scan_workers)


def input_sources(cfg: JobConfig) -> tuple[InputFormat, list[Source]]:
    """The input's format and its objects (listed, none read): what planning starts from."""
    sources = list_input(cfg.input, cfg.storage_options(), exclude=cfg.output)
    fmt = input_format(detect_format(sources) if cfg.format == "auto" else cfg.format)
    if fmt.suffixes:
        bad = [s.rel for s in sources if not s.rel.lower().endswith(fmt.suffixes)]
        if bad:
            raise PlanError(f"format {fmt.name}: {bad[:3]} are not {fmt.noun}")
    return fmt, sources


def shard_identities(fmt: InputFormat, sources: Sequence[Source]) -> dict[str, str]:
    """{shard name: identity} of a manifest or WebDataset corpus's shards (the fingerprint
    of each file, from the listing: none is read). PlanError if two would share a name."""
    names = _shard_names(sources, fmt.suffixes)
    return {n: s.fingerprint for n, s in zip(names, sources, strict=True)}


def _plan_manifests(
    cfg: JobConfig, sources: list[Source], files_shards: int | None, scan_workers: int
) -> Plan:
    storage_options = cfg.storage_options()
    names = _shard_names(sources, MANIFEST_SUFFIXES)

    def scan(args: tuple[Source, str]) -> tuple[ShardSpec, np.ndarray, int]:
        src, name = args
        repeats: list[str] = []
        facts: dict = {}
        table = manifest_keys(read_manifest(src.uri, storage_options), name, repeats, facts)
        counts = Counter(
            {r["values"]: r["counts"] for r in pc.value_counts(table.column("_kind")).to_pylist()}
        )
        spec = ShardSpec(
            name,
            "manifest",
            src.uri,
            src.fingerprint,
            tuple(sorted(counts)),
            counts=dict(counts),
            identity=src.fingerprint,
            lists_alone=facts["lists_alone"],
        )
        return spec, id_digests(table.column("id")), len(repeats)

    with ThreadPoolExecutor(scan_workers) as ex:
        scanned = list(ex.map(scan, zip(sources, names, strict=True)))
    shards = [spec for spec, _, _ in scanned]
    duplicates = sum(n for _, _, n in scanned)
    duplicates += _exclude_repeated_ids(
        shards, [d for _, d, _ in scanned], storage_options, scan_workers
    )
    total: Counter[str] = Counter()
    for s in shards:
        total.update(s.counts or {})
    kinds = tuple(sorted(k for k, n in total.items() if n))
    return Plan("manifest", cfg.input, shards, kinds, dict(total), duplicates=duplicates)


def _plan_webdataset(
    cfg: JobConfig, sources: list[Source], files_shards: int | None, scan_workers: int
) -> Plan:
    names = _shard_names(sources, TAR_SUFFIXES)
    kinds = cfg.webdataset.kinds
    if kinds is None:
        kinds = _peek_kinds(sources, cfg.storage_options(), cfg.webdataset.extensions)
    kinds_t = tuple(sorted(set(kinds)))
    shards = [
        ShardSpec(
            n, "webdataset", s.uri, s.fingerprint, kinds_t, identity=s.fingerprint, lists_alone=True
        )
        for s, n in zip(sources, names, strict=True)
    ]
    return Plan("webdataset", cfg.input, shards, kinds_t, None)


def _exclude_repeated_ids(
    shards: list[ShardSpec],
    digests: Sequence[np.ndarray],
    storage_options: StorageOptions | None,
    workers: int,
) -> int:
    """Set `exclude` (and fix `counts`/`kinds`) on manifest shards that repeat ids of earlier
    shards; returns how many rows were excluded. Shards whose rows share a digest with another
    row are read again to compare the ids and name them: a second read only when the corpus
    has duplicates (or, rarely, a digest collision)."""
    tables: dict[int, pa.Table] = {}

    def read(k: int) -> pa.Table:
        s = shards[k]
        return manifest_keys(read_manifest(s.uri, storage_options), s.name)

    def read_ids(ks: list[int]) -> list[pa.ChunkedArray]:
        with ThreadPoolExecutor(max(1, min(workers, len(ks)))) as ex:
            tables.update(zip(ks, ex.map(read, ks), strict=True))
        return [tables[k].column("id") for k in ks]

    excluded = 0
    for k, idx in enumerate(repeated_rows(digests, read_ids)):
        if not len(idx):
            continue
        spec = shards[k]
        dup = tables[k].select(["id", "_kind"]).take(pa.array(idx)).to_pylist()
        spec.exclude = sorted({it["id"] for it in dup})
        counts = Counter(spec.counts or {})
        counts.subtract(it["_kind"] for it in dup)
        spec.counts = {kind: n for kind, n in counts.items() if n > 0}
        spec.kinds = tuple(sorted(spec.counts))
        excluded += len(dup)
    return excluded


def warn_repeats(shard: ShardSpec, repeats: Collection[str]) -> None:
    """Say which rows of manifest `shard` a run skips because their ids are another
    manifest's: one earlier in name order, or one committed before (`reconcile`, which knows
    which; said there, once per run, for the shards the run embeds)."""
    if repeats:
        logger.warning(
            "manifest %s: %d rows repeat ids of another manifest (earlier in name order, or "
            "committed before) and are skipped: an id is embedded once, e.g. %s",
            shard.name,
            len(repeats),
            sorted(repeats)[:3],
        )


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


def _plan_files(
    cfg: JobConfig, sources: list[Source], files_shards: int | None, scan_workers: int = 0
) -> Plan:
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
    files: Mapping[str, Mapping[str, int]] | None = None,
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
    pool = max(1, min(workers, len(done) or 1))
    with ThreadPoolExecutor(pool) as ex:
        recorded = list(
            ex.map(lambda s: output.read_identity(s.name, files) if s.identity else None, done)
        )
    stale = [s for s, r in zip(done, recorded, strict=True) if s.identity and r != s.identity]
    stale_names = {s.name for s in stale}
    unchanged = [s for s in done if s.name not in stale_names]
    if not stale and not (plan.format == "manifest" and new and done):
        for s in new:
            warn_repeats(s, s.exclude or ())
        return new, [], unchanged
    logger.info(
        "%d committed shards changed since they were committed: looking for new items", len(stale)
    )
    with ThreadPoolExecutor(pool) as ex:
        names = [s.name for s in done]
        ids_of = dict(zip(names, ex.map(output.committed_ids, names), strict=True))
    return input_format(plan.format).extend(
        _Rerun(output, storage_options, workers, ids_of, files), new, stale, unchanged
    )


@dataclass
class _Rerun:
    """What the per-format halves of `reconcile` share."""

    output: Output
    storage_options: StorageOptions | None
    workers: int
    ids_of: dict[str, set[str]]  # committed ids per committed shard
    files: Mapping[str, Mapping[str, int]] | None = None  # committed files as listed

    def up_to_date(self, s: ShardSpec) -> ShardSpec:
        """`s` has nothing new: record its current input identity (the next run skips it)."""
        listed = None if self.files is None else self.files.get(s.name, {})
        self.output.write_identity(s.name, s.identity or "", listed)
        return s


_Split = tuple[list[ShardSpec], list[ShardSpec], list[ShardSpec]]


def _extend_files(
    run: _Rerun, new: list[ShardSpec], stale: list[ShardSpec], unchanged: list[ShardSpec]
) -> _Split:
    extended = []
    for s in stale:
        have = run.ids_of[s.name]
        items = {k: [it for it in v if it["id"] not in have] for k, v in (s.items or {}).items()}
        items = {k: v for k, v in items.items() if v}
        if not items:
            unchanged.append(run.up_to_date(s))
            continue
        counts = {k: len(v) for k, v in items.items()}
        extended.append(
            dataclasses.replace(s, kinds=tuple(sorted(items)), items=items, counts=counts)
        )
    return new, extended, unchanged


def _extend_webdataset(
    run: _Rerun, new: list[ShardSpec], stale: list[ShardSpec], unchanged: list[ShardSpec]
) -> _Split:
    extended = []
    for s in stale:  # the tar is read again; members already committed are seeked over
        have = run.ids_of[s.name]
        # ids of outputs written under the earlier rule `<shard>/<member>`: the same members
        n = len(s.name) + 1
        have = have | {wds_id(s.name, i[n:]) for i in have if i.startswith(s.name + "/")}
        extended.append(dataclasses.replace(s, exclude=sorted(have)))
    return new, extended, unchanged


def _extend_manifests(
    run: _Rerun, new: list[ShardSpec], stale: list[ShardSpec], unchanged: list[ShardSpec]
) -> _Split:
    everywhere: set[str] = set().union(*run.ids_of.values()) if run.ids_of else set()

    def narrow(s: ShardSpec) -> ShardSpec:
        items = manifest_items(read_manifest(s.uri, run.storage_options), s.name, s.uri)
        excl = set(s.exclude or ())
        excl |= {it["id"] for it in items if it["id"] in everywhere}
        # Repeats: ids of other manifests (not the shard's own committed ones, which are done).
        warn_repeats(s, excl - run.ids_of.get(s.name, set()))
        counts = Counter(it["_kind"] for it in items if it["id"] not in excl)
        return dataclasses.replace(
            s, kinds=tuple(sorted(counts)), counts=dict(counts), exclude=sorted(excl)
        )

    with ThreadPoolExecutor(max(1, min(run.workers, len(stale) + len(new)))) as ex:
        narrowed_new = list(ex.map(narrow, new))
        narrowed_stale = list(ex.map(narrow, stale))
    extended = []
    for s in narrowed_stale:
        if s.kinds:
            extended.append(s)
        else:
            unchanged.append(run.up_to_date(s))
    return narrowed_new, extended, unchanged


# ----------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class InputFormat:
    """One input format: the suffixes of its shard files (none: any media file), how a corpus
    of it is planned, how a committed shard is checked for new items on a rerun, and the item
    rows of one shard (`pipelines.formats`)."""

    name: str
    suffixes: tuple[str, ...]
    noun: str
    plan: Callable[[JobConfig, list[Source], int | None, int], Plan]
    extend: Callable[[_Rerun, list[ShardSpec], list[ShardSpec], list[ShardSpec]], _Split]
    shard_rows: Callable[..., Iterator[dict[str, Any]]]
    # The shard's rows as one table (same arguments and rows as `shard_rows`), for formats
    # whose shards are read whole anyway: the read task then filters and cuts them column by
    # column instead of row by row. None: `shard_rows` only. Its rows' ids are unique
    # (`manifest_table` keeps an id's first row): the Ray listing does not count them
    # again (`_flag_repeats`).
    shard_table: Callable[..., pa.Table] | None = None


FORMATS: dict[str, InputFormat] = {
    "manifest": InputFormat(
        "manifest",
        MANIFEST_SUFFIXES,
        "Parquet/CSV/JSONL manifests",
        _plan_manifests,
        _extend_manifests,
        manifest_rows,
        manifest_shard_table,
    ),
    "webdataset": InputFormat(
        "webdataset", TAR_SUFFIXES, "tar shards", _plan_webdataset, _extend_webdataset, tar_rows
    ),
    "files": InputFormat("files", (), "media files", _plan_files, _extend_files, files_rows),
}


def input_format(name: str) -> InputFormat:
    """The `InputFormat` called `name`; PlanError if there is none."""
    try:
        return FORMATS[name]
    except KeyError:
        raise PlanError(f"unknown format {name!r}") from None


# ----------------------------------------------------------------------------- listing items


# Listing rows held as Python dicts at a time; each chunk becomes Arrow (~100 bytes a row, the
# dicts ~1 KB) before the next is listed.
LIST_CHUNK_ROWS = 65_536


def list_items(
    cfg: JobConfig, *, stat: bool = True, threads: int = 16, plan: Plan | None = None
) -> pa.Table:
    """Every item of the corpus as rows (LISTING_SCHEMA) without reading payload bytes.

    Columns: id, uri, modality (kind; "invalid" for rejected manifest rows), shard, source
    (the manifest/tar URI, or the file), fingerprint, size, mtime, error. For manifest rows
    that reference objects and carry no fingerprint, `stat=True` asks the store for each
    object's metadata (a HEAD request, no body). This is what re-indexing diffs against the
    `fingerprint` column of a previous output. `plan`: these shards only (default: all,
    `plan_job(cfg)`).
    """
    chunks = list(_listing_chunks((plan or plan_job(cfg)).shards, cfg, stat, threads))
    return skip_repeats(pa.concat_tables(chunks)) if chunks else LISTING_SCHEMA.empty_table()


# Said when a listing drops items that repeat an id of their shard (ids repeated across shards
# are excluded by planning): the same rule as the embedding job, which embeds the first.
REPEATS_SKIPPED = (
    "%d listed items repeat the id of an earlier item of their shard (a tar holding two "
    "members of one name) and are skipped, the first one kept: e.g. %r"
)


def skip_repeats(listing: pa.Table) -> pa.Table:
    """`listing` without the rows whose id an earlier row holds, said in a warning. Planning
    keeps an id's first manifest; what remains are repeats inside one shard."""
    keep = first_occurrences(listing.column("id"))
    if len(keep) == listing.num_rows:
        return listing
    dropped = np.ones(listing.num_rows, bool)
    dropped[keep] = False
    example = listing.column("id")[int(np.flatnonzero(dropped)[0])].as_py()
    logger.warning(REPEATS_SKIPPED, listing.num_rows - len(keep), example)
    return listing.take(pa.array(keep))


def list_items_on_ray(
    cfg: JobConfig,
    *,
    stat: bool = True,
    threads: int = 16,
    start_ray: Callable[[Sequence[str]], Any] | None = None,
    plan: Plan | None = None,
    bases: tuple[str, str, StorageOptions | None] | None = None,
) -> Any:
    """`list_items` as a Ray dataset: the driver plans (for manifests and WebDataset, one
    spec a manifest or tar), Ray tasks list the shards (read manifests and tar headers, ask
    the store for fingerprints), and the rows never reach the driver. `start_ray(kinds)` is
    called once the plan knows the corpus's kinds, before any Ray call (the caller starts Ray
    as its job would). Raises EmptyInput, like `list_items`, when the input holds nothing to
    list. `plan`: as for `list_items`. `bases` (index root, folder relative to it, storage
    options): each task also writes its shard's key snapshot base there
    (`pipelines.keys.write_base`, named `base_name(shard)`).

    The rows are LISTING_SCHEMA's plus REPEAT (bool): True on a row whose id an earlier row of
    the same shard lists (a tar holding two members of one name; repeats across manifests are
    excluded by the plan). Whoever reads the dataset skips such rows, as `list_items` does
    (`pipelines.diff.diff_on_ray` does, and says how many): the flag is set where the whole
    shard is in one place, so it does not depend on how blocks are split or shuffled later."""
    import ray.data

    plan = plan or plan_job(cfg)
    if start_ray is not None:
        start_ray(plan.kinds)
    shards = plan.shards
    if not shards:
        return ray.data.from_arrow(_flag_repeats(LISTING_SCHEMA.empty_table()))
    specs = ray.data.from_items(
        [{"spec": pickle.dumps(s)} for s in shards], override_num_blocks=len(shards)
    )
    return specs.map_batches(
        _list_specs,
        fn_kwargs={"cfg": cfg, "stat": stat, "threads": threads, "bases": bases},
        batch_size=1,  # one shard a task: a shard is up to a manifest's or a tar's rows
        batch_format="pyarrow",
    )


# The column `list_items_on_ray` adds to LISTING_SCHEMA.
REPEAT = "_repeat"


def _flag_repeats(t: pa.Table, unique: bool = False) -> pa.Table:
    """`t` (one shard's rows) with REPEAT: True where an earlier row has the same id.
    `unique`: the rows are known to be unique (a manifest's, deduplicated by
    `manifest_table`): all False, without counting them again."""
    repeat = np.zeros(t.num_rows, bool)
    if not unique:
        repeat[:] = True
        repeat[first_occurrences(t.column("id"))] = False
    return t.append_column(pa.field(REPEAT, pa.bool_()), pa.array(repeat))


def list_shard(
    shard: ShardSpec,
    cfg: JobConfig,
    *,
    stat: bool = True,
    threads: int = 16,
    facts: dict | None = None,
) -> pa.Table:
    """One shard's listing rows (LISTING_SCHEMA) with REPEAT flags. `facts`, if given, gets
    for a manifest `lists_alone` (as `ShardSpec.lists_alone`: no row asked the store for its
    fingerprint) and `repeats` (ids its rows repeat, later rows skipped)."""
    fmt = input_format(shard.format)
    if fmt.shard_table is None:
        chunks = list(_listing_chunks([shard], cfg, stat, threads))
        return _flag_repeats(pa.concat_tables(chunks) if chunks else LISTING_SCHEMA.empty_table())
    storage_options = cfg.storage_options()
    repeats: list[str] = []
    t = _table_listing(shard, storage_options, repeats)
    if facts is not None:
        asks = pc.and_(pc.is_null(t.column("fingerprint")), pc.is_null(t.column("error")))
        facts["lists_alone"] = not pc.any(asks).as_py()
        facts["repeats"] = repeats
    if stat:
        t = _stat_table(t, storage_options, threads)
    return _flag_repeats(t, unique=True)


def manifest_specs(cfg: JobConfig, sources: Sequence[Source]) -> Plan:
    """A manifest corpus's plan without reading its manifests: one spec a manifest, every kind
    allowed, no counts, no ids excluded (`ShardSpec.exclude`) and `lists_alone` unknown
    (False). For a run whose tasks read each manifest anyway and find ids repeated across
    manifests themselves (`pipelines.keys.diff_shards`): `plan_job` reads every manifest on
    the driver first to find them."""
    names = _shard_names(sources, MANIFEST_SUFFIXES)
    kinds = tuple(sorted({*KINDS, INVALID}))
    shards = [
        ShardSpec(n, "manifest", s.uri, s.fingerprint, kinds, identity=s.fingerprint)
        for s, n in zip(sources, names, strict=True)
    ]
    return Plan("manifest", cfg.input, shards, tuple(sorted(KINDS)), None)


def _list_specs(
    batch: pa.Table,
    cfg: JobConfig,
    stat: bool,
    threads: int,
    bases: tuple[str, str, StorageOptions | None] | None = None,
) -> pa.Table:
    from imagebind_core.index import join_uri
    from pipelines.keys import base_name, write_base

    out = []
    for spec in batch.column("spec").to_pylist():
        shard = pickle.loads(spec)
        t = list_shard(shard, cfg, stat=stat, threads=threads)
        if bases is not None:
            root, folder, so = bases
            kept = t.filter(pc.invert(t.column(REPEAT)))
            write_base(kept, join_uri(root, folder, base_name(shard.name)), so)
        out.append(t)
    return pa.concat_tables(out) if out else _flag_repeats(LISTING_SCHEMA.empty_table())


def _listing_chunks(
    shards: Sequence[ShardSpec], cfg: JobConfig, stat: bool, threads: int
) -> Iterator[pa.Table]:
    """The listing rows of `shards`, in order, as tables of at most LIST_CHUNK_ROWS rows."""
    storage_options = cfg.storage_options()
    rows: list[dict[str, Any]] = []

    def stated(t: pa.Table) -> pa.Table:
        return _stat_table(t, storage_options, threads) if stat else t

    def chunk() -> pa.Table:
        t = pa.Table.from_pylist(
            [{k: r.get(k) for k in LISTING_SCHEMA.names} for r in rows], schema=LISTING_SCHEMA
        )
        rows.clear()
        return stated(t)

    for shard in shards:
        if input_format(shard.format).shard_table is not None:  # column by column
            if rows:
                yield chunk()
            table = _table_listing(shard, storage_options)
            for s in range(0, table.num_rows, LIST_CHUNK_ROWS):
                yield stated(table.slice(s, LIST_CHUNK_ROWS))
            continue
        for r in _listed_rows(shard, cfg, storage_options):
            rows.append(r)
            if len(rows) >= LIST_CHUNK_ROWS:
                yield chunk()
    if rows:
        yield chunk()


def _table_listing(
    shard: ShardSpec, storage_options: StorageOptions | None, repeats: list[str] | None = None
) -> pa.Table:
    """`_listed_rows` of a shard whose format reads it as one table (`shard_table`: manifests),
    built column by column (the same rows: tested against the row-by-row path). `repeats`
    gets the ids the shard's rows repeat (later rows skipped)."""
    t = input_format(shard.format).shard_table(
        shard.name,
        shard.uri,
        shard.fingerprint,
        shard.kinds,
        storage_options=storage_options,
        repeats=repeats,
    )
    if shard.exclude:
        skip = pa.array(sorted(shard.exclude), pa.string())
        t = t.filter(pc.invert(pc.is_in(t.column("id"), value_set=skip)))
    known = pc.is_in(t.column("modality"), value_set=pa.array(sorted(KINDS), pa.string()))
    invalid = pc.and_(pc.is_valid(t.column("error")), pc.invert(pc.fill_null(known, False)))
    cols = {
        "modality": pc.if_else(invalid, pa.scalar(INVALID, pa.string()), t.column("modality")),
        "source": pa.repeat(pa.scalar(shard.uri, pa.string()), t.num_rows),
    }
    cols |= {f.name: t.column(f.name) for f in LISTING_SCHEMA if f.name not in cols}
    return pa.table([cols[f.name].cast(f.type) for f in LISTING_SCHEMA], schema=LISTING_SCHEMA)


def _stat_table(t: pa.Table, storage_options: StorageOptions | None, threads: int) -> pa.Table:
    """`t` (LISTING_SCHEMA) with the rows that have neither a fingerprint nor an error filled
    from the store (`_stat_rows`); only those rows become Python dicts."""
    need = pc.and_(pc.is_null(t.column("fingerprint")), pc.is_null(t.column("error")))
    need = need.combine_chunks() if isinstance(need, pa.ChunkedArray) else need
    if not pc.any(need).as_py():
        return t
    rows = t.filter(need).to_pylist()
    _stat_rows(rows, storage_options, threads)
    got = pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)
    for name in ("fingerprint", "size", "mtime", "error"):
        i = t.schema.get_field_index(name)
        col = pc.replace_with_mask(
            t.column(name).combine_chunks(), need, got.column(name).combine_chunks()
        )
        t = t.set_column(i, t.schema.field(i), col)
    return t


def _listed_rows(
    shard: ShardSpec, cfg: JobConfig, storage_options: StorageOptions | None
) -> Iterator[dict[str, Any]]:
    """The listing rows of one shard: its items without payload bytes. An unreadable tar is
    listed as the rows the job records for it (`pipelines.rows.unreadable_shard_row`)."""
    skip = set(shard.exclude or ())
    rows = input_format(shard.format).shard_rows(
        shard.name,
        shard.uri,
        shard.fingerprint,
        shard.kinds,
        storage_options=storage_options,
        extensions=cfg.webdataset.extensions,
        items=shard.items,
        read=False,
    )
    for it in rows:
        if it["id"] in skip:
            continue
        if it["error"] is not None and it["modality"] not in KINDS:
            it["modality"] = INVALID
        yield {**it, "source": it["uri"] if shard.format == "files" else shard.uri}


def _stat_rows(
    rows: list[dict[str, Any]], storage_options: StorageOptions | None, threads: int
) -> None:
    """Fill `fingerprint`, `size`, `mtime` of `rows` from each object's metadata (or set
    `error` when the object is missing or cannot be asked)."""

    def fill(r: dict[str, Any]) -> None:
        try:
            fs, p = filesystem(r["uri"], storage_options)
            r["fingerprint"], r["size"], r["mtime"] = fingerprint_from_info(fs.info(p))
        except FileNotFoundError:
            r["error"] = f"object not found: {r['uri']}"
        except Exception as e:
            r["error"] = f"cannot stat {r['uri']}: {e}"

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(fill, rows))


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
