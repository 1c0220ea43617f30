"""The re-index diff: a corpus listing against the parent version, by (`id`, `fingerprint`).

One rule set (`classify`, vectorised over Arrow batches) and two places to run it:

- `diff_listing`: on the driver, with Arrow's hash join — for parents that fit in its memory;
- `diff_on_ray`: on Ray Data — the listing's keys and the parent's key columns (`id`,
  `fingerprint`, `uri`, `modality`; never the embeddings; read from the parent's pinned Lance
  versions with `ray.data.read_lance`, or from its Parquet files) are hash-partitioned by `id`
  and full-outer-joined (`Dataset.join`), each partition is classified by a worker, and the
  driver receives only the counts, the rows to embed and the ids that are not carried (all of
  the size of the change, not of the corpus).

Both give `drop_ids` (parent ids not carried) and `moved` (relocated ids and their new uri):
the new version is the parent's rows without `drop_ids` (and the moved ids, re-added with their
new uri) plus the embedded rows (`pipelines.reindex`).

What happens to each item (`action`):

| listed | parent                        | action                                          |
|--------|-------------------------------|-------------------------------------------------|
| yes    | row, same fp and modality     | `carried` (`reembedded` on a full run)          |
| yes    | row, other fp or modality     | `changed`                                       |
| yes    | failure, same fp              | `failed_kept` (`retried` with retry_failed/full) |
| yes    | failure, other fp             | `retried`                                       |
| yes    | -                             | `added`                                         |
| no     | row or failure                | `deleted`                                       |

A carried row or kept failure whose listed `uri` differs from the parent's is `relocated`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.formats import PlanError
from pipelines.plan import REPEAT, REPEATS_SKIPPED
from pipelines.rows import LISTING_SCHEMA
from pipelines.tables import Pin, lance_options

logger = logging.getLogger(__name__)

# The columns of a parent's rows the diff reads (failures: all but `modality`).
KEY_COLUMNS = ("id", "fingerprint", "uri", "modality")
EMBED_ACTIONS = ("added", "changed", "retried", "reembedded")
KEEP_ACTIONS = ("carried", "failed_kept")
ACTIONS = (*EMBED_ACTIONS, *KEEP_ACTIONS, "deleted")
_CODE = {a: i for i, a in enumerate(ACTIONS)}
# A listing row flagged by its listing task as repeating an id of its shard (REPEAT): dropped
# where it is classified and said once by the driver.
SKIPPED = "skipped_repeat"
_ACTION_NAMES = np.array(ACTIONS, dtype=object)
# Listing rows per block handed to Ray Data, parent rows per read task (Ray Data's default,
# at least 200 read tasks split into small blocks, made one map task per few thousand rows:
# that overhead, not the join, set the diff's time), and parent rows per join partition.
# Each partition up to the cluster's CPUs is an aggregator actor Ray Data starts for the
# join, which holds its share of both sides (about 150 B a row in Arrow: a manifest listing's
# keys and columns ~90 B, the parent's keys ~60 B) and Polars' join of them: ~1 GB at 2M rows.
# Fewer, larger partitions start fewer actors; a 4M-row diff on 2 cores took 29-30 s with
# 2 partitions against 34 s with 4 (`index.diff_partitions` overrides this).
LISTING_BLOCK_ROWS = 200_000
READ_TASK_ROWS = 1_000_000
ROWS_PER_PARTITION = 2_000_000

_LEFT = pa.schema(
    [
        ("id", pa.string()),
        ("l_fp", pa.string()),
        ("l_uri", pa.string()),
        ("l_kind", pa.string()),
        ("l_pos", pa.int64()),
    ]
)
_RIGHT = pa.schema(
    [
        ("id", pa.string()),
        ("p_fp", pa.string()),
        ("p_uri", pa.string()),
        ("p_kind", pa.string()),
        ("p_err", pa.bool_()),
    ]
)
_CLASSIFIED = pa.schema(
    [
        ("id", pa.string()),
        ("l_pos", pa.int64()),
        ("action", pa.string()),
        ("new_uri", pa.string()),
        ("relocated", pa.bool_()),
        ("in_parent", pa.bool_()),
    ]
)


def repeated_id(ids: pa.Array | pa.ChunkedArray) -> str | None:
    """An id that `ids` holds more than once, or None."""
    if pc.count_distinct(ids, mode="all").as_py() == len(ids):
        return None
    counts = pc.value_counts(ids)
    return counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()


def _repeated(dup: str) -> PlanError:
    return PlanError(f"the corpus lists id {dup!r} more than once; ids must be unique")


def check_unique_ids(listing: pa.Table) -> None:
    """Raise PlanError if the listing repeats an id (two objects would share one row)."""
    dup = repeated_id(listing.column("id"))
    if dup is not None:
        raise _repeated(dup)


def listing_keys(listing: pa.Table) -> pa.Table:
    """The listing's columns the diff needs, renamed, with each row's position."""
    n = listing.num_rows
    return pa.table(
        [
            listing.column("id").cast(pa.string()),
            listing.column("fingerprint").cast(pa.string()),
            listing.column("uri").cast(pa.string()),
            listing.column("modality").cast(pa.string()),
            pa.array(np.arange(n, dtype=np.int64)),
        ],
        schema=_LEFT,
    )


def parent_keys(table: pa.Table, *, errors: bool) -> pa.Table:
    """A parent table's (rows or failures) key columns, renamed, flagged with `p_err`."""
    n = table.num_rows

    def col(name: str) -> pa.Array | pa.ChunkedArray:
        if name in table.column_names:
            return table.column(name).cast(pa.string())
        return pa.nulls(n, pa.string())

    return pa.table(
        [col("id"), col("fingerprint"), col("uri"), col("modality"), pa.repeat(errors, n)],
        schema=_RIGHT,
    )


