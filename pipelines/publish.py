"""Versioned, atomic publishing of embedding-index versions under one root URI.

Layout (see `imagebind_core.index`): every run stages a complete version under
`<root>/versions/<version:08d>-<run id>/` that nobody reads yet, then publishes it with one
compare-and-swap of the small pointer object `<root>/LATEST`:

- on S3 a PUT of one object is atomic, and a conditional PUT (`If-Match: <etag read>`, or
  `If-None-Match: *` for the first version) fails with 412 if another run moved the pointer in
  between. Readers therefore see the old version or the new one, never a mix, and of two runs
  that staged on the same parent exactly one publishes.
- on a local folder the same contract is kept with `os.replace` (atomic rename) under an
  `fcntl` lock.

Besides the compare-and-swap, which alone guarantees correctness, `pipelines.reindex` holds the
lease lock of `pipelines.lock` on the index root (`<root>/_lock`, created with
`If-None-Match: *` through the conditional store of `pipelines.store`, renewed by a heartbeat,
broken with a conditional DELETE once stale) so a second run does not repeat the same work at
the same time.

Retention keeps the last N published versions (following `parent` links from `LATEST`) and
removes abandoned staging folders of crashed or losing runs.

Staging (`IndexRoot.stage` -> `StagedVersion`) places a version's files: `data/embedded/`
(this run's embeddings, Parquet), `index/` and the record `version.json`, written last. The
version's rows live in the root's Lance datasets (`pipelines.tables`): the record's `data`
pins the Lance version of each, tagged with the version's name; retention drops the tags of
removed versions so Lance can delete what only they used. `IndexRoot.read_rows` reads a
version's rows back, also of versions published before the Lance layout (Parquet under
`data/embedded/` and `data/carried/`, read with `read_parquet_tree`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imagebind_core.index import (
    DATA_DIR,
    INDEX_DIR,
    POINTER_NAME,
    RECORD_NAME,
    VERSIONS_DIR,
    Pointer,
    index_files,
    join_uri,
)
from imagebind_core.io import StorageOptions, canonical_uri, filesystem
from pipelines.keys import KEYS_DIR, snapshot_files
from pipelines.store import PreconditionFailed, hidden, open_store
from pipelines.tables import FAILURES_TABLE, ROWS_TABLE, Pin, VersionTable, read_pin

logger = logging.getLogger(__name__)

# Fault-injection hook for the crash tests: when set to a path, a run about to swap the pointer
# creates that file and waits until `<path>.go` exists (a test kills it or lets it go on).
PAUSE_ENV = "IMAGEBIND_PUBLISH_PAUSE_FILE"


class PublishConflict(RuntimeError):
    """Another run published a version after this run read the pointer; nothing was published."""


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string (seconds)."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


# ------------------------------------------------------------------------- index root


def version_name(version: int, run_id: str) -> str:
    """Folder name of a staged version: zero-padded number (sorts) plus the run id (unique)."""
    return f"{version:08d}-{run_id}"


def parse_version_name(name: str) -> int | None:
    """The version number in a version folder name, or None if it is not one."""
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def new_run_id() -> str:
    """A short unique id for one run."""
    return uuid.uuid4().hex[:12]


class IndexRoot:
    """Publishing operations on one index root URI (local folder or s3:// prefix)."""

    def __init__(self, root: str, storage_options: StorageOptions | None = None) -> None:
        # A local root is made absolute: the URIs a version records (its Lance pins) then
        # name the same place from any working directory.
        self.root = canonical_uri(root)
        self.storage_options = dict(storage_options or {})
        self.store = open_store(self.root, self.storage_options)

    def version_uri(self, name: str) -> str:
        """URI of the version folder `name`."""
        return join_uri(self.root, VERSIONS_DIR, name)

    def stage(self, version: int) -> StagedVersion:
        """A new, empty staging folder for `version` (named with a fresh run id)."""
        return StagedVersion(self, version, version_name(version, new_run_id()))

    def latest(self) -> tuple[Pointer | None, str | None]:
        """The published pointer and its etag (both None before the first publish)."""
        got = self.store.get(POINTER_NAME)
        if got is None:
            return None, None
        return Pointer.from_json(got[0], join_uri(self.root, POINTER_NAME)), got[1]

    def read_record(self, name: str) -> dict:
        """The version record of version folder `name`."""
        uri = join_uri(self.version_uri(name), RECORD_NAME)
        fs, path = filesystem(uri, self.storage_options)
        data = fs.cat_file(path)
        try:
            record = json.loads(data)
        except ValueError as e:
            raise ValueError(f"{uri} is not a version record: {e}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{uri} is not a version record: {type(record).__name__}")
        return record

    def write_record(self, name: str, record: dict) -> None:
        """Write the version record into the staged folder `name` (before publishing)."""
        fs, path = filesystem(join_uri(self.version_uri(name), RECORD_NAME), self.storage_options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, json.dumps(record, indent=2, sort_keys=True).encode())

    def publish(self, pointer: Pointer, expected_etag: str | None) -> None:
        """Swap `LATEST` to `pointer` iff it still has `expected_etag` (None: does not exist).

        Raises PublishConflict (and changes nothing) if another run published in between.
        """
        _pause_point()
        try:
            if expected_etag is None:
                self.store.put(POINTER_NAME, pointer.to_json(), if_none_match=True)
            else:
                self.store.put(POINTER_NAME, pointer.to_json(), if_match=expected_etag)
        except PreconditionFailed:
            raise PublishConflict(
                f"another run published to {self.root} after this run read the pointer; "
                f"version {pointer.name} was not published"
            ) from None
        logger.info("published version %s at %s", pointer.name, self.root)

    def _list_version_names(self) -> list[str]:
        fs, path = filesystem(join_uri(self.root, VERSIONS_DIR), self.storage_options)
        try:
            entries = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if parse_version_name(n) is not None)

    def history(self) -> list[dict]:
        """Version records of the published chain, newest first (follows `parent_name`)."""
        pointer, _ = self.latest()
        out: list[dict] = []
        name = pointer.name if pointer else None
        while name:
            try:
                rec = self.read_record(name)
            except FileNotFoundError:
                break  # older versions were removed by retention
            out.append(rec)
            name = rec.get("parent_name")
        return out

    def tables(self) -> tuple[VersionTable, VersionTable]:
        """The root's Lance datasets: rows and failures."""
        return (
            VersionTable(self.root, ROWS_TABLE, self.storage_options),
            VersionTable(self.root, FAILURES_TABLE, self.storage_options),
        )

    def read_rows(
        self, name: str, record: dict | None = None, *, errors: bool = False
    ) -> pa.Table | None:
        """The rows (`errors=False`) or failures of the version `name` (its record is read
        unless given); None if it has none. Versions recorded before the Lance layout are read
        from their Parquet folders."""
        record = record if record is not None else self.read_record(name)
        pins = data_pins(record, self.root)
        if pins is None:
            data_uri = join_uri(self.version_uri(name), DATA_DIR)
            return read_parquet_tree(data_uri, self.storage_options, errors=errors)
        return read_pin(pins[1] if errors else pins[0], self.storage_options)

    def discard(self, name: str) -> None:
        """Remove a staged (never published) or retired version folder and its Lance tags."""
        fs, path = filesystem(self.version_uri(name), self.storage_options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)
        for table in self.tables():
            table.untag(name)

    def _discard_except(self, name: str, in_use: set[str]) -> bool:
        """Discard the version folder `name` except the paths of `in_use` inside it: the
        record goes, so the version is gone, and the index files a kept version shares stay
        (a later retention removes them once no kept version uses them). Returns whether a
        version or a stage went (False: only left-over shared index files were cleaned)."""
        fs, path = filesystem(self.version_uri(name), self.storage_options)
        path = path.rstrip("/")
        try:
            files = fs.find(path)
        except FileNotFoundError:
            files = []
        spared = [p for p in in_use if p.startswith(path + "/")]
        doomed = [f for f in files if not any(f == p or f.startswith(p + "/") for p in spared)]
        shared = tuple(f"{path}/{d}/" for d in SHARED_DIRS)
        was_version = not files or any(not f.startswith(shared) for f in doomed)
        if not spared:
            self.discard(name)
            return was_version
        for f in doomed:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(f)
        if doomed:
            for table in self.tables():
                table.untag(name)
        return was_version and bool(doomed)

    def read_inputs(self, name: str) -> dict | None:
        """The version's `inputs.json` (what its corpus's shards were when listed, and its key
        snapshot); None when it has none. Raises ValueError when it is not JSON."""
        fs, path = filesystem(join_uri(self.version_uri(name), INPUTS_NAME), self.storage_options)
        try:
            return json.loads(fs.cat_file(path))
        except FileNotFoundError:
            return None

    def _keys_record(self, name: str) -> dict | None:
        try:
            doc = self.read_inputs(name)
        except ValueError:
            return None
        keys = doc.get("keys") if isinstance(doc, dict) else None
        return keys if isinstance(keys, dict) else None

    def apply_retention(self, keep: int) -> list[str]:
        """Keep the newest `keep` published versions; remove older ones and abandoned stages.

        A folder numbered above the published version may belong to a run still staging, so
        it is left alone (a later publish passes it, and then it is removed).
        Returns the names removed.
        """
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        pointer, _ = self.latest()
        if pointer is None:
            return []
        kept: set[str] = set()
        name: str | None = pointer.name
        while name and len(kept) < keep:
            kept.add(name)
            try:
                name = self.read_record(name).get("parent_name")
            except FileNotFoundError:
                break
        # A kept version's index may use segments an older version wrote (`index_files`), and
        # its key snapshot an older version's files (`snapshot_files`): those files stay when
        # that version goes.
        in_use = {
            p
            for n in kept
            for p in index_files(join_uri(self.version_uri(n), INDEX_DIR), self.storage_options)
        }
        for n in kept:
            in_use.update(snapshot_files(self.root, self._keys_record(n), self.storage_options))
        removed = []
        for n in self._list_version_names():
            num = parse_version_name(n)
            if n in kept or num is None or num > pointer.version:
                continue
            if self._discard_except(n, in_use):
                removed.append(n)
        if removed:
            logger.info("retention removed versions %s", removed)

        def keep_tag(tag: str) -> bool:  # tags of stages above the pointer may be in use
            num = parse_version_name(tag)
            return tag in kept or num is None or num > pointer.version

        for table in self.tables():
            freed = table.release(keep_tag)
            if freed:
                logger.info("retention freed %d bytes of %s", freed, table.uri)
        return removed


