"""Key snapshots: what a version holds from each shard of its corpus, as (`id`, digest) pairs,
so that the next re-index diffs each shard where it is listed and joins only what differs.

Without a snapshot, a re-index of a manifest or WebDataset corpus joins every listed item with
every row of the parent version on Ray Data (`pipelines.diff.diff_on_ray`): two hash shuffles
of the corpus's keys, whatever the change. With one, each Ray task that lists a shard also
reads the parent's (`id`, digest) pairs of that shard and compares them to its listing, where
the digest is a 64-bit hash of the item's (`fingerprint`, `uri`, `modality`). An item listed
with the digest the parent holds for it is carried as it is (a row or a kept failure: both
stay in the parent's Lance versions untouched); only the other items, and the parent's ids a
shard no longer lists, come back to the driver and are diffed there against the parent's
rows for those ids (`diff_shards`): the join is the size of the change.

Why a digest and not the key columns: the snapshot costs ~20 bytes an item (`id` and 8 bytes)
where the key columns are ~100, and a collision needs two different (fingerprint, uri,
modality) triples of one id to hash alike (2^-64 a changed item). The hash is Polars' (a
maintained, vectorised xxhash-family row hash: ~0.15 us an item here). Polars keeps it stable
within one version only, so the snapshot records the scheme (`SCHEME`, with Polars' version):
a run under another scheme diffs in full, as without a snapshot, and writes a new one.

Layout. A snapshot is recorded in the version's `inputs.json` under `keys` (paths relative to
the index root):

    {"scheme": ..., "rows": <items in bases>, "delta_rows": <entries in deltas>,
     "bases": {<shard>: {"file": <path>, "since": <first delta that applies>}},
     "deltas": [<path>, ...]}

A base is one shard's pairs (Parquet: `id`, `h`) as some version listed it; a delta is one
version's changes to the shards it did not re-base (Parquet: `shard`, `id`, `h`, sorted by
shard; `h` null: the id left the shard). A shard's pairs for a version are its base with
`deltas[since:]` applied in order. A version writes a delta (its changed items) and bases for
shards that had none; when the parent's deltas reach COMPACT_FRACTION of its rows, or
MAX_DELTAS files, every shard is re-based and the deltas start over. Files stay in the folder
of the version that wrote them; later versions refer to them, and retention keeps every file a
kept version refers to (`snapshot_files`).

Safety. The parent's rows for the ids that come back are read from its Lance versions by id.
The items the shards matched must then number exactly the parent's rows and failures less
those read back; if not (a snapshot that does not describe its version), the run logs why and
diffs in full (`SnapshotMismatch`).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imagebind_core.index import join_uri
from imagebind_core.io import StorageOptions, filesystem
from pipelines.store import transient_store_error

logger = logging.getLogger(__name__)

KEYS_DIR = "keys"
BASE_SCHEMA = pa.schema([("id", pa.string()), ("h", pa.uint64())])
DELTA_SCHEMA = pa.schema([("shard", pa.string()), ("id", pa.string()), ("h", pa.uint64())])
# When the parent's deltas hold this share of its items (or MAX_DELTAS files), a run re-bases
# every shard: each task reads its base plus every delta, and a re-base costs ~20 bytes an
# item, so deltas are kept well below the bases they amend.
COMPACT_FRACTION = 0.1
MAX_DELTAS = 16
# The hash's seed (fixed: digests must agree from run to run).
_SEED = 0x1B1D


def scheme() -> str:
    """The digest's name: what a snapshot must have been written with to be compared."""
    import polars as pl

    return f"polars-struct-hash-{pl.__version__}-seed{_SEED}"


def digests(listing: pa.Table) -> pa.Array:
    """The uint64 digest of each row's (`fingerprint`, `uri`, `modality`), nulls included."""
    import polars as pl

    cols = {c: listing.column(c).cast(pa.string()) for c in ("fingerprint", "uri", "modality")}
    df = pl.from_arrow(pa.table(cols))
    assert isinstance(df, pl.DataFrame)
    h = df.select(pl.struct(["fingerprint", "uri", "modality"]).hash(_SEED)).to_series()
    return h.to_arrow().cast(pa.uint64())


