"""Helpers for the re-index tests: a caption-and-picture corpus on S3, the job's settings, and
readers of what a run published."""

from __future__ import annotations

import os

import media
import numpy as np
import pyarrow as pa

from helpers.net import S3Server
from helpers.pipeline import SMALL_FILES_JOB, Writer
from imagebind_core.index import read_pointer
from pipelines.config import ReindexConfig, load_reindex_config
from pipelines.publish import IndexRoot

TEXTS = ["a red square", "two dogs playing", "a quiet street", "rain on a tin roof", "a violin"]


def s3_corpus(s3: S3Server, bucket: str) -> Writer:
    """An empty corpus folder on the S3 server: `s3://{bucket}/corpus`."""
    return Writer(f"s3://{bucket}/corpus", s3.filesystem())


def make_corpus(s3: S3Server, bucket: str) -> Writer:
    """`TEXTS` as captions, three pictures and a picture that fails to decode, on S3."""
    c = s3_corpus(s3, bucket)
    for i, t in enumerate(TEXTS):
        c.put(f"txt/cap{i}.txt", t.encode())
    for i in range(3):
        c.put(f"img/pic{i}.png", media.make_image("PNG", size=(64, 48), seed=i))
    c.put("img/broken.png", media.random_bytes(512, seed=3))  # fails to decode
    return c


def s3_settings(s3: S3Server, corpus: Writer, root: str, **extra) -> dict:
    """Settings of a re-index of `corpus` into the index `root`, both on the S3 server
    (credentials from the environment)."""
    return {
        **SMALL_FILES_JOB,
        "input": corpus.root,
        "storage.endpoint_url": s3.endpoint_url,
        "storage.region": s3.region,
        "index.root": root,
        **extra,
    }


def config(s3: S3Server, corpus: Writer, root: str, trace: str, **extra) -> ReindexConfig:
    over = {
        **SMALL_FILES_JOB,
        "input": corpus.root,
        "storage.endpoint_url": s3.endpoint_url,
        "storage.key": s3.key,
        "storage.secret": s3.secret,
        "storage.region": s3.region,
        "debug.trace_path": trace,
        "index.root": root,
        "index.keep_versions": 2,
        **extra,
    }
    return load_reindex_config(None, over)


def traced(trace: str) -> list[str]:
    """Ids the preprocessing stage handled so far (each line: `<pid> <id>`)."""
    if not os.path.exists(trace):
        return []
    with open(trace) as f:
        return [line.split(" ", 1)[1].strip() for line in f if line.strip()]


def version_rows(root: str, storage_options: dict, *, errors: bool = False) -> tuple[str, pa.Table]:
    """The published version's name and its rows (or its failures), as its record pins them."""
    pointer = read_pointer(root, storage_options)
    rows = IndexRoot(root, storage_options).read_rows(pointer.name, errors=errors)
    return pointer.name, rows


def by_id(rows: pa.Table) -> dict[str, bytes]:
    """id -> the raw bytes of its float32 embedding."""
    emb = np.asarray(rows.column("embedding").combine_chunks().flatten(), np.float32)
    emb = emb.reshape(rows.num_rows, -1)
    return {i: emb[k].tobytes() for k, i in enumerate(rows.column("id").to_pylist())}