# ------------------------------------------------------------------------- version staging

# Where a version records what its corpus's shards were when listed, and its key snapshot.
INPUTS_NAME = "inputs.json"
# A version folder's subfolders whose files later versions may use (retention spares them).
SHARED_DIRS = (INDEX_DIR, KEYS_DIR)

# Inside a version's data/ folder: this run's embeddings (`pipelines.embed.embed_items` output;
# failed items in `_errors/`). Versions published before the Lance layout also hold `carried/`.
EMBEDDED_DIR = "embedded"
ERRORS_DIR = "_errors"
RECORD_FORMAT = 1  # `format` of version.json
DATA_FORMAT = "lance"  # `data.format` of version.json


def data_pins(record: dict | None, root: str) -> tuple[Pin | None, Pin | None] | None:
    """The Lance versions (rows, failures) a version record of index root `root` pins; None
    for a version published before the Lance layout (its rows are Parquet files in its folder).

    Each pin is read from `root` as the reader names it, whatever URI the record holds: the
    tables always live directly under the root, so a root reached by another path (a relative
    `--index-root` given from another folder, a moved folder, a copy on S3) still works."""
    data = (record or {}).get("data")
    if not data:
        return None
    if data.get("format") != DATA_FORMAT:
        raise ValueError(f"version record: unknown data format {data.get('format')!r}")
    rows, failures = Pin.from_json(data.get("rows")), Pin.from_json(data.get("failures"))
    return _at(root, rows, ROWS_TABLE), _at(root, failures, FAILURES_TABLE)


