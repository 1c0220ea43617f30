"""A job's model lineage: what produced its embeddings, in `imagebind_core.ModelSpec`'s terms.

`JobConfig.model_spec(kind)` is the one place a job spells its model (preset, checkpoint and
its sha256, dtype, device, seed, normalisation, preprocessing); `ModelSpec.lineage` turns it
into str -> str fields. The embedding job writes them, prefixed `imagebind.`, into every
Parquet file's schema metadata and its job record (`_job.json`); the re-index job writes them
into each version record and compares `lineage_key` (`imagebind_core.LINEAGE_KEYS`, plus the
seed of random weights) with the parent's to decide a full re-embed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import imagebind_core as ibc
from imagebind_core.kinds import KINDS
from pipelines.config import JobConfig
from pipelines.rows import INVALID

logger = logging.getLogger(__name__)


def model_lineage(cfg: JobConfig, kinds: Sequence[str] = ()) -> dict[str, str]:
    """What produces this job's embeddings, as Parquet schema metadata (str -> str).

    Each kind's `JobConfig.model_spec` lineage, merged (a field that differs between kinds,
    e.g. the dtype, lists them); the preprocessing settings are those of `kinds`. The
    checkpoint's sha256 is `checkpoint_sha256` from the config when given (the actors verify
    it); otherwise the driver fetches the checkpoint once to hash it.
    """
    if cfg.checkpoint is None:
        sha = "random"
    elif cfg.checkpoint_sha256:
        sha = cfg.checkpoint_sha256.lower()
    else:
        logger.info("hashing checkpoint %s (set checkpoint_sha256 to skip)", cfg.checkpoint)
        _, sha = ibc.fetch_checkpoint(cfg.checkpoint, storage_options=cfg.storage_options())
    real = sorted({k for k in kinds if k != INVALID})
    per_kind = {
        k: cfg.model_spec(k).lineage(kinds=real, checkpoint_sha256=sha) for k in real or ["vision"]
    }
    if not real:  # no kinds (an empty shard's file): the defaults'
        per_kind["vision"]["dtype"] = cfg.encoder("vision").dtype
    return {f"imagebind.{k}": v for k, v in ibc.merge_lineage(per_kind).items()}


def lineage_key(cfg: JobConfig) -> dict[str, str]:
    """What must stay equal for rows to be carried forward (`imagebind_core.lineage_key` of
    the job's lineage over every kind)."""
    return ibc.lineage_key(model_lineage(cfg, KINDS))


def lineage_changes(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    """Human-readable differences (`field: old -> new`); empty if the lineage is unchanged."""
    if old is None:
        return []
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
