"""Helpers for the embedding-job tests: small corpora in every input format, local or on S3,
with corrupt items mixed in, and the expected embeddings computed by calling imagebind_core
directly on the same items."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import media
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import imagebind_core as ibc

EMBED_DIM = 32  # the tiny preset
MAX_TEXT_CHARS = 200  # the tests' preprocess.limits.max_text_chars


# Job settings for tests on the session's 4 logical CPUs: fractional resources, so 3 kinds x
# (encoder + preprocessing) fit, and small batches, so a few items make several blocks.
SMALL_JOB = {
    "preset": "tiny",
    "ray.progress_bars": False,
    "preprocess.num_cpus": 0.25,
    "preprocess.read_num_cpus": 0.1,
    "preprocess.batch_size": 4,
    "encoder_defaults.num_cpus": 0.25,
    "encoder_defaults.batch_size": 8,
}
# SMALL_JOB with four files per shard, so a few files make several shards.
SMALL_FILES_JOB = {**SMALL_JOB, "files.files_per_shard": 4}


@dataclass
class Corpus:
    """Where a corpus is, what it contains, and what the job must produce from it."""

    input: str
    good: dict[str, tuple[str, bytes | str]] = field(default_factory=dict)  # id -> (kind, data)
    bad: dict[str, str] = field(default_factory=dict)  # id -> kind (as stored in `modality`)
    skipped: list[str] = field(default_factory=list)  # files that are not items


class Writer:
    """Writes corpus files to a local folder or an S3 prefix."""

    def __init__(self, root: str, fs: Any = None) -> None:
        self.root = root.rstrip("/")
        self.fs = fs

    def uri(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def put(self, rel: str, data: bytes) -> str:
        uri = self.uri(rel)
        if self.fs is None:
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            with open(uri, "wb") as f:
                f.write(data)
        else:
            self.fs.pipe(uri, data)
        return uri

    def rm(self, rel: str) -> None:
        uri = self.uri(rel)
        if self.fs is None:
            os.remove(uri)
        else:
            self.fs.rm(uri)


def _img(seed: int, fmt: str = "PNG") -> bytes:
    return media.make_image(fmt, size=(64, 48), seed=seed)


def files_corpus(w: Writer) -> Corpus:
    """Pictures, captions and a sound, plus a corrupt PNG, a truncated JPEG, an empty caption,
    an over-long caption (MAX_TEXT_CHARS), and a JSON sidecar that is not an item."""
    c = Corpus(w.uri("files"))
    for i in range(3):
        fmt, ext = (("PNG", "png"), ("JPEG", "jpg"), ("PNG", "png"))[i]
        data = _img(i, fmt)
        w.put(f"files/img/pic{i}.{ext}", data)
        c.good[f"img/pic{i}.{ext}"] = ("vision", data)
    for i, text in enumerate(["a red square", "two dogs playing", "a quiet street"]):
        w.put(f"files/txt/cap{i}.txt", text.encode())
        c.good[f"txt/cap{i}.txt"] = ("text", text.encode())
    wav = media.make_wav(seconds=1.0, sr=16000, channels=1)
    w.put("files/snd/tone.wav", wav)
    c.good["snd/tone.wav"] = ("audio", wav)
    w.put("files/img/broken.png", media.random_bytes(2048, seed=1))
    c.bad["img/broken.png"] = "vision"
    w.put("files/img/cut.jpg", media.truncated(_img(7, "JPEG"), 0.3))
    c.bad["img/cut.jpg"] = "vision"
    w.put("files/txt/long.txt", b"word " * 100)  # over the tests' max_text_chars
    c.bad["txt/long.txt"] = "text"
    w.put("files/meta/info.json", b"{}")
    c.skipped.append("meta/info.json")
    return c


def _table_bytes(rows: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        return sink.getvalue().to_pybytes()
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    cols = sorted({k for r in rows for k in r})
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join("" if r.get(k) is None else str(r[k]) for k in cols))
    return ("\n".join(lines) + "\n").encode()


def manifest_corpus(w: Writer) -> Corpus:
    """Manifest shards (Parquet, JSONL, CSV): object URIs (relative and absolute), inline text,
    ids given or derived; bad rows: missing object, corrupt bytes, unknown modality, no uri
    nor text; rows repeating ids of earlier manifests; an empty manifest."""
    c = Corpus(w.uri("manifests"))
    media_rows = []
    for i in range(4):
        data = _img(10 + i)
        w.put(f"media/m{i}.png", data)
        media_rows.append(data)
    w.put("media/bad.png", b"not a png at all")
    rows0 = [
        {"id": "a0", "uri": "../media/m0.png", "modality": "vision", "text": None},
        {"id": "a1", "uri": w.uri("media/m1.png"), "modality": "image", "text": None},
        {"id": "a2", "uri": None, "modality": "text", "text": "an inline caption"},
        {"id": "a3", "uri": "../media/missing.png", "modality": "vision", "text": None},
        {"id": "a4", "uri": "../media/m2.png", "modality": "smell", "text": None},
    ]
    c.good["a0"] = ("vision", media_rows[0])
    c.good["a1"] = ("vision", media_rows[1])
    c.good["a2"] = ("text", "an inline caption")
    c.bad["a3"] = "vision"
    c.bad["a4"] = "smell"
    w.put("manifests/part-0.parquet", _table_bytes(rows0, "parquet"))
    rows1 = [
        {"uri": "../media/m3.png", "modality": "vision"},
        {"uri": "../media/bad.png", "modality": "vision"},
        {"text": "second shard caption", "modality": "text"},
        {"modality": "vision"},
    ]
    c.good["../media/m3.png"] = ("vision", media_rows[3])
    c.bad["../media/bad.png"] = "vision"
    c.good["part-1#2"] = ("text", "second shard caption")
    c.bad["part-1#3"] = "vision"
    w.put("manifests/part-1.jsonl", _table_bytes(rows1, "jsonl"))
    rows2 = [
        {"id": "0042", "uri": "../media/m2.png", "modality": "vision"},
        {"id": "0043", "text": "csv caption", "modality": "text"},
    ]
    c.good["0042"] = ("vision", media_rows[2])
    c.good["0043"] = ("text", "csv caption")
    # Ids repeated from an earlier manifest, with other content: the first occurrence wins.
    rows2.append({"id": "a0", "uri": "../media/m3.png", "modality": "vision"})
    w.put("manifests/part-2.csv", _table_bytes(rows2, "csv"))
    w.put("manifests/part-3.csv", b"id,uri,modality\n")  # empty: an empty output shard
    rows4 = [  # only repeats (by derived and by given id): an empty output shard too
        {"uri": "../media/m3.png", "modality": "vision"},
        {"id": "0043", "text": "another caption", "modality": "text"},
    ]
    w.put("manifests/part-4.jsonl", _table_bytes(rows4, "jsonl"))
    return c


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def webdataset_corpus(w: Writer) -> Corpus:
    """Two img2dataset-style shards (key.jpg/png + key.txt + key.json); one corrupt image and
    one over-long caption."""
    c = Corpus(w.uri("wds"))
    for s in range(2):
        members = []
        for k in range(3):
            key = f"{s:05d}{k:04d}"
            img = _img(20 + 3 * s + k, "JPEG" if k % 2 else "PNG")
            ext = "jpg" if k % 2 else "png"
            text = f"sample {k} of shard {s}"
            if s == 1 and k == 2:
                img = b"\x89PNG garbage"
            members += [(f"{key}.{ext}", img), (f"{key}.txt", text.encode())]
            members.append((f"{key}.json", json.dumps({"key": key}).encode()))
            if s == 1 and k == 2:
                c.bad[f"{s:05d}#{key}.{ext}"] = "vision"
            else:
                c.good[f"{s:05d}#{key}.{ext}"] = ("vision", img)
            c.good[f"{s:05d}#{key}.txt"] = ("text", text.encode())
        if s == 0:
            members.append(("000000099.txt", b"word " * 100))
            c.bad["00000#000000099.txt"] = "text"
        w.put(f"wds/{s:05d}.tar", _tar(members))
    return c


BUILDERS: dict[str, Callable[[Writer], Corpus]] = {
    "files": files_corpus,
    "manifest": manifest_corpus,
    "webdataset": webdataset_corpus,
}


def expected_embeddings(corpus: Corpus, model: Any) -> dict[str, np.ndarray]:
    """id -> unit-length embedding, from imagebind_core directly (one batch per kind)."""
    import torch

    by_kind: dict[str, list[tuple[str, Any]]] = {}
    for id_, (kind, data) in corpus.good.items():
        by_kind.setdefault(kind, []).append((id_, ibc.preprocess(kind, data)))
    out = {}
    for kind, items in by_kind.items():
        x = ibc.collate([t for _, t in items])
        m = ibc.model_modality(kind).value
        with torch.inference_mode():
            y = model({m: x}, normalize=True)[m].numpy()
        out.update({id_: y[i] for i, (id_, _) in enumerate(items)})
    return out


def read_output(output: str, fs: Any = None) -> tuple[pa.Table, pa.Table, list[str]]:
    """(embeddings, errors, committed file paths) of a job's output, read back file by file."""
    import pyarrow.dataset as pads

    kw = {"filesystem": fs} if fs is not None else {}
    root = output.removeprefix("s3://") if fs is not None else output
    ds = pads.dataset(root, format="parquet", **kw)  # ignores _errors/_parts/_job.json
    emb = ds.to_table()
    try:
        err = pads.dataset(f"{root}/_errors", format="parquet", **kw).to_table()
    except (FileNotFoundError, OSError):
        err = pa.table({"id": pa.array([], pa.string())})
    return emb, err, list(ds.files)