def _at(root: str, pin: Pin | None, table: str) -> Pin | None:
    return None if pin is None else Pin(join_uri(root, table), pin.version)


def data_record(rows: Pin | None, failures: Pin | None) -> dict[str, Any]:
    """The record's `data` field for these pins."""
    return {
        "format": DATA_FORMAT,
        "rows": rows.to_json() if rows else None,
        "failures": failures.to_json() if failures else None,
    }


def parquet_files(uri: str, storage_options: StorageOptions, *, errors: bool) -> list[str]:
    """The Parquet files `read_parquet_tree` reads, as paths of `filesystem(uri)`."""
    fs, root = filesystem(uri, storage_options)
    try:
        fs.invalidate_cache(root)
        files = sorted(fs.find(root))
    except FileNotFoundError:
        return []
    picked = []
    for f in files:
        if not f.endswith(".parquet"):
            continue
        rel = f[len(root.rstrip("/")) + 1 :].split("/")
        hidden_dirs = [p for p in rel[:-1] if hidden(p)]
        if hidden(rel[-1]):
            continue
        if (errors and hidden_dirs == [ERRORS_DIR]) or (not errors and not hidden_dirs):
            picked.append(f)
    return picked


def read_parquet_tree(
    uri: str, storage_options: StorageOptions, *, errors: bool, columns: list[str] | None = None
) -> pa.Table | None:
    """All Parquet files under `uri`: data files (`errors=False`, `_`/`.` paths skipped) or the
    files inside `_errors/` folders (`errors=True`), only `columns` when given. None if there
    are none."""
    picked = parquet_files(uri, storage_options, errors=errors)
    if not picked:
        return None
    fs, _ = filesystem(uri, storage_options)
    tables = []
    for f in picked:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns))
    return pa.concat_tables(tables, promote_options="default")