def base_name(shard: str) -> str:
    """A base's file name: the shard's name hashed (shard names hold slashes and any
    character a store allows)."""
    return hashlib.sha256(shard.encode()).hexdigest()[:24] + ".parquet"


def _write(table: pa.Table, uri: str, storage_options: StorageOptions | None) -> None:
    fs, path = filesystem(uri, storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)  # a local folder; nothing on S3
    with fs.open(path, "wb") as fh:
        pq.write_table(table, fh, row_group_size=65_536)


def write_base(
    listing: pa.Table,
    uri: str,
    storage_options: StorageOptions | None,
    h: pa.Array | None = None,
) -> int:
    """Write a shard's base at `uri` from its listing rows (repeats already left out) and
    their digests `h` (default: computed here); returns the pairs written."""
    h = digests(listing) if h is None else h
    t = pa.table([listing.column("id").cast(pa.string()), h], schema=BASE_SCHEMA)
    _write(t, uri, storage_options)
    return t.num_rows


def _read(uri: str, storage_options: StorageOptions | None, shard: str | None = None) -> pa.Table:
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as fh:
        if shard is None:
            return pq.read_table(fh)
        return pq.read_table(fh, filters=[("shard", "=", shard)])


def shard_pairs(
    root: str, record: dict, shard: str, storage_options: StorageOptions | None
) -> pa.Table | None:
    """The (`id`, `h`) pairs the snapshot `record` holds for `shard`; None when it has no base
    for it."""
    entry = record["bases"].get(shard)
    if entry is None:
        return None
    try:
        t = _read(join_uri(root, entry["file"]), storage_options).cast(BASE_SCHEMA)
        for rel in record["deltas"][int(entry["since"]) :]:
            d = _read(join_uri(root, rel), storage_options, shard)
            if d.num_rows:
                t = _apply(t, d)
    except (FileNotFoundError, pa.ArrowInvalid, KeyError, TypeError, ValueError) as e:
        if transient_store_error(e):
            raise
        raise SnapshotMismatch(f"shard {shard!r}: {type(e).__name__}: {str(e)[:200]}") from None
    return t


def _apply(base: pa.Table, delta: pa.Table) -> pa.Table:
    """`base` with `delta`'s entries applied: each of its ids replaced, or gone (null `h`)."""
    kept = base.filter(pc.invert(pc.is_in(base.column("id"), value_set=delta.column("id"))))
    new = delta.filter(pc.is_valid(delta.column("h"))).select(["id", "h"]).cast(BASE_SCHEMA)
    return pa.concat_tables([kept, new])


def snapshot_files(root: str, record: dict | None, storage_options: StorageOptions | None):
    """The filesystem paths of the files a snapshot refers to (retention keeps them)."""
    if not record:
        return []
    rels = [e["file"] for e in record.get("bases", {}).values()] + list(record.get("deltas", []))
    return [filesystem(join_uri(root, r), storage_options)[1] for r in rels]


def usable(record: dict | None) -> bool:
    """Whether a parent's snapshot can be compared with this run's digests."""
    return (
        isinstance(record, dict)
        and record.get("scheme") == scheme()
        and isinstance(record.get("bases"), dict)
        and isinstance(record.get("deltas"), list)
    )


def due_compaction(record: dict) -> bool:
    """Whether a run from a parent with this snapshot re-bases every shard."""
    rows = max(int(record.get("rows", 0)), 1)
    return (
        len(record["deltas"]) >= MAX_DELTAS
        or int(record.get("delta_rows", 0)) >= COMPACT_FRACTION * rows
    )


def new_record(bases: dict[str, dict], deltas: list[str], rows: int, delta_rows: int) -> dict:
    return {
        "scheme": scheme(),
        "rows": int(rows),
        "delta_rows": int(delta_rows),
        "bases": dict(sorted(bases.items())),
        "deltas": list(deltas),
        "repeats": False,
    }


# ----------------------------------------------------------------------------- shard tasks