def _eq(a: Any, b: Any) -> np.ndarray:
    """Element-wise equality where null equals null (Python's `None == None`)."""
    same = pc.fill_null(pc.equal(a, b), False)
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    return pc.or_(same, both_null).to_numpy(zero_copy_only=False)


def _codes(joined: pa.Table, *, full: bool, retry_failed: bool) -> tuple[np.ndarray, ...]:
    """Per row of a joined table: its action as an index into ACTIONS (int8), whether it is
    `relocated` and whether the parent holds it. Numeric throughout: a partition's rows are
    mostly carried, and strings are made only for the rows that are not (`_classified`)."""
    listed = pc.is_valid(joined.column("l_pos")).to_numpy(zero_copy_only=False)
    in_parent = pc.is_valid(joined.column("p_err")).to_numpy(zero_copy_only=False)
    is_err = pc.fill_null(joined.column("p_err"), False).to_numpy(zero_copy_only=False)
    l_fp, p_fp = joined.column("l_fp"), joined.column("p_fp")
    same_fp = _eq(l_fp, p_fp)
    row = listed & in_parent & ~is_err
    err = listed & in_parent & is_err
    # Same bytes read as another modality (a manifest row relabelled) is a change.
    same_row = (
        same_fp
        & pc.is_valid(l_fp).to_numpy(zero_copy_only=False)
        & _eq(joined.column("l_kind"), joined.column("p_kind"))
    )
    code = np.select(
        [
            row & same_row & full,
            row & same_row,
            row,
            err & same_fp & (not (full or retry_failed)),
            err,
            listed,
        ],
        [_CODE[a] for a in ("reembedded", "carried", "changed", "failed_kept", "retried", "added")],
        default=_CODE["deleted"],
    ).astype(np.int8)
    keep = (code == _CODE["carried"]) | (code == _CODE["failed_kept"])
    relocated = keep & ~_eq(joined.column("l_uri"), joined.column("p_uri"))
    return code, relocated, in_parent


def _classified(
    joined: pa.Table, code: np.ndarray, relocated: np.ndarray, in_parent: np.ndarray
) -> pa.Table:
    return pa.table(
        [
            joined.column("id"),
            joined.column("l_pos"),
            pa.array(_ACTION_NAMES[code.astype(np.intp)], pa.string()),
            joined.column("l_uri"),
            pa.array(relocated),
            pa.array(in_parent),
        ],
        schema=_CLASSIFIED,
    )