def iter_parquet(
    uri: str, files: list[str], storage_options: StorageOptions, batch_rows: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """Stream the record batches of `files` (paths of `filesystem(uri)`, as `parquet_files`
    gives them), `batch_rows` at a time: memory does not grow with the files."""
    fs, _ = filesystem(uri, storage_options)
    for f in files:
        with fs.open(f, "rb") as fh:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_rows)


def arrow_fs(uri: str, storage_options: StorageOptions) -> Any:
    """A pyarrow filesystem over the fsspec one of `uri` (for Ray Data reads and writes)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(filesystem(uri, storage_options)[0]))


def record_rows(record: dict | None) -> int:
    """Rows plus kept failures of a published version, from its record."""
    if not record:
        return 0
    c = record.get("counts", {})
    return int(c.get("total", 0)) + int(c.get("failed", 0)) + int(c.get("failed_kept", 0))


class StagedVersion:
    """A version folder being written, that nobody reads until `IndexRoot.publish` points
    `LATEST` at it: `data/embedded/`, `index/` and `version.json` (its rows: Lance versions
    tagged with its name)."""

    def __init__(self, root: IndexRoot, version: int, name: str) -> None:
        self.root = root
        self.version = version
        self.name = name
        self.uri = root.version_uri(name)
        self.data_uri = join_uri(self.uri, DATA_DIR)
        self.embedded_uri = join_uri(self.data_uri, EMBEDDED_DIR)
        self.index_uri = join_uri(self.uri, INDEX_DIR)

    def read_embedded(self, *, vectors: bool = True) -> tuple[pa.Table | None, pa.Table | None]:
        """This run's embedded rows and its failures (None where there are none); without
        `vectors`, the rows' id, uri and modality only (what a run whose index is built from
        the Lance version needs: it never holds the vectors it embedded)."""
        storage_options = self.root.storage_options
        columns = None if vectors else ["id", "uri", "modality"]
        return (
            read_parquet_tree(self.embedded_uri, storage_options, errors=False, columns=columns),
            read_parquet_tree(self.embedded_uri, storage_options, errors=True),
        )

    def embedded_files(self, *, errors: bool) -> list[str]:
        """This run's embedded Parquet files (or its failures'), as paths of `arrow_fs`."""
        return parquet_files(self.embedded_uri, self.root.storage_options, errors=errors)

    def write_record(self, record: dict) -> None:
        """Write `version.json` (last: a folder without it was never finished)."""
        self.root.write_record(self.name, record)

    def discard(self) -> None:
        """Remove the folder (lost lock, lost publish)."""
        self.root.discard(self.name)

    def pointer(self) -> Pointer:
        """The `LATEST` pointer that publishes this version."""
        return Pointer(self.version, self.name, utc_now())


def _pause_point() -> None:
    """Test hook (see PAUSE_ENV): announce we are about to swap, then wait for permission."""
    marker = os.environ.get(PAUSE_ENV)
    if not marker:
        return
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    while not os.path.exists(marker + ".go"):
        time.sleep(0.05)