@dataclass
class ShardResult:
    """What a shard's task sends back: its listing rows that differ from the parent's pairs
    (with REPEAT flags and their digests in `_h`), the parent's ids it no longer lists, how
    many rows matched, how many it listed, and for a manifest whether its listing follows
    from its file alone and the ids its rows repeat (`pipelines.plan.list_shard`'s facts)."""

    shard: str
    unmatched: pa.Table
    gone: pa.Array
    matched: int
    listed: int = 0
    lists_alone: bool | None = None
    repeats: list[str] = field(default_factory=list)


H_COL = "_h"


def compare_shard(
    listing: pa.Table,
    parent: pa.Table | None,
    shard: str,
    repeat_col: str,
    h: pa.Array | None = None,
) -> tuple[pa.Table, pa.Array, int]:
    """One shard's listing (with REPEAT flags in `repeat_col`) against the parent's pairs for
    it: (rows that do not match, with their digests in H_COL; parent ids no longer listed;
    rows matched). Rows flagged as repeats never match (the driver says them). `h`: the
    listing's digests (default: computed here)."""
    import polars as pl

    h = digests(listing) if h is None else h
    repeat = pc.fill_null(listing.column(repeat_col), False)
    listing = listing.append_column(pa.field(H_COL, pa.uint64()), h)
    if parent is None or parent.num_rows == 0:
        return listing, pa.array([], pa.string()), 0
    left = pl.from_arrow(
        pa.table(
            {
                "id": listing.column("id").cast(pa.string()),
                "h": h,
                "r": repeat,
                "i": pa.array(np.arange(listing.num_rows, dtype=np.int64)),
            }
        )
    )
    right = pl.from_arrow(parent.cast(BASE_SCHEMA))
    assert isinstance(left, pl.DataFrame) and isinstance(right, pl.DataFrame)
    fresh = left.filter(~pl.col("r"))
    hit = fresh.join(right, on=["id", "h"], how="semi")
    matched = np.zeros(listing.num_rows, bool)
    matched[hit.get_column("i").to_numpy()] = True
    gone = right.join(fresh, on="id", how="anti").get_column("id").to_arrow()
    unmatched = listing.filter(pa.array(~matched))
    return unmatched, gone.cast(pa.string()), int(matched.sum())


class SnapshotMismatch(Exception):
    """The parent's snapshot does not describe the parent's rows: the run diffs in full."""


def merge_gone(results: Sequence[ShardResult]) -> pa.Table:
    """(shard, id) of every parent id a shard no longer lists."""
    parts = [
        pa.table(
            {
                "shard": pa.repeat(pa.scalar(r.shard, pa.string()), len(r.gone)),
                "id": r.gone.cast(pa.string()),
            }
        )
        for r in results
        if len(r.gone)
    ]
    if not parts:
        return pa.table({"shard": pa.array([], pa.string()), "id": pa.array([], pa.string())})
    return pa.concat_tables(parts)


def delta_table(changed: pa.Table, gone: pa.Table) -> pa.Table:
    """A version's delta: `changed` (shard, id, h) set, `gone` (shard, id) removed; sorted by
    shard, so a task reading one shard's entries skips the other row groups."""
    t = pa.concat_tables(
        [
            changed.select(["shard", "id", "h"]).cast(DELTA_SCHEMA),
            pa.table(
                [gone.column("shard"), gone.column("id"), pa.nulls(gone.num_rows, pa.uint64())],
                schema=DELTA_SCHEMA,
            ),
        ]
    )
    return t.sort_by([("shard", "ascending"), ("id", "ascending")])


def write_delta(table: pa.Table, uri: str, storage_options: StorageOptions | None) -> None:
    _write(table, uri, storage_options)


def _shard_task(
    spec: bytes,
    cfg: Any,
    root: str,
    storage_options: StorageOptions | None,
    parent: dict,
    base_uri: str | None,
) -> ShardResult:
    """List one shard and compare it with the parent's pairs for it; write its new base at
    `base_uri` when given."""
    import pickle

    from pipelines.plan import REPEAT, list_shard

    shard = pickle.loads(spec)
    facts: dict = {}
    listing = list_shard(shard, cfg, facts=facts)
    pairs = shard_pairs(root, parent, shard.name, storage_options)
    h = digests(listing)  # once: compared, and written when the shard gets a new base
    unmatched, gone, matched = compare_shard(listing, pairs, shard.name, REPEAT, h)
    if base_uri is not None:
        first = pc.invert(pc.fill_null(listing.column(REPEAT), False))
        write_base(listing.filter(first), base_uri, storage_options, h.filter(first))
    return ShardResult(
        shard.name,
        unmatched,
        gone,
        matched,
        listing.num_rows,
        facts.get("lists_alone"),
        facts.get("repeats", []),
    )