def classify(joined: pa.Table, *, full: bool, retry_failed: bool) -> pa.Table:
    """Each id of a full outer join of `listing_keys` and `parent_keys` with its `action`
    (see the module docstring), the uri it is listed at (`new_uri`), whether a carried row or
    kept failure moved (`relocated`) and whether the parent holds it (`in_parent`)."""
    if joined.num_rows == 0:
        return _CLASSIFIED.empty_table()
    return _classified(joined, *_codes(joined, full=full, retry_failed=retry_failed))


@dataclass
class Diff:
    """What a run does with each listed item and each parent row.

    `carried` / `carried_errors` hold the kept parent rows and failures when the diff ran on
    the driver (`diff_listing`); after `diff_on_ray` they are None. Both set `drop_ids` and
    `moved`, which say how the parent's rows become the new version's.
    """

    to_embed: pa.Table  # listing rows to embed (new, changed, retried, or all)
    carried: pa.Table | None = None  # parent rows kept as they are (driver diff)
    carried_errors: pa.Table | None = None  # parent failures kept (driver diff)
    added: int = 0
    changed: int = 0
    deleted: int = 0
    retried: int = 0
    reembedded: int = 0  # unchanged items re-embedded by a full run
    relocated: int = 0  # carried rows whose content is unchanged but whose `uri` moved
    carried_rows: int = 0
    failed_kept: int = 0
    # Why each row of `to_embed` is embedded: added, changed, retried or reembedded.
    classes: list[str] = field(default_factory=list)
    # Parent ids that are not carried, and (id, new_uri) of relocated ones.
    drop_ids: pa.Array | None = None
    moved: pa.Table | None = None

    @property
    def empty(self) -> bool:
        """True if the new version would equal the parent."""
        return self.to_embed.num_rows == 0 and self.deleted == 0 and self.relocated == 0


def _counts(classified: pa.Table) -> dict[str, int]:
    out = dict.fromkeys(ACTIONS, 0)
    if classified.num_rows:
        for r in pc.value_counts(classified.column("action")).to_pylist():
            out[r["values"]] = r["counts"]
    out["relocated"] = int(pc.sum(classified.column("relocated")).as_py() or 0)
    return out


def _embed_rows(listing: pa.Table | None, small: pa.Table) -> tuple[pa.Table, list[str]]:
    """The listing rows to embed and why each is embedded: in listing order from the driver's
    `listing`, or (None: the listing was on Ray) rebuilt from the columns that came back with
    them (`_EXTRA`), in (shard, id) order."""
    mask = pc.is_in(small.column("action"), pa.array(EMBED_ACTIONS))
    if listing is not None:
        picked = small.filter(mask).sort_by("l_pos")
        return listing.take(picked.column("l_pos")), picked.column("action").to_pylist()
    picked = small.filter(mask).sort_by([("x_shard", "ascending"), ("id", "ascending")])
    cols = {"uri": "new_uri", "modality": "l_kind", "fingerprint": "l_fp"}
    cols |= {c: "x_" + c for c in _CARRIED}
    rows = pa.table(
        [picked.column(cols.get(f.name, f.name)).cast(f.type) for f in LISTING_SCHEMA],
        schema=LISTING_SCHEMA,
    )
    return rows, picked.column("action").to_pylist()


def _apply(diff: Diff, counts: dict[str, int], listing: pa.Table | None, small: pa.Table) -> Diff:
    diff.to_embed, diff.classes = _embed_rows(listing, small)
    diff.added, diff.changed = counts["added"], counts["changed"]
    diff.retried, diff.reembedded = counts["retried"], counts["reembedded"]
    diff.deleted, diff.relocated = counts["deleted"], counts["relocated"]
    diff.carried_rows, diff.failed_kept = counts["carried"], counts["failed_kept"]
    gone = small.filter(
        pc.and_(
            small.column("in_parent"),
            pc.invert(pc.is_in(small.column("action"), pa.array(KEEP_ACTIONS))),
        )
    )
    diff.drop_ids = gone.column("id").combine_chunks().cast(pa.string())
    diff.moved = _moved(small)
    return diff