def break_imports(module: str) -> None:
    """Make this process one whose import of `module` was interrupted part way and fails
    when tried again, as torch's second import does ("duplicate registrations for aten...")."""
    import imagebind_core._lazy as lazy
    import imagebind_core.preprocess as pkg

    class FailingImport:
        def find_spec(self, fullname, path=None, target=None):
            if fullname == module:
                raise RuntimeError("duplicate registrations for aten.linspace.Tensor_Tensor")
            return None

    sys.modules.pop(module, None)
    short = module.rsplit(".", 1)[1]
    for name in [n for n, m in pkg._LAZY.items() if m == short]:
        pkg.__dict__.pop(name, None)  # names the package cached from the module
    sys.meta_path.insert(0, FailingImport())
    lazy._interrupted = f"importing {module} was interrupted (KeyboardInterrupt)"


@contextlib.contextmanager
def imports_restored(module: str) -> Iterator[None]:
    """Undo on exit what `break_imports(module)` (or a test's own import hooks) did to this
    process: the import hooks, the module, the package's cached names, `_lazy`'s memory."""
    import imagebind_core._lazy as lazy
    import imagebind_core.preprocess as pkg

    hooks, mod, names = list(sys.meta_path), sys.modules.get(module), dict(pkg.__dict__)
    state = (lazy._interrupted, lazy._broken)
    try:
        yield
    finally:
        sys.meta_path[:] = hooks
        if mod is None:
            sys.modules.pop(module, None)
        else:
            sys.modules[module] = mod
        pkg.__dict__.update(names)
        lazy._interrupted, lazy._broken = state