@dataclass
class ShardsDiff:
    """`diff_shards`' answer: the diff (as `diff_on_ray` gives it), the new version's
    snapshot record (its `rows` set when the version's count is known), each shard's
    identity as `inputs.json` records it (None: its listing asks the store), and how many
    items the shards matched and how many rows came back to the driver (the change)."""

    diff: Any
    record: dict
    identities: dict[str, str | None]
    matched: int = 0  # items carried where they were listed
    returned: int = 0  # listing rows and parent ids that came back to the driver


def diff_shards(
    cfg: Any,
    plan: Any,
    parent: dict,
    root: str,
    storage_options: StorageOptions | None,
    pins: tuple[Any, Any],
    parent_counts: tuple[int, int],
    folder: str,
    start_ray: Any,
    *,
    repeats_found: int = 0,
    unplanned: bool = False,
) -> ShardsDiff:
    """Diff the corpus of `plan` against the parent version whose snapshot is `parent`, shard
    by shard on Ray tasks (module docstring). `pins`: the parent's Lance versions (rows,
    failures); `parent_counts`: their row counts; `folder`: where this version's snapshot
    files go, relative to `root`; `repeats_found`: rows the plan skipped as repeated ids.
    `unplanned`: the plan did not read the manifests (`pipelines.plan.manifest_specs`), so an
    id repeated across manifests is found here, and so is a corpus without items: both raise
    SnapshotMismatch, as does a snapshot that does not describe the parent (the caller then
    plans and diffs the whole corpus)."""
    import pickle

    import ray

    from pipelines.diff import KEY_COLUMNS, diff_listing, repeated_id
    from pipelines.formats import PlanError, warn_manifest_repeats
    from pipelines.plan import REPEAT, REPEATS_SKIPPED
    from pipelines.rows import LISTING_SCHEMA
    from pipelines.tables import read_pin

    start_ray(plan.kinds)
    compact = due_compaction(parent)
    bases = parent["bases"]
    task = ray.remote(num_cpus=1, max_retries=3)(_shard_task)
    parent_ref, cfg_ref = ray.put(parent), ray.put(cfg)
    refs = []
    for s in plan.shards:
        rel = None if (s.name in bases and not compact) else f"{folder}/{base_name(s.name)}"
        base_uri = join_uri(root, rel) if rel else None
        args = (pickle.dumps(s), cfg_ref, root, storage_options, parent_ref, base_uri)
        refs.append(task.remote(*args))
    try:
        results: list[ShardResult] = ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        # A bad manifest (PlanError) or snapshot file (SnapshotMismatch) as its task raised
        # it, without Ray's wrapping.
        if isinstance(e.cause, (PlanError, SnapshotMismatch)):
            raise e.cause from None
        raise
    if unplanned and not any(r.listed for r in results):
        raise SnapshotMismatch("the corpus lists no items")
    repeats = [i for r in results for i in r.repeats]
    for r in results:
        if r.repeats:
            warn_manifest_repeats(r.shard, r.repeats)
    listed = {r.shard for r in results}
    removed = [
        ShardResult(n, _empty_listing(), pairs.column("id"), 0)
        for n in sorted(set(bases) - listed)
        if (pairs := shard_pairs(root, parent, n, storage_options)) is not None
    ]
    unmatched = pa.concat_tables([r.unmatched for r in results]) if results else None
    if unmatched is None or unmatched.num_rows == 0:
        unmatched = _empty_listing(with_h=True)
    repeat = pc.fill_null(unmatched.column(REPEAT), False)
    if pc.any(repeat).as_py():
        ids = unmatched.filter(repeat).column("id")
        logger.warning(REPEATS_SKIPPED, len(ids), pc.min(ids).as_py())
    fresh = unmatched.filter(pc.invert(repeat))
    if unplanned and (dup := repeated_id(fresh.column("id"))) is not None:
        raise SnapshotMismatch(f"id {dup!r} is listed by more than one manifest")
    gone = merge_gone([*results, *removed])
    wanted = pc.unique(pa.concat_arrays([
        fresh.column("id").combine_chunks().cast(pa.string()),
        gone.column("id").combine_chunks().cast(pa.string()),
    ]))  # fmt: skip
    rows = read_pin(pins[0], storage_options, columns=list(KEY_COLUMNS), ids=wanted)
    errors = read_pin(pins[1], storage_options, ids=wanted)
    held_rows = rows.num_rows if rows is not None else 0
    held_errors = errors.num_rows if errors is not None else 0
    matched = sum(r.matched for r in results)
    expected = parent_counts[0] + parent_counts[1] - held_rows - held_errors
    if matched != expected:
        why = "ids repeated across manifests, or " if unplanned else ""
        raise SnapshotMismatch(
            f"its shards matched {matched} items where the parent holds {expected} others "
            f"({why}a snapshot that does not describe its version)"
        )
    diff = diff_listing(fresh.select(LISTING_SCHEMA.names).cast(LISTING_SCHEMA), rows, errors)
    diff.carried_rows += parent_counts[0] - held_rows
    diff.failed_kept += parent_counts[1] - held_errors
    diff.carried = diff.carried_errors = None
    record = _next_record(parent, plan, results, fresh, gone, folder, root, storage_options,
                          compact)  # fmt: skip
    record["repeats"] = bool(repeats_found or repeats)
    identities = {
        s.name: (s.identity if r.lists_alone else None)
        for s, r in zip(plan.shards, results, strict=True)
    }
    returned = unmatched.num_rows + gone.num_rows
    return ShardsDiff(diff, record, identities, matched, returned)