def _moved(classified: pa.Table) -> pa.Table:
    moved = classified.filter(classified.column("relocated"))
    return pa.table({"id": moved.column("id"), "new_uri": moved.column("new_uri")})


def relocate(table: pa.Table, moved: pa.Table) -> pa.Table:
    """`table` with the `uri` of the ids in `moved` (`id`, `new_uri`) replaced (a corpus moved
    or renamed its objects without changing their bytes: carry the vector, point at where it
    lives now)."""
    if not moved.num_rows or not table.num_rows or "uri" not in table.column_names:
        return table
    where = pc.index_in(table.column("id"), value_set=moved.column("id"))
    new = pc.take(moved.column("new_uri"), where)
    uri = pc.if_else(pc.is_valid(where), new, table.column("uri").cast(pa.string()))
    i = table.column_names.index("uri")
    return table.set_column(i, pa.field("uri", pa.string()), uri)


def diff_listing(
    listing: pa.Table,
    parent_rows: pa.Table | None,
    parent_errors: pa.Table | None,
    *,
    full: bool = False,
    retry_failed: bool = False,
) -> Diff:
    """Diff a corpus listing (`id`, `fingerprint`, ...) against the parent version's rows, on
    the driver. Raises PlanError if the listing repeats an id."""
    check_unique_ids(listing)
    right = [
        parent_keys(t, errors=e)
        for t, e in ((parent_rows, False), (parent_errors, True))
        if t is not None
    ]
    right_t = pa.concat_tables(right) if right else _RIGHT.empty_table()
    joined = listing_keys(listing).join(right_t, "id", join_type="full outer")
    classified = classify(joined, full=full, retry_failed=retry_failed)
    diff = _apply(Diff(listing.slice(0, 0)), _counts(classified), listing, classified)
    moved = diff.moved

    def kept(table: pa.Table | None, action: str) -> pa.Table:
        if table is None:
            return pa.table({})
        ids = classified.filter(pc.equal(classified.column("action"), action)).column("id")
        return relocate(table.filter(pc.is_in(table.column("id"), value_set=ids)), moved)

    diff.carried = kept(parent_rows, "carried")
    diff.carried_errors = kept(parent_errors, "failed_kept")
    return diff


# ----------------------------------------------------------------------------- on Ray Data


# A listing on Ray (a Dataset) has no driver copy to take the rows to embed from: its other
# columns travel through the join with the keys, and come back for the rows to embed only.
_CARRIED = ("shard", "source", "size", "mtime", "error")
_EXTRA = pa.schema([pa.field("l_fp", pa.string()), pa.field("l_kind", pa.string())] + [
    pa.field("x_" + c, LISTING_SCHEMA.field(c).type) for c in _CARRIED
])  # fmt: skip


def _out_schema(extra: bool) -> pa.Schema:
    fields = [*_CLASSIFIED, *(_EXTRA if extra else []), pa.field("n", pa.int64())]
    return pa.schema(fields)


# Columns of a listing block that hold one value or a few: a listing task lists one shard, so
# its name and its manifest's or tar's URI repeat on every row, and most shards hold one kind.
# They cross the join dictionary-encoded, a few bytes a row instead of the strings (the
# manifest's URI alone is as long as an id and its uri; the three were about a third of the
# bytes a manifest listing shuffles). Polars joins them as categoricals; `_classify_batch`
# casts them back to strings.
_ENCODED = ("l_kind", "x_shard", "x_source")


def _listing_keys_batch(batch: pa.Table) -> pa.Table:
    """`listing_keys` of a block of a listing on Ray, with its other columns (`_EXTRA`)."""
    keys = listing_keys(batch)
    for c in _CARRIED:
        f = LISTING_SCHEMA.field(c)
        keys = keys.append_column(pa.field("x_" + c, f.type), batch.column(c).cast(f.type))
    if REPEAT in batch.column_names:
        keys = keys.append_column("x_repeat", batch.column(REPEAT).cast(pa.bool_()))
    for c in _ENCODED:
        i = keys.schema.get_field_index(c)
        keys = keys.set_column(i, c, keys.column(c).combine_chunks().dictionary_encode())
    return keys


def _summary(values: dict[str, Any], k: int, schema: pa.Schema) -> pa.Table:
    """`k` rows of `schema`: the given columns, nulls elsewhere."""
    return pa.table(
        {f.name: values.get(f.name, pa.nulls(k, f.type)) for f in schema}, schema=schema
    )


def _classify_batch(batch: pa.Table, full: bool, retry_failed: bool) -> pa.Table:
    """Classify a join partition and keep what the driver needs: every row that is not simply
    carried (embedded, deleted, dropped, relocated) with `n` = 1, and one summary row (`id`
    null) per kept action with `n` = how many plain carried rows or kept failures it stands
    for. A listing row its listing task flagged as repeating an id of its shard (`x_repeat`,
    from `list_items_on_ray`: exact) is dropped and comes back as action SKIPPED with its id,
    for the driver to say. Without flags, an id this batch holds twice comes back alone, as
    action `repeated`, and the driver refuses the listing — a partition can reach the worker
    as several blocks (Ray's join streams its output), so that check alone can miss a repeat.
    When the listing is on Ray, its other columns (`_EXTRA`) come back with the rows that
    are not plainly carried."""
    extra = "x_shard" in batch.column_names
    schema = _out_schema(extra)
    skipped = schema.empty_table()
    if "x_repeat" in batch.column_names:
        flag = pc.fill_null(batch.column("x_repeat"), False)
        ids = batch.filter(flag).column("id").to_pylist()
        if ids:  # later rows of an id in their shard: skipped, and said by the driver
            k = len(ids)
            values = {"id": ids, "action": [SKIPPED] * k, "relocated": [False] * k, "n": [1] * k}
            skipped = _summary(values, k, schema)
            batch = batch.filter(pc.invert(flag))
    else:
        dup = repeated_id(batch.filter(pc.is_valid(batch.column("l_pos"))).column("id"))
        if dup is not None:
            values = {"id": [dup], "action": ["repeated"], "relocated": [False], "n": [1]}
            return _summary(values, 1, schema)
    if batch.num_rows == 0:
        return skipped
    code, relocated, in_parent = _codes(batch, full=full, retry_failed=retry_failed)
    plain = ~relocated & ((code == _CODE["carried"]) | (code == _CODE["failed_kept"]))
    counts = np.bincount(code[plain], minlength=len(ACTIONS))
    keep = pa.array(~plain)
    sub = batch.filter(keep)
    idx = np.flatnonzero(~plain)
    c = _classified(sub, code[idx], relocated[idx], in_parent[idx])
    if extra:
        for f in _EXTRA:
            c = c.append_column(f, sub.column(f.name).cast(f.type))
    small = c.append_column("n", pa.repeat(pa.scalar(1, pa.int64()), c.num_rows))
    k = len(KEEP_ACTIONS)
    values = {
        "action": list(KEEP_ACTIONS),
        "relocated": [False] * k,
        "in_parent": [True] * k,
        "n": [int(counts[_CODE[a]]) for a in KEEP_ACTIONS],
    }
    return pa.concat_tables([small, _summary(values, k, schema), skipped])


def _parent_keys_batch(batch: pa.Table, errors: bool) -> pa.Table:
    return parent_keys(batch, errors=errors)


def _collect(ds: Any) -> list[pa.Table]:
    """Bring a (small) dataset's blocks to the driver. The one place the Ray diff moves data
    to the driver; tests count what passes here."""
    import ray

    return [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]


def _read_parent(
    source: Sequence[str] | Pin | None, cols: list[str], fs: Any, so: Any, rows: int
) -> Any:
    """A Ray dataset of `cols` of a parent's rows (about `rows` of them): a pinned Lance
    version or Parquet files, read in tasks of about READ_TASK_ROWS rows."""
    import ray.data

    tasks = max(1, math.ceil(rows / READ_TASK_ROWS))
    if isinstance(source, Pin):
        return ray.data.read_lance(
            source.uri,
            version=source.version,
            columns=cols,
            storage_options=lance_options(source.uri, so),
            override_num_blocks=tasks,
        )
    files = list(source or [])
    return ray.data.read_parquet(
        files, filesystem=fs, override_num_blocks=max(1, min(tasks, len(files)))
    ).select_columns(cols)