def _empty_listing(with_h: bool = False) -> pa.Table:
    from pipelines.plan import REPEAT
    from pipelines.rows import LISTING_SCHEMA

    schema = LISTING_SCHEMA.append(pa.field(REPEAT, pa.bool_()))
    if with_h:
        schema = schema.append(pa.field(H_COL, pa.uint64()))
    return schema.empty_table()


def _next_record(
    parent: dict,
    plan: Any,
    results: Sequence[ShardResult],
    fresh: pa.Table,
    gone: pa.Table,
    folder: str,
    root: str,
    storage_options: StorageOptions | None,
    compact: bool,
) -> dict:
    """The new version's snapshot: the parent's bases for the shards this run did not re-base
    and a delta of their changes; new bases for the others."""
    rebased = {r.shard for r in results if compact or r.shard not in parent["bases"]}
    deltas = [] if compact else list(parent["deltas"])
    delta_rows = 0 if compact else int(parent.get("delta_rows", 0))
    if not compact:
        keep_fresh = pc.invert(
            pc.is_in(fresh.column("shard"), value_set=pa.array(sorted(rebased), pa.string()))
        )
        listed = pa.array(sorted(r.shard for r in results), pa.string())
        keep_gone = pc.and_(
            pc.is_in(gone.column("shard"), value_set=listed),
            pc.invert(
                pc.is_in(gone.column("shard"), value_set=pa.array(sorted(rebased), pa.string()))
            ),
        )
        changed = fresh.filter(keep_fresh)
        changed = pa.table(
            {
                "shard": changed.column("shard"),
                "id": changed.column("id"),
                "h": changed.column(H_COL),
            }
        )
        delta = delta_table(changed, gone.filter(keep_gone))
        if delta.num_rows:
            rel = f"{folder}/delta.parquet"
            write_delta(delta, join_uri(root, rel), storage_options)
            deltas.append(rel)
            delta_rows += delta.num_rows
    bases = {}
    for s in plan.shards:
        if s.name in rebased:
            bases[s.name] = {"file": f"{folder}/{base_name(s.name)}", "since": len(deltas)}
        else:
            bases[s.name] = parent["bases"][s.name]
    return new_record(bases, deltas, int(parent.get("rows", 0)), delta_rows)