def diff_on_ray(
    listing: Any,
    rows: Sequence[str] | Pin | None,
    errors: Sequence[str] | Pin | None,
    filesystem: Any,
    *,
    full: bool = False,
    retry_failed: bool = False,
    parent_count: int = 0,
    num_partitions: int | None = None,
    storage_options: Any = None,
) -> Diff:
    """`diff_listing` as a Ray Data job over the parent's rows and failures: pinned Lance
    versions (`pipelines.tables.Pin`, opened with `storage_options`) or Parquet files
    (`filesystem`: a pyarrow filesystem for the paths); None or [] when it has none. The
    embeddings are never read; the driver receives the counts, the rows to embed and the ids
    not carried. A Ray listing's rows flagged by its listing tasks as repeating an id of their
    shard (`pipelines.plan.REPEAT`) are skipped, with a warning, as `list_items` skips them. A
    repeated id otherwise raises PlanError: a table listing is checked on the driver; a
    dataset without flags block by block only, which can miss a repeat.
    `listing`: a pyarrow Table on the driver, or a Ray dataset
    of LISTING_SCHEMA rows (`pipelines.plan.list_items_on_ray`: the listing never reaches the
    driver). `num_partitions` (default one per ROWS_PER_PARTITION rows of the parent, or of a
    table listing, at least 2) sets the hash partitions of the join."""
    import ray.data

    on_ray = not isinstance(listing, pa.Table)
    n = max(parent_count, 0 if on_ray else listing.num_rows)
    parts = num_partitions or max(2, math.ceil(n / ROWS_PER_PARTITION))
    if on_ray:
        left = listing.map_batches(_listing_keys_batch, batch_format="pyarrow", batch_size=None)
    else:
        check_unique_ids(listing)  # the driver holds this listing: checked whole, here
        left_t = listing_keys(listing)
        blocks = [
            left_t.slice(s, LISTING_BLOCK_ROWS)
            for s in range(0, left_t.num_rows, LISTING_BLOCK_ROWS)
        ] or [left_t]
        left = ray.data.from_arrow(blocks)
    sides = []
    for source, is_err in ((rows, False), (errors, True)):
        if not source:
            continue
        cols = list(KEY_COLUMNS[:3] if is_err else KEY_COLUMNS)
        sides.append(
            _read_parent(source, cols, filesystem, storage_options, n).map_batches(
                _parent_keys_batch,
                fn_kwargs={"errors": is_err},
                batch_format="pyarrow",
                batch_size=None,  # a read block as it comes
            )
        )
    if sides:
        right = sides[0] if len(sides) == 1 else sides[0].union(sides[1])
    else:
        right = ray.data.from_arrow(_RIGHT.empty_table())
    parts_out = _collect(
        left.join(right, join_type="full_outer", num_partitions=parts, on=("id",)).map_batches(
            _classify_batch,
            fn_kwargs={"full": full, "retry_failed": retry_failed},
            batch_format="pyarrow",
        )
    )
    out = pa.concat_tables(parts_out) if parts_out else _out_schema(on_ray).empty_table()
    repeats = out.filter(pc.equal(out.column("action"), "repeated"))
    if repeats.num_rows:
        raise _repeated(repeats.column("id")[0].as_py())
    skipped = pc.equal(out.column("action"), SKIPPED)
    if pc.any(skipped).as_py():
        ids = out.filter(skipped).column("id")
        logger.warning(REPEATS_SKIPPED, len(ids), pc.min(ids).as_py())
        out = out.filter(pc.invert(skipped))
    counts = dict.fromkeys((*ACTIONS, "relocated"), 0)
    for r in out.group_by("action").aggregate([("n", "sum")]).to_pylist():
        counts[r["action"]] += r["n_sum"]
    small = out.filter(pc.is_valid(out.column("id"))).drop_columns(["n"])
    counts["relocated"] = int(pc.sum(small.column("relocated")).as_py() or 0)
    table = None if on_ray else listing
    return _apply(Diff(LISTING_SCHEMA.empty_table()), counts, table, small)
