"""The embedding job's pieces without Ray: config errors, planning and listing, ids, part
writing and shard commits, the output lock (local and S3), refusal of a mismatched output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.pipeline import Writer, files_corpus, manifest_corpus, webdataset_corpus
from numerics import assert_embeddings_close

from pipelines.cli import embed_main as main
from pipelines.config import ConfigError, load_config
from pipelines.embed import OutputMismatch, run_job
from pipelines.formats import PlanError, id_digests, repeated_rows
from pipelines.lock import LOCK_KEY, OutputLock, OutputLocked
from pipelines.plan import detect_format, list_input, list_items, plan_job, shard_tasks
from pipelines.readers import read_tasks
from pipelines.rows import (
    ITEM_SCHEMA,
    LISTING_SCHEMA,
    STATUS_EOS,
    STATUS_ERROR,
    STATUS_OK,
    embedding_type,
    encoded_schema,
)
from pipelines.store import Output
from pipelines.writers import commit_shard, write_parts

# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"encoder_defaults.batch_size": 0}, "encoder_defaults.batch_size"),
        ({"encoders.vision.bach_size": 3}, "encoders.vision.bach_size"),
        ({"encoders.text.min_actors": 4, "encoders.text.max_actors": 2}, "encoders.text"),
        ({"preset": "gigantic"}, "preset"),
        ({"format": "zip"}, "format"),
        ({"preprocess.limits": {"max_pixel": 10}}, "preprocess.limits"),
        ({"encoders.smell.batch_size": 3}, "encoders.smell"),
        ({"encoder_defaults.max_actors": "many"}, "encoder_defaults.max_actors"),
        ({"preprocess.batch_sizes": {"text": 0}}, "preprocess.batch_sizes.text"),
        # Checked before the job starts: per item, every item of the kind failed, exit 0.
        (
            {"preprocess.options": {"vision": {"bogus": 1}}},
            "preprocess.options: unknown vision preprocessing option(s) ['bogus']",
        ),
        (
            {"preprocess.options": {"depth": {"input": "sideways"}}},
            "preprocess.options: invalid depth preprocessing option: DepthConfig.input must be",
        ),
        # The stand-in accelerator alone would do nothing: refused, not ignored.
        ({"debug.null_encoder_item_s": 0.01}, "debug: null_encoder_item_s needs null_encoder"),
        ({"debug.null_encoder_log_path": "x"}, "debug: null_encoder_log_path needs null_encoder"),
    ],
)
def test_bad_config_names_the_field(overrides, named):
    with pytest.raises(ConfigError) as e:
        load_config(None, {"input": "in", "output": "out", **overrides})
    assert named in str(e.value)


def test_valid_preprocessing_options_are_accepted():
    opts = {"depth": {"input": "disparity"}, "audio": {"mean_subtraction": "per_clip"}}
    cfg = load_config(None, {"input": "in", "output": "out", "preprocess.options": opts})
    assert cfg.preprocess.options == opts


def test_missing_field_and_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="output: required field is missing"):
        load_config(None, {"input": "x"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_encoder_overrides_merge_with_defaults():
    cfg = load_config(
        None,
        {
            "input": "i",
            "output": "o",
            "encoder_defaults.batch_size": 7,
            "encoder_defaults.num_cpus": 0.5,
            "encoders.vision.num_gpus": 1,
        },
    )
    v = cfg.encoder("vision")
    assert (v.batch_size, v.num_cpus, v.num_gpus) == (7, 0.5, 1)
    assert cfg.encoder("text").num_gpus == 0


def test_pool_sizes_and_preprocess_batches_resolve_per_kind(monkeypatch):
    from pipelines.resources import Pool, actor_memory_bytes, pool_size

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    cfg = load_config(None, {"input": "i", "output": "o", "preset": "tiny"})
    # auto on CPU: one single-thread actor per core of this machine, split between the kinds
    # that encode on CPU; the pool starts at full size.
    assert pool_size(cfg, "vision", ["vision"], {"CPU": 16}) == Pool(1, 8, 8)
    assert pool_size(cfg, "vision", ["vision", "text"], {"CPU": 16}) == Pool(1, 4, 4)
    # on a cluster: half its logical CPUs (the other half decodes)
    assert pool_size(cfg, "text", ["text"], {"CPU": 64}, local=False) == Pool(1, 32, 32)
    # ... and never more copies of the weights than fit in half the memory (huge vision fp32
    # ~4.7 GB per actor by the estimate: 32 GiB -> 3 of 8; bf16 halves the weights)
    huge = load_config(None, {"input": "i", "output": "o", "preset": "huge"})
    assert 4.0e9 < actor_memory_bytes(huge, "vision") < 5.5e9
    assert pool_size(huge, "vision", ["vision"], {"CPU": 16}, memory_bytes=32 * 2**30).max == 3
    assert pool_size(huge, "vision", ["vision"], {"CPU": 16}, memory_bytes=2**30).max == 1
    assert pool_size(
        huge, "vision", ["vision"], {"CPU": 128, "memory": 64 * 2**30}, local=False
    ) == Pool(1, 6, 6)
    two = cfg.model_copy(
        update={"encoder_defaults": cfg.encoder_defaults.model_copy(update={"torch_threads": 2})}
    )
    assert pool_size(two, "vision", ["vision"], {"CPU": 16}) == Pool(1, 4, 4)
    # auto on GPU: one actor per num_gpus of the cluster's GPUs, never below min_actors
    gpu = load_config(
        None,
        {
            "input": "i",
            "output": "o",
            "preset": "tiny",
            "encoders.vision.num_gpus": 0.5,
            "encoders.vision.min_actors": 2,
        },
    )
    assert pool_size(gpu, "vision", ["vision", "text"], {"CPU": 16, "GPU": 4}) == Pool(2, 8, 8)
    assert pool_size(gpu, "vision", ["vision"], {"CPU": 16}) == Pool(2, 2, 2)
    assert pool_size(gpu, "text", ["vision", "text"], {"CPU": 16, "GPU": 4}) == Pool(1, 8, 8)
    # a CUDA actor runs two calls and has two more waiting; a CPU actor one call
    assert gpu.encoder("vision").tasks_in_flight == 4 and gpu.encoder("text").tasks_in_flight == 1
    logical = gpu.model_copy(  # a logical GPU share, the model kept on the CPU: one call
        update={"encoder_defaults": gpu.encoder_defaults.model_copy(update={"device": "cpu"})}
    )
    assert logical.encoder("vision").tasks_in_flight == 2
    # a number is taken as given: [min, max], starting at min
    fixed = load_config(
        None, {"input": "i", "output": "o", "preset": "tiny", "encoders.text.max_actors": 3}
    )
    assert pool_size(fixed, "text", ["text"], {"CPU": 16}) == Pool(1, 1, 3)

    assert cfg.preprocess.batch_size_for("text") == 128
    assert cfg.preprocess.batch_size_for("video") == 2
    tuned = load_config(
        None,
        {
            "input": "i",
            "output": "o",
            "preprocess.batch_size": 4,
            "preprocess.batch_sizes": {"text": 512},
        },
    )
    assert tuned.preprocess.batch_size_for("text") == 512
    assert tuned.preprocess.batch_size_for("vision") == 4


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_dtype_auto_is_resolved_once_per_kind_by_the_encoder_device(monkeypatch, fast_bf16):
    """`dtype: auto`: bfloat16 on GPU encoders and on CPUs with hardware bf16, float32 on
    other CPUs; the job's encoder settings (and so its lineage) carry the concrete dtype."""
    import imagebind_core.checkpoint as C

    monkeypatch.setattr(C, "cpu_has_fast_bf16", lambda: fast_bf16)
    cfg = load_config(
        None,
        {
            "input": "i",
            "output": "o",
            "encoder_defaults.dtype": "auto",
            "encoders.text.num_gpus": 1,
        },
    )
    assert cfg.encoder("text").dtype == "bfloat16"
    assert cfg.encoder("vision").dtype == ("bfloat16" if fast_bf16 else "float32")
    assert load_config(None, {"input": "i", "output": "o"}).encoder("vision").dtype == "float32"


def test_batch_defaults_follow_the_encoder_device():
    """A GPU encoder consumes items 10-100x faster than a CPU one: unset batch sizes give its
    kind larger encoder calls and preprocessing tasks; anything set explicitly wins."""
    cpu = load_config(None, {"input": "i", "output": "o"})
    assert [cpu.encoder(k).batch_size for k in ("vision", "text")] == [32, 32]
    assert [cpu.preprocess_batch(k) for k in ("vision", "text", "video")] == [16, 128, 2]
    gpu = load_config(None, {"input": "i", "output": "o", "encoders.text.num_gpus": 1})
    assert gpu.encoder("text").batch_size == 512 and gpu.preprocess_batch("text") == 8192
    assert gpu.encoder("vision").batch_size == 32 and gpu.preprocess_batch("vision") == 16
    every = load_config(None, {"input": "i", "output": "o", "encoder_defaults.num_gpus": 1})
    assert [every.encoder(k).batch_size for k in ("vision", "video", "audio")] == [128, 8, 128]
    assert [every.preprocess_batch(k) for k in ("vision", "video", "audio")] == [64, 4, 32]
    given = load_config(
        None,
        {
            "input": "i",
            "output": "o",
            "encoder_defaults.num_gpus": 1,
            "encoder_defaults.batch_size": 48,
            "encoders.text.batch_size": 200,
            "preprocess.batch_sizes": {"vision": 8},
        },
    )
    assert [given.encoder(k).batch_size for k in ("vision", "text")] == [48, 200]
    assert given.preprocess_batch("vision") == 8 and given.preprocess_batch("text") == 8192


def test_read_tasks_are_bounded_and_keep_the_repartition_fused(tmp_path, monkeypatch, ray_session):
    # Unbounded, Ray Data starts every shard's read at once, each in a worker process of its
    # own (a 20-manifest job on 2 cores started ten at once). The bound must reach the read
    # operator without splitting the shard repartition back out of it (one operator per block).
    from ray.data._internal.logical.optimizers import get_execution_plan

    from pipelines.embed import build_pipeline
    from pipelines.resources import read_concurrency

    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    base = {"input": "in", "output": "out"}
    assert read_concurrency(load_config(None, base)) == 6  # auto, local: the cores
    assert read_concurrency(load_config(None, base), {"CPU": 48.0}, local=False) == 48
    given = load_config(None, {**base, "preprocess.read_concurrency": 3})
    assert read_concurrency(given, {"CPU": 48.0}, local=False) == 3
    for bad in (0, -1, "many"):
        with pytest.raises(ConfigError, match="read_concurrency"):
            load_config(None, {**base, "preprocess.read_concurrency": bad})

    (tmp_path / "in").mkdir()
    for m in range(3):
        ids = [f"t{m}-{i}" for i in range(4)]
        rows = {"id": ids, "modality": ["text"] * 4, "text": [f"caption {i}" for i in ids]}
        pq.write_table(pa.table(rows), tmp_path / "in" / f"m{m}.parquet")
    cfg = load_config(
        None,
        {
            "input": str(tmp_path / "in"),
            "output": str(tmp_path / "out"),
            "preset": "tiny",
            "preprocess.read_concurrency": 2,
        },
    )
    ds = build_pipeline(cfg, plan_job(cfg), resources={"CPU": 4.0}, local=True)
    op, ops = get_execution_plan(ds._logical_plan)[0].dag, []
    while op.input_dependencies:
        ops.append(op)
        op = op.input_dependencies[0]
    reads = [o for o in ops if o.name.startswith("MapBatches(read_tasks)")]
    assert len(reads) == 1 and "StreamingRepartition" in reads[0].name, [o.name for o in ops]
    assert reads[0]._max_concurrency == 2


def test_listing_and_writing_modules_do_not_import_torch():
    # Ray tasks that list shards, write parts and commit import these modules: without torch
    # they start in a fraction of the time (worker start-up is the job's fixed cost).
    code = (
        "import sys, pipelines.embed, pipelines.plan, pipelines.readers, pipelines.writers, "
        "pipelines.lock; "
        "import imagebind_core as ibc; ibc.infer_kind('a.jpg'); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


_TEXT_STAGE = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
from pipelines.readers import read_shard_task
from pipelines.stages import preprocess_batch
from pipelines.warmup import warm_worker
path = sys.argv[1]
pq.write_table(pa.table({"id": ["a", "b"], "modality": ["text"] * 2,
                         "text": ["a dog", "two cats on a mat"]}), path)
task = {"kind": "text", "format": "manifest", "shard": "m", "uri": path, "items": None,
        "fingerprint": None}
warm = warm_worker(["text"])
blocks = [b for b in read_shard_task(task, sys.argv[2], None, chunk_rows=8) if b.num_rows]
out = preprocess_batch(pa.concat_tables(blocks))
dtypes = {d for d in out.column("tensor_dtype").to_pylist() if d is not None}
tokens = out.num_rows - out.column("tensor").null_count  # less the shard's end-of-stream row
print(warm["cold"], tokens, sorted(dtypes), "torch" in sys.modules)
"""


def test_text_preprocessing_workers_do_not_import_torch(tmp_path):
    # A text worker tokenizes into numpy and never needs torch: its start costs ~0.3 CPU-s
    # instead of ~1.6 (the text job's Ray workers start and warm up without it).
    out = subprocess.run(
        [sys.executable, "-c", _TEXT_STAGE, str(tmp_path / "m.parquet"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert out.stdout.split() == ["True", "2", "['<i4']", "False"], out.stdout + out.stderr


_IMAGE_STAGE = """
import sys
import numpy as np, pyarrow as pa
sys.path.insert(0, "tests")
import media
from pipelines.rows import ITEM_SCHEMA
from pipelines.stages import preprocess_batch
from pipelines.warmup import warm_worker
warm = warm_worker(["vision"])
datas = [media.make_image("JPEG", (320, 240)), media.make_image("PNG", (150, 97), "I;16"),
         b"not an image"]
rows = [{"id": str(i), "modality": "vision", "status": "ok", "fingerprint": "f", "size": 1,
         "mtime": 0.0, "data": d} for i, d in enumerate(datas)]
out = preprocess_batch(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA))
print(warm["cold"], out.column("status").to_pylist(), "torch" in sys.modules)
import imagebind_core as ibc  # now the reference call, which returns a tensor
tensor = out.column("tensor").to_pylist()
print(all(np.frombuffer(tensor[i], np.uint8).tobytes()
          == ibc.preprocess("vision", datas[i], compact=True).numpy().tobytes() for i in (0, 1)))
"""


def test_image_preprocessing_workers_do_not_import_torch():
    # Still images are decoded, resized and cropped with Pillow and numpy: an image worker
    # starts without torch (~1-1.5 CPU-s and ~270 MB of private memory less per process), and its
    # pixels are the bytes the tensor-returning call gives.
    out = subprocess.run(
        [sys.executable, "-c", _IMAGE_STAGE],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert out.stdout.split("\n")[:2] == ["True ['ok', 'ok', 'error'] False", "True"], (
        out.stdout + out.stderr
    )


def test_cli_bad_flag_exit_code_and_message(capsys):
    rc = main(["--input", "a", "--output", "b", "--set", "encoder_defaults.max_actors=-1"])
    assert rc == 2
    assert "encoder_defaults.max_actors" in capsys.readouterr().err


# ----------------------------------------------------------------------------- planning


def test_dry_run_prints_the_plan(tmp_path, capsys):
    corpus = files_corpus(Writer(str(tmp_path)))
    rc = main(
        [
            *("--input", corpus.input, "--output", str(tmp_path / "out"), "--preset", "tiny"),
            *("--set", "files.files_per_shard=4", "--dry-run"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "format files" in out and "3 to do" in out
    assert "audio 1, text 4, vision 5" in out
    assert "skipped: 1 files" in out
    assert "encoder vision" in out
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


def test_listing_reads_no_payload_and_ids_are_stable(tmp_path, monkeypatch):
    w = Writer(str(tmp_path))
    wds = webdataset_corpus(w)
    man = manifest_corpus(w)

    def refuse(*a, **k):
        raise AssertionError("payload read while listing")

    monkeypatch.setattr(tarfile.TarFile, "extractfile", refuse)
    monkeypatch.setattr("imagebind_core.read_bytes", refuse)
    cfg = load_config(None, {"input": wds.input, "output": str(tmp_path / "o"), "preset": "tiny"})
    rows = list_items(cfg)
    assert sorted(rows.column("id").to_pylist()) == sorted([*wds.good, *wds.bad])
    assert all("#" in fp for fp in rows.column("fingerprint").to_pylist())
    assert list_items(cfg).equals(rows)  # same listing twice: ids and fingerprints stable

    cfg = load_config(None, {"input": man.input, "output": str(tmp_path / "o"), "preset": "tiny"})
    rows = {r["id"]: r for r in list_items(cfg).to_pylist()}
    assert set(rows) == set(man.good) | set(man.bad)
    assert rows["a3"]["error"].startswith("object not found")
    assert rows["a4"]["modality"] == "invalid"
    assert rows["a2"]["fingerprint"].startswith("sha256:")
    assert rows["a0"]["fingerprint"].startswith("stat:")
    assert rows["a0"]["uri"] == os.path.join(str(tmp_path), "media", "m0.png")


def test_listing_in_small_chunks_equals_listing_at_once(tmp_path, monkeypatch):
    # list_items turns rows into Arrow a chunk at a time (a manifest's table is cut into
    # chunks) so that a corpus of millions is not held as Python dicts: chunk edges must not
    # change a row, drop one or skip the stat of rows without a fingerprint.
    w = Writer(str(tmp_path))
    for corpus in (manifest_corpus(w), webdataset_corpus(w)):
        cfg = load_config(None, {"input": corpus.input, "output": str(tmp_path / "o")})
        whole = list_items(cfg)
        monkeypatch.setattr("pipelines.plan.LIST_CHUNK_ROWS", 2)
        chunked = list_items(cfg)
        monkeypatch.undo()
        assert whole.num_rows > 2
        assert chunked.equals(whole)


def test_manifest_listing_column_by_column_equals_row_by_row(tmp_path):
    # Manifests are listed column by column (no dict per row); the rows must be those of the
    # row-by-row path every other format takes: ids, invalid rows, stat'ed objects, inline
    # texts, ids excluded as repeats of an earlier manifest, missing objects' errors.
    from pipelines.plan import _listed_rows, _stat_rows

    w = Writer(str(tmp_path))
    man = manifest_corpus(w)
    (tmp_path / "in2").mkdir()
    (tmp_path / "in2" / "a.csv").write_text("id,modality,text\nx1,text,one\nx2,sound,two\n")
    (tmp_path / "in2" / "b.csv").write_text(f"id,modality,uri\nx1,vision,{man.input}/nope.png\n"
                                            f"x3,vision,{man.input}/gone.png\nx4,,\n")  # fmt: skip
    for folder in (man.input, str(tmp_path / "in2")):
        cfg = load_config(None, {"input": folder, "output": str(tmp_path / "o")})
        so = cfg.storage_options()
        rows = [r for shard in plan_job(cfg).shards for r in _listed_rows(shard, cfg, so)]
        _stat_rows([r for r in rows if r["fingerprint"] is None and r["error"] is None], so, 4)
        want = pa.Table.from_pylist(
            [{k: r.get(k) for k in LISTING_SCHEMA.names} for r in rows], schema=LISTING_SCHEMA
        )
        got = list_items(cfg)
        assert want.num_rows >= 3 and got.equals(want), (got.to_pylist(), want.to_pylist())
        assert "invalid" in got.column("modality").to_pylist()


def test_files_shards_are_stable_across_runs(tmp_path):
    corpus = files_corpus(Writer(str(tmp_path)))
    cfg = load_config(
        None, {"input": corpus.input, "output": str(tmp_path / "o"), "files.files_per_shard": 2}
    )
    first = plan_job(cfg)
    # New files after the first run must not move existing files to other shards.
    Writer(str(tmp_path)).put("files/img/new.png", b"x")
    again = plan_job(cfg, files_shards=first.files_shards)
    old = {it["id"]: s.name for s in first.shards for v in s.items.values() for it in v}
    new = {it["id"]: s.name for s in again.shards for v in s.items.values() for it in v}
    assert all(new[i] == old[i] for i in old)


def test_ids_repeated_across_manifests_keep_their_first_occurrence(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.csv").write_text("id,modality,text\nx1,text,one\nx2,text,two\n")
    (d / "b.csv").write_text("id,modality,text\nx2,text,TWO\nx3,text,three\nx3,text,dup\n")
    (d / "c.csv").write_text("id,uri,modality\n")  # empty
    (d / "d.jsonl").write_text('{"id": "x1", "uri": "p.png", "modality": "vision"}\n')
    cfg = load_config(None, {"input": str(d), "output": str(tmp_path / "o"), "preset": "tiny"})
    plan = plan_job(cfg)
    by = {s.name: s for s in plan.shards}
    assert plan.duplicates == 3  # x2 in b and x1 in d repeat earlier manifests; x3 twice in b
    assert by["b"].exclude == ["x2"] and by["b"].counts == {"text": 1}
    assert by["d"].exclude == ["x1"] and by["d"].kinds == () and by["d"].counts == {}
    assert by["a"].exclude is None and by["c"].kinds == ()
    assert plan.counts == {"text": 3} and plan.kinds == ("text",)
    listed = list_items(cfg, stat=False)
    assert sorted(listed.column("id").to_pylist()) == ["x1", "x2", "x3"]
    assert dict(zip(*listed.select(["id", "shard"]).to_pydict().values(), strict=True)) == {
        "x1": "a",
        "x2": "a",
        "x3": "b",
    }
    # The reading task of b skips the repeat.
    (task,) = shard_tasks(plan, cfg, [by["b"]])["text"]
    batches = read_tasks(pa.table({"task": [task["task"]]}), str(tmp_path / "o"), None)
    rows = [r for t in batches for r in t.to_pylist()]
    assert [r["id"] for r in rows if r["status"] == "ok"] == ["x3"]


def test_manifest_rows_every_rule(tmp_path):
    """A manifest's item rows (built column by column) follow each documented rule: kinds and
    their aliases, id fallbacks (`id`, else the uri as written, else `<shard>#<row>`), the
    first of repeated ids, relative uris resolved, inline texts with their fingerprint and
    size, and rejected rows with the reason; the read task cuts them by rows and by bytes."""
    import hashlib

    from pipelines.formats import manifest_keys, manifest_table, read_manifest
    from pipelines.readers import read_shard_task
    from pipelines.rows import INVALID

    d = tmp_path / "in"
    d.mkdir()
    man = d / "m.jsonl"
    rows = [
        {"id": "a", "uri": "img/a.jpg", "modality": " Image "},
        {"uri": "  ", "text": "hello", "modality": "text"},
        {"id": "", "uri": "s3://b/x.wav", "modality": "AUDIO"},
        {"id": "a", "uri": "img/other.jpg", "modality": "vision"},
        {"id": "d", "modality": "vision"},
        {"id": "e", "text": "hi", "modality": "vision", "fingerprint": "fp-e", "size": 9},
        {"id": "f", "uri": "/abs/f.png", "modality": "hologram"},
        {"id": "g", "uri": "../up/g.jpg", "modality": "photo"},
        {"id": "h", "uri": "v/h.mp4", "modality": "video", "fingerprint": "etag", "size": 7,
         "mtime": 1.5},
    ]  # fmt: skip
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    repeats: list[str] = []
    got = manifest_table(read_manifest(str(man), None), "m", str(man), repeats).to_pylist()
    assert repeats == ["a"]
    # What planning reads of a manifest: the same ids and kinds, without the other columns.
    keys = manifest_keys(read_manifest(str(man), None), "m").to_pylist()
    assert keys == [{"id": r["id"], "_kind": r["_kind"]} for r in got]
    by = {r["id"]: r for r in got}
    assert [r["id"] for r in got] == ["a", "m#1", "s3://b/x.wav", "d", "e", "f", "g", "h"]
    assert by["a"]["uri"] == f"{d}/img/a.jpg" and by["a"]["modality"] == "vision"
    assert by["g"]["uri"] == f"{tmp_path}/up/g.jpg" and by["g"]["_kind"] == "vision"
    assert by["s3://b/x.wav"]["uri"] == "s3://b/x.wav" and by["s3://b/x.wav"]["_kind"] == "audio"
    text = by["m#1"]
    assert text["uri"] == f"{man}#1" and text["data"] == b"hello" and text["size"] == 5
    assert text["fingerprint"] == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert text["status"] == "ok" and text["_kind"] == "text"
    assert by["h"]["fingerprint"] == "etag" and by["h"]["size"] == 7 and by["h"]["mtime"] == 1.5
    assert by["d"]["error"] == "row has neither 'uri' nor inline 'text'"
    assert by["e"]["error"] == "inline text given for modality 'vision'"
    assert by["e"]["data"] is None and by["e"]["fingerprint"] == "fp-e"
    assert by["f"]["error"].startswith("unknown modality 'hologram'; expected one of")
    assert by["f"]["modality"] == "hologram"
    for i in ("d", "e", "f"):
        assert by[i]["status"] == "error" and by[i]["_kind"] == INVALID
    for i in ("a", "m#1", "g", "h"):
        assert by[i]["error"] is None and by[i]["shard"] == "m"
    # The read task: one kind's rows, minus those already written, in row- and byte-bounded
    # tables, then the end-of-shard marker with the count.
    big = d / "t.jsonl"
    big.write_text("".join(json.dumps({"id": f"t{i}", "text": "x" * (10 + i), "modality": "text"})
                           + "\n" for i in range(10)))  # fmt: skip
    task = {
        "shard": "t", "kind": "text", "format": "manifest", "uri": str(big), "fingerprint": None,
        "items": None, "include": None, "exclude": ["t3"], "wds_extensions": {},
    }  # fmt: skip
    tables = list(read_shard_task(task, str(tmp_path / "o"), None, chunk_rows=4, chunk_bytes=35))
    sizes = [t.num_rows for t in tables]
    emitted = [r for t in tables for r in t.to_pylist()]
    ids = [r["id"] for r in emitted if r["status"] == "ok"]
    assert ids == [f"t{i}" for i in range(10) if i != 3]
    assert all(sum(len(r["data"] or b"") for r in t.to_pylist()) <= 35 or t.num_rows == 1
               for t in tables)  # fmt: skip
    assert max(sizes) <= 4 and emitted[-1]["status"] == "eos" and emitted[-1]["count"] == 9
    assert {r["branch"] for r in emitted} == {"text"}


def test_manifest_columns_of_other_types_are_normalised(tmp_path):
    import datetime

    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(
        pa.table(
            {
                "uri": ["a.png", "b.png", "c.png"],
                "modality": ["vision"] * 3,
                "id": pa.array([7.0, float("nan"), 2.5]),  # pandas' int column with a gap
                "mtime": pa.array(
                    [datetime.datetime(2024, 1, 1), None, datetime.datetime(2024, 1, 1, 0, 0, 1)],
                    pa.timestamp("us", tz="UTC"),
                ),
                "size": pa.array([1, 2, None], pa.int32()),
                "text": ["", None, None],  # "" is no text (as CSV reads it), not inline text
            }
        ),
        d / "a.parquet",
    )
    (d / "b.csv").write_text("uri,modality,mtime,size\nd.png,vision,2024-01-01T00:00:00,12\n")
    (d / "c.jsonl").write_bytes(b"")  # 0 bytes: an empty manifest
    cfg = load_config(None, {"input": str(d), "output": str(tmp_path / "o"), "preset": "tiny"})
    plan = plan_job(cfg)
    assert plan.counts == {"vision": 4}
    rows = {}
    for task in shard_tasks(plan, cfg, plan.shards)["vision"]:
        for t in read_tasks(pa.table({"task": [task["task"]]}), str(tmp_path / "o"), None):
            rows.update({r["id"]: r for r in t.to_pylist() if r["status"] == "ok"})
    assert set(rows) == {"7", "b.png", "2.5", "d.png"}  # NaN id: the uri is the id
    assert rows["7"]["mtime"] == 1704067200.0 and rows["7"]["size"] == 1
    assert rows["d.png"]["mtime"] == 1704067200.0 and rows["d.png"]["size"] == 12

    (d / "bad.csv").write_text("uri,modality,size\nb.png,vision,twelve\n")
    with pytest.raises(PlanError, match=r"bad.csv: column 'size' .* integer"):
        plan_job(cfg)
    (d / "bad.csv").write_text('[{"uri": "b.png", "modality": "vision"}]')
    (d / "bad.csv").rename(d / "bad.json")
    with pytest.raises(PlanError, match="JSON Lines"):
        plan_job(cfg)
    # A list where a string belongs, and bytes that are not UTF-8: one sentence, not a
    # traceback from Arrow's cast.
    (d / "bad.json").unlink()
    (d / "bad.jsonl").write_text('{"uri": "b.png", "modality": "text", "text": ["x"]}\n')
    with pytest.raises(PlanError, match=r"bad.jsonl: column 'text' of type list<.*strings"):
        plan_job(cfg)
    (d / "bad.jsonl").unlink()
    bad_id = pa.array([b"\xff"], pa.binary())
    pq.write_table(
        pa.table({"id": bad_id, "uri": ["b.png"], "modality": ["vision"]}), d / "bad.parquet"
    )
    with pytest.raises(PlanError, match=r"bad.parquet: column 'id' of type binary .*UTF8"):
        plan_job(cfg)
    # Strings that are not UTF-8 in the columns that name and route an item: the row is named,
    # whichever reader left them unchecked (JSON Lines, CSV).
    (d / "bad.parquet").unlink()
    ok_row = b'{"id": "a", "uri": "a.png", "modality": "vision"}\n'
    (d / "bad.jsonl").write_bytes(
        ok_row + b'{"id": "b\xff", "uri": "b.png", "modality": "vision"}\n'
    )
    with pytest.raises(PlanError, match=r"bad.jsonl: column 'id' is not valid UTF-8 in row 2 "):
        plan_job(cfg)
    (d / "bad.jsonl").unlink()
    (d / "bad.csv").write_bytes(b"uri,modality\na.png,vision\nb.png,vis\xe9ion\n")
    with pytest.raises(PlanError, match=r"bad.csv: column 'modality' is not valid UTF-8 in row 2"):
        plan_job(cfg)


def test_a_csv_caption_that_is_not_utf8_fails_its_row_only(tmp_path):
    # As in JSON Lines: the caption's row goes to the errors with the reason; the manifest's
    # other rows are embedded (before, the CSV reader refused the whole file).
    from pipelines.stages import preprocess_batch

    d = tmp_path / "in"
    d.mkdir()
    (d / "m.csv").write_bytes(b"id,modality,text\nx1,text,a caption\nx2,text,caf\xe9\n")
    cfg = load_config(None, {"input": str(d), "output": str(tmp_path / "o"), "preset": "tiny"})
    plan = plan_job(cfg)
    (task,) = shard_tasks(plan, cfg, plan.shards)["text"]
    blocks = read_tasks(pa.table({"task": [task["task"]]}), str(tmp_path / "o"), None)
    rows = {r["id"]: r for r in preprocess_batch(pa.concat_tables(blocks)).to_pylist()}
    assert rows["x1"]["status"] == STATUS_OK
    assert rows["x2"]["status"] == STATUS_ERROR
    assert rows["x2"]["error"] == "text is not valid UTF-8 (unexpected end of data at byte 3)"


def test_listing_edge_cases_of_paths_and_formats(tmp_path):
    from imagebind_core.io import canonical_uri, filesystem

    # A folder whose name has glob characters is a folder, not a pattern.
    d = tmp_path / "photos [2024]"
    d.mkdir()
    (d / "a.txt").write_text("a caption")
    (d / "b::c.txt").write_text("fsspec would read :: as URL chaining")
    srcs = list_input(str(d))
    assert sorted(s.rel for s in srcs) == ["a.txt", "b::c.txt"]
    fs, path = filesystem(srcs[1].uri)
    assert fs.cat_file(path) == b"fsspec would read :: as URL chaining"
    assert len(list_input(str(tmp_path / "photos*" / "*.txt"))) == 2  # a pattern is still one
    # IMU recordings saved as CSV / JSON are media files, not manifests.
    imu = tmp_path / "imu"
    imu.mkdir()
    np.savetxt(imu / "walk.imu.csv", np.zeros((20, 6)), delimiter=",")
    assert detect_format(list_input(str(imu))) == "files"
    assert canonical_uri(str(d) + "/") == canonical_uri("file://" + str(d)) == str(d)
    assert canonical_uri("S3://bucket/prefix/") == "s3://bucket/prefix"
    # An output that is a file is refused before anything is written.
    (tmp_path / "afile").write_text("x")
    rc = main(["--input", str(d), "--output", str(tmp_path / "afile"), "--dry-run"])
    assert rc == 2


def test_an_unreadable_first_tar_shard_is_skipped_when_planning(tmp_path):
    w = Writer(str(tmp_path))
    corpus = webdataset_corpus(w)
    w.put(os.path.relpath(corpus.input, str(tmp_path)) + "/000-empty.tar", b"")  # sorts first
    cfg = load_config(
        None, {"input": corpus.input, "output": str(tmp_path / "o"), "preset": "tiny"}
    )
    plan = plan_job(cfg)
    assert plan.format == "webdataset" and "000-empty" in {s.name for s in plan.shards}
    rows = list_items(cfg, stat=False).to_pylist()
    bad = [r for r in rows if r["shard"] == "000-empty"]
    assert bad and all(r["id"].startswith("000-empty#unreadable-") and r["error"] for r in bad)
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.tar").write_bytes(b"not a tar at all" * 10)
    cfg = load_config(None, {"input": str(only_bad), "output": str(tmp_path / "o2")})
    with pytest.raises(PlanError, match=r"x\.tar"):
        plan_job(cfg)


def test_rerun_with_the_input_spelled_differently_is_the_same_job(tmp_path):
    from pipelines.embed import _check_record
    from pipelines.lineage import model_lineage
    from pipelines.store import Output

    d = tmp_path / "in"
    d.mkdir()
    (d / "a.csv").write_text("id,modality,text\nx1,text,one\n")
    out = Output(str(tmp_path / "o"))
    out.makedirs(out.root)
    for spelling in (str(d) + "/", str(d), "file://" + str(d)):
        cfg = load_config(None, {"input": spelling, "output": out.root, "preset": "tiny"})
        _check_record(out, cfg, plan_job(cfg), model_lineage(cfg, ("text",)))
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.csv").write_text("id,modality,text\nx1,text,one\n")
    cfg = load_config(None, {"input": str(other), "output": out.root, "preset": "tiny"})
    with pytest.raises(OutputMismatch, match="different job"):
        _check_record(out, cfg, plan_job(cfg), model_lineage(cfg, ("text",)))


def test_gpu_pools_fill_every_gpu_and_pack_small_encoders():
    from pipelines.resources import Pool, gpu_pools, pool_size

    cfg = load_config(
        None, {"input": "i", "output": "o", "preset": "tiny", "encoder_defaults.num_gpus": 1}
    )
    # big towers: a whole GPU per actor; small encoders: a quarter (several share a GPU)
    assert [cfg.encoder(k).num_gpus for k in ("vision", "text", "audio", "imu")] == [
        1,
        1,
        0.25,
        0.25,
    ]
    assert cfg.encoder("vision").model_device == "cuda"
    assert cfg.encoder("vision").concurrent_batches == 2
    kinds = ["audio", "text", "vision"]
    pools = gpu_pools(cfg, kinds, 4)
    # every GPU taken at the start: 1 + 1 + 8 x 0.25; each pool may grow to all four GPUs
    assert pools == {"vision": (1, 4), "text": (1, 4), "audio": (8, 16)}
    assert pool_size(cfg, "audio", kinds, {"CPU": 64, "GPU": 4}) == Pool(1, 8, 16)
    assert sum(i * cfg.encoder(k).num_gpus for k, (i, _) in pools.items()) == 4
    # one GPU, two big towers: one waits for the other's pool to finish (min_actors 1)
    assert gpu_pools(cfg, ["text", "vision"], 1) == {"text": (1, 1), "vision": (0, 1)}
    assert pool_size(cfg, "vision", ["text", "vision"], {"GPU": 1}) == Pool(1, 1, 1)
    # a kind's own num_gpus wins; device cpu keeps the model off the GPU it holds
    own = load_config(
        None,
        {
            "input": "i",
            "output": "o",
            "preset": "tiny",
            "encoder_defaults.num_gpus": 1,
            "encoder_defaults.device": "cpu",
            "encoders.audio.num_gpus": 0.5,
        },
    )
    assert own.encoder("audio").num_gpus == 0.5 and own.encoder("audio").model_device == "cpu"
    assert own.model_spec("audio").device == "cpu" and own.encoder("audio").concurrent_batches == 1
    assert gpu_pools(own, ["audio", "vision"], 2) == {"audio": (2, 4), "vision": (1, 2)}
    with pytest.raises(ConfigError, match="device cuda needs num_gpus"):
        load_config(None, {"input": "i", "output": "o", "encoder_defaults.device": "cuda"})


@pytest.mark.parametrize(
    "change",
    [
        {"encoder_defaults.dtype": "bfloat16"},
        {"seed": 7},
        {"normalize": False},
        {"preprocess.options": {"text": {"context_length": 77}}},
        {"preprocess.limits": {"max_text_chars": 100}},
    ],
    ids=["dtype", "seed", "normalize", "option", "limit"],
)
def test_rerun_with_anything_that_changes_a_vector_is_refused(tmp_path, change):
    """An output holds one model's vectors: a rerun with another dtype, seed (random weights),
    normalisation or preprocessing option/limit is refused like another preset."""
    from pipelines.embed import _check_record
    from pipelines.lineage import model_lineage
    from pipelines.store import Output

    d = tmp_path / "in"
    d.mkdir()
    (d / "a.csv").write_text("id,modality,text\nx1,text,one\n")
    out = Output(str(tmp_path / "o"))
    out.makedirs(out.root)
    base = {"input": str(d), "output": out.root, "preset": "tiny"}
    cfg = load_config(None, base)
    _check_record(out, cfg, plan_job(cfg), model_lineage(cfg, ("text",)))
    _check_record(out, cfg, plan_job(cfg), model_lineage(cfg, ("text",)))  # same job: fine
    other = load_config(None, {**base, **change})
    with pytest.raises(OutputMismatch, match="different job"):
        _check_record(out, other, plan_job(other), model_lineage(other, ("text",)))


def test_repeated_rows_over_many_shards():
    rng = np.random.default_rng(0)
    shards = [[f"id{int(i)}" for i in rng.integers(0, 500, size=n)] for n in (300, 0, 200, 400)]
    got = repeated_rows([id_digests(s) for s in shards])
    seen: set[str] = set()
    for ids, rows in zip(shards, got, strict=True):
        want = []
        for j, i in enumerate(ids):
            if i in seen:
                want.append(j)
            seen.add(i)
        assert rows.tolist() == want
    # Repeats across shards and within one, in any order of first occurrence.
    d = np.array
    got = repeated_rows([d([5, 6, 0], np.uint64), d([6, 5], np.uint64)])
    assert [g.tolist() for g in got] == [[], [0, 1]]
    got = repeated_rows([d([6, 5, 6], np.uint64)])
    assert [g.tolist() for g in got] == [[2]]
    # Digests from a tiny range, so repeated and unique digests mix in every shard: each row
    # is a repeat exactly when an earlier row has its digest.
    shards = [rng.integers(0, 4, size=n).astype(np.uint64) for n in (50, 0, 1, 70)]
    shards.append(np.array([99], np.uint64))  # a digest no other row has
    got = repeated_rows(shards)
    seen_d: set[int] = set()
    for rows_d, g in zip(shards, got, strict=True):
        want = []
        for j, key in enumerate(rows_d.tolist()):
            if key in seen_d:
                want.append(j)
            seen_d.add(key)
        assert g.tolist() == want


def test_a_digest_collision_is_never_taken_for_a_repeat():
    # Every row's digest forced equal: only the ids read back decide what repeats.
    shards = [["a", "b", "a"], [], ["c", "b", "d", "c"]]
    same = [np.zeros(len(s), np.uint64) for s in shards]
    asked: list[list[int]] = []

    def read_ids(ks):
        asked.append(ks)
        return [pa.array(shards[k]) for k in ks]

    got = repeated_rows(same, read_ids)
    assert [g.tolist() for g in got] == [[2], [], [1, 3]]
    assert asked == [[0, 2]]  # once, with the shards that hold candidates
    # Without the ids, equal digests are taken for equal ids (what read_ids guards against).
    assert [g.tolist() for g in repeated_rows(same)] == [[1, 2], [], [0, 1, 2, 3]]
    # Real digests: distinct ids never reach read_ids.
    got = repeated_rows([id_digests(s) for s in (["x", "y"], ["z"])], read_ids)
    assert [g.tolist() for g in got] == [[], []] and len(asked) == 1


def test_planning_compares_ids_when_digests_collide(tmp_path, monkeypatch):
    import pipelines.plan as plan_mod

    d = tmp_path / "in"
    d.mkdir()
    (d / "a.csv").write_text("id,modality,text\nx1,text,one\nx2,text,two\n")
    (d / "b.csv").write_text("id,modality,text\nx3,text,three\nx1,text,ONE\nx4,text,four\n")
    # All ids share one digest: a planner that trusted digests would keep only x1.
    monkeypatch.setattr(plan_mod, "id_digests", lambda ids: np.zeros(len(ids), np.uint64))
    cfg = load_config(None, {"input": str(d), "output": str(tmp_path / "o"), "preset": "tiny"})
    plan = plan_job(cfg)
    by = {s.name: s for s in plan.shards}
    assert plan.duplicates == 1 and by["a"].exclude is None
    assert by["b"].exclude == ["x1"] and by["b"].counts == {"text": 2}
    listed = list_items(cfg, stat=False)
    assert sorted(listed.column("id").to_pylist()) == ["x1", "x2", "x3", "x4"]


# ----------------------------------------------------------------------------- parts + commit


def _encoded(rows: list[dict], dim: int = 4) -> pa.Table:
    base = {f.name: [r.get(f.name) for r in rows] for f in ITEM_SCHEMA if f.name != "data"}
    emb = [r.get("embedding") for r in rows]
    return pa.table(
        {**base, "embedding": pa.array(emb, embedding_type(dim))}, schema=encoded_schema(dim)
    )


def test_part_rows_failed_without_a_reason_say_so(tmp_path):
    out = str(tmp_path / "out")
    rows = [
        {
            "id": f"x{i}",
            "shard": "s",
            "branch": "text",
            "modality": "text",
            "status": st,
            "error": e,
            "embedding": [1.0] * 4 if st == STATUS_OK else None,
        }
        for i, (st, e) in enumerate(
            [(STATUS_OK, None), (STATUS_ERROR, None), (STATUS_ERROR, ""), (STATUS_ERROR, "bad")]
        )
    ]
    summary = write_parts(_encoded(rows), out, None, 4).to_pylist()[0]
    assert (summary["n_ok"], summary["n_err"]) == (1, 3)
    (part,) = os.listdir(tmp_path / "out" / "_parts" / "s")
    got = pq.read_table(tmp_path / "out" / "_parts" / "s" / part)
    assert got.column("error").to_pylist() == [None, "unknown error", "unknown error", "bad"]


def test_parts_are_idempotent_and_commit_dedupes(tmp_path):
    out = str(tmp_path / "out")

    def row(i, status=STATUS_OK):
        return {
            "id": f"x{i}",
            "uri": f"u{i}",
            "modality": "text",
            "shard": "s",
            "branch": "text",
            "status": status,
            "error": "bad" if status == STATUS_ERROR else None,
            "embedding": [float(i)] * 4 if status == STATUS_OK else None,
            "fingerprint": f"f{i}",
        }

    block = _encoded([row(0), row(1), row(2, STATUS_ERROR)])
    s1 = write_parts(block, out, None, 4)
    s2 = write_parts(block, out, None, 4)  # a retried task: same part name, no copy
    assert s1.equals(s2)
    assert len(os.listdir(tmp_path / "out" / "_parts" / "s")) == 1
    # Another block repeats x1 (e.g. re-executed upstream) and carries the end marker.
    eos = {"id": "s#eos", "shard": "s", "modality": "text", "branch": "text"}
    summary = write_parts(
        _encoded([row(1), row(3), {**eos, "status": STATUS_EOS, "count": 4}]), out, None, 4
    )
    assert summary.column("expected").to_pylist() == [4]
    meta = {"imagebind.preset": "tiny"}
    res = commit_shard(out, "s", None, 4, meta)
    assert res == {"shard": "s", "ok": 3, "errors": 1, "added": False}
    emb = pq.read_table(tmp_path / "out" / "s.parquet")
    assert emb.column("id").to_pylist() == ["x0", "x1", "x3"]
    assert emb.schema.metadata[b"imagebind.preset"] == b"tiny"
    np.testing.assert_array_equal(emb.column("embedding").to_pylist()[2], [3.0] * 4)
    err = pq.read_table(tmp_path / "out" / "_errors" / "s.parquet")
    assert err.column("id").to_pylist() == ["x2"] and err.column("error").to_pylist() == ["bad"]
    assert not (tmp_path / "out" / "_parts" / "s").exists()
    assert Output(out).committed_shards() == {"s"}
    # A run that died between the commit and deleting the parts leaves them; they are found
    # (the next run removes them), parts of uncommitted shards are not.
    write_parts(block, out, None, 4)
    nested = {**row(5), "shard": "a/b"}
    write_parts(_encoded([nested]), out, None, 4)
    assert Output(out).leftover_parts(Output(out).committed_shards()) == ["s"]


def test_parts_hold_vector_bytes_and_the_commit_gives_back_the_same_floats(tmp_path):
    # Parts store each vector as its float32 bytes, uncompressed (fast to write and to read
    # back); the committed file holds fixed_size_list<float32> with every bit unchanged,
    # including values that do not survive a round trip through text or float64 casts.
    out, dim = str(tmp_path / "out"), 5
    special = [np.float32(v) for v in (-0.0, 1e-45, 3.4028235e38, 1 / 3, -2.5e-8)]
    rows = [
        {
            "id": f"x{i}",
            "shard": "s",
            "branch": "text",
            "modality": "text",
            "status": STATUS_OK if i != 1 else STATUS_ERROR,
            "error": "bad" if i == 1 else None,
            "embedding": [float(v) * (-1) ** i for v in special] if i != 1 else None,
        }
        for i in range(4)
    ]
    block = _encoded(rows, dim)
    write_parts(block.slice(1), out, None, dim)  # a sliced block: Arrow offsets in play
    write_parts(block.slice(0, 1), out, None, dim)
    part_dir = tmp_path / "out" / "_parts" / "s"
    for part in os.listdir(part_dir):
        f = pq.ParquetFile(part_dir / part)
        assert f.schema_arrow.field("embedding").type == pa.binary(4 * dim)
        col = f.schema_arrow.get_field_index("embedding")
        assert f.metadata.row_group(0).column(col).compression == "UNCOMPRESSED"
    assert commit_shard(out, "s", None, dim, {})["ok"] == 3
    got = pq.read_table(tmp_path / "out" / "s.parquet")
    assert got.schema.field("embedding").type == embedding_type(dim)
    want = np.array([r["embedding"] for r in rows if r["embedding"]], np.float32)
    have = np.asarray(got.column("embedding").combine_chunks().values).reshape(-1, dim)
    assert have.tobytes() == want.tobytes()


def test_a_commit_takes_parts_written_with_float_lists(tmp_path):
    # Parts left by an interrupted run of a version that wrote vectors as float lists are
    # committed beside new ones, vectors unchanged.
    from pipelines.rows import part_schema

    out, dim = str(tmp_path / "out"), 3
    old = pa.table(
        {
            "id": ["a", "b"],
            "uri": ["ua", "ub"],
            "modality": ["text", "text"],
            "embedding": pa.array([[1.5, -2.0, 0.25], None], embedding_type(dim)),
            "fingerprint": ["fa", "fb"],
            "size": pa.array([None, None], pa.int64()),
            "mtime": pa.array([None, None], pa.float64()),
            "error": [None, "bad"],
        }
    )
    assert old.schema.field("embedding").type != part_schema(dim).field("embedding").type
    Output(out).write_table_atomic(f"{out}/_parts/s/text-old.parquet", old)
    row = {"id": "c", "shard": "s", "branch": "text", "modality": "text", "status": STATUS_OK}
    write_parts(_encoded([{**row, "embedding": [7.0, 8.0, 9.0]}], dim), out, None, dim)
    assert commit_shard(out, "s", None, dim, {}) == {
        "shard": "s",
        "ok": 2,
        "errors": 1,
        "added": False,
    }
    got = pq.read_table(tmp_path / "out" / "s.parquet")
    assert got.column("id").to_pylist() == ["a", "c"]
    assert got.column("embedding").to_pylist() == [[1.5, -2.0, 0.25], [7.0, 8.0, 9.0]]


def test_output_started_by_another_model_is_refused(tmp_path):
    corpus = files_corpus(Writer(str(tmp_path)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json").write_text(
        json.dumps({"key": {"input": corpus.input, "format": "files", "preset": "base"}})
    )
    cfg = load_config(None, {"input": corpus.input, "output": str(out), "preset": "tiny"})
    with pytest.raises(OutputMismatch, match="preset: 'base' -> 'tiny'"):
        run_job(cfg)
    assert not (out / LOCK_KEY).exists(), "the lock is released on refusal"


# ----------------------------------------------------------------------------- lock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_refuses_a_second_run_and_recovers_stale_locks(tmp_path):
    out = str(tmp_path / "out")
    with (
        OutputLock(out, ttl_s=60),
        pytest.raises(OutputLocked, match="being written by another run"),
    ):
        OutputLock(out, ttl_s=60).acquire()
    assert not os.path.exists(os.path.join(out, LOCK_KEY))
    # A lock left by a process of this host that is gone (kill -9): recovered at once.
    doc = {
        "host": socket.gethostname(),
        "pid": _dead_pid(),
        "pid_ns": os.readlink("/proc/self/ns/pid"),
        "expires_at": time.time() + 600,
    }
    with open(os.path.join(out, LOCK_KEY), "w") as f:
        json.dump(doc, f)
    with OutputLock(out, ttl_s=60) as lock:
        assert lock.etag is not None
    # A lock of another host whose lease expired: recovered; a live one: refused.
    for expires, ok in ((time.time() - 1, True), (time.time() + 600, False)):
        with open(os.path.join(out, LOCK_KEY), "w") as f:
            json.dump({"host": "elsewhere", "pid": 1, "expires_at": expires}, f)
        if ok:
            OutputLock(out, ttl_s=60).acquire().release()
        else:
            with pytest.raises(OutputLocked):
                OutputLock(out, ttl_s=60).acquire()
    # A lock file that is not a lock document (damaged, or JSON of another shape): recovered,
    # with a warning saying why, never a traceback on every rerun.
    for junk in (b"", b"}{", b"null", b"[1]", b'{"host": "elsewhere", "expires_at": "soon"}'):
        with open(os.path.join(out, LOCK_KEY), "wb") as f:
            f.write(junk)
        OutputLock(out, ttl_s=60).acquire().release()


def test_lock_on_s3(s3_server):
    bucket = s3_server.create_bucket(f"lock-{uuid.uuid4().hex[:6]}")
    out = f"s3://{bucket}/out"
    with OutputLock(out, s3_server.storage_options, ttl_s=60), pytest.raises(OutputLocked):
        OutputLock(out, s3_server.storage_options, ttl_s=60).acquire()
    OutputLock(out, s3_server.storage_options, ttl_s=60).acquire().release()


def test_images_travel_compact_and_embed_as_the_full_input():
    """The preprocessing stage hands still images on as uint8 pixels (a quarter of the bytes
    through the object store); the encoder stage expands them into exactly the model input."""
    import media
    import torch

    import imagebind_core as ibc
    from pipelines.rows import ITEM_SCHEMA, STATUS_OK
    from pipelines.stages import EncodeBatch, batch_arrays, preprocess_batch

    images = [media.make_image("JPEG", (320 + 16 * i, 240), seed=i) for i in range(3)]
    rows = {f.name: [None] * 3 for f in ITEM_SCHEMA}
    rows.update(
        id=["a", "b", "c"],
        modality=["vision"] * 3,
        status=[STATUS_OK] * 3,
        data=images,
        fingerprint=["x"] * 3,
    )
    pre = preprocess_batch(pa.table(rows, schema=ITEM_SCHEMA))
    ((idx, x),) = batch_arrays(pre, range(3))
    assert idx == [0, 1, 2] and x.dtype == "uint8" and x.shape == (3, 3, 224, 224)
    model = ibc.build_model("tiny", ["vision"])
    got = EncodeBatch("vision", model=model)(pre)
    want = model.encode(
        "vision", torch.stack([ibc.preprocess("vision", d) for d in images]), normalize=True
    )
    emb = np.array(got.column("embedding").to_pylist(), np.float32)
    np.testing.assert_array_equal(emb, want.numpy())


def test_texts_leave_preprocessing_sorted_by_length_and_embed_as_in_file_order():
    """Texts of one block reach the encoder shortest first, so its batches run short (the
    model drops padding after a batch's longest text); each row's embedding is unchanged."""

    import imagebind_core as ibc
    from pipelines.rows import ITEM_SCHEMA, STATUS_ERROR, STATUS_OK
    from pipelines.stages import EncodeBatch, preprocess_batch

    words = ["a", "dog", "runs", "over", "the", "bright", "city", "under", "a", "dark", "sky"]
    texts = [" ".join(words[: 1 + (7 * i) % 11]) for i in range(12)]
    n = len(texts) + 1
    rows = {f.name: [None] * n for f in ITEM_SCHEMA}
    rows.update(
        id=[f"t{i:02d}" for i in range(n)],
        modality=["text"] * n,
        status=[STATUS_OK] * len(texts) + [STATUS_ERROR],
        error=[None] * len(texts) + ["rejected while reading"],
        data=[t.encode() for t in texts] + [None],
        fingerprint=["x"] * n,
    )
    pre = preprocess_batch(pa.table(rows, schema=ITEM_SCHEMA))
    assert sorted(pre.column("id").to_pylist()) == rows["id"]  # every row, once
    ok = pre.filter(pa.compute.equal(pre.column("status"), STATUS_OK))
    lengths = [shape[0] for shape in ok.column("tensor_shape").to_pylist()]
    assert lengths == sorted(lengths) and len(set(lengths)) > 5, lengths

    model = ibc.build_model("tiny", ["text"])
    got = EncodeBatch("text", model=model)(pre)
    by_id = dict(
        zip(got.column("id").to_pylist(), got.column("embedding").to_pylist(), strict=True)
    )
    want = model.encode(
        "text", ibc.collate([ibc.preprocess("text", t) for t in texts]), normalize=True
    )
    for i, w in enumerate(want.numpy()):
        assert_embeddings_close(by_id[f"t{i:02d}"], w)
    assert by_id[f"t{n - 1:02d}"] is None  # the error row passed through


def test_a_block_larger_than_the_model_batch_is_encoded_in_model_batches():
    """The encoder actor takes a whole preprocessed block and cuts it into model batches of
    `batch_size` rows (in the block's order: texts sorted by length), each only as wide as its
    longest text; the embeddings equal one batch over the whole block."""
    import imagebind_core as ibc
    from pipelines.rows import ITEM_SCHEMA, STATUS_OK
    from pipelines.stages import EncodeBatch, model_batches, preprocess_batch

    words = ["a", "dog", "runs", "over", "the", "bright", "city", "under", "a", "dark", "sky"]
    texts = [" ".join(words[: 1 + (5 * i) % 11] * (1 + i % 3)) for i in range(11)]
    n = len(texts)
    rows = {f.name: [None] * n for f in ITEM_SCHEMA}
    rows.update(
        id=[f"t{i:02d}" for i in range(n)],
        modality=["text"] * n,
        status=[STATUS_OK] * n,
        data=[t.encode() for t in texts],
        fingerprint=["x"] * n,
    )
    pre = preprocess_batch(pa.table(rows, schema=ITEM_SCHEMA))
    model = ibc.build_model("tiny", ["text"])
    calls: list[tuple[int, int]] = []
    encode = model.encode

    def spy(modality, x, **kw):
        calls.append(tuple(x.shape))
        return encode(modality, x, **kw)

    model.encode = spy
    got = EncodeBatch("text", model=model, batch_size=4)(pre)
    assert [b for b, _ in calls] == [4, 4, 3], calls
    widths = [w for _, w in calls]
    assert widths == sorted(widths) and widths[0] < widths[-1], widths  # each batch trimmed
    model.encode = encode
    whole = EncodeBatch("text", model=model)(pre)
    assert got.column("id").to_pylist() == whole.column("id").to_pylist()
    for a, b in zip(
        got.column("embedding").to_pylist(), whole.column("embedding").to_pylist(), strict=True
    ):
        assert_embeddings_close(a, b)
    # The cut itself: views in order, no row lost, non-integer inputs never trimmed.
    x = np.zeros((5, 3, 2, 2), np.float32)
    parts = model_batches([([0, 1, 2, 3, 4], x)], 2)
    assert [idx for idx, _ in parts] == [[0, 1], [2, 3], [4]]
    assert all(p.shape[1:] == (3, 2, 2) for _, p in parts)
    assert model_batches([([0], x[:1])], None)[0][1] is not None


def test_job_drops_only_rays_high_memory_detector():
    """Ray Data's high-memory detector misreads reused workers' RSS (torch loaded by an earlier
    preprocessing task) and repeats a wrong advice every 30 s; the job turns off that one."""
    from ray.data import DataContext
    from ray.data._internal.issue_detection.detectors import HighMemoryIssueDetector

    from pipelines.embed import _quiet_issue_detectors

    default = DataContext.get_current().issue_detectors_config
    assert HighMemoryIssueDetector in default.detectors  # else this change is moot
    quiet = _quiet_issue_detectors(default)
    assert HighMemoryIssueDetector not in quiet.detectors
    assert set(quiet.detectors) == set(default.detectors) - {HighMemoryIssueDetector}
    assert HighMemoryIssueDetector in default.detectors  # the caller's config is untouched


def test_parquet_files_store_embeddings_without_a_dictionary():
    # Parquet's default dictionary encoding hashes every float of an embedding column and
    # then falls back to plain pages (no two values repeat): ~4x the CPU of the whole write
    # and a larger file. Other columns keep the default; the file reads back unchanged.
    from pipelines.store import parquet_bytes

    n, dim = 64, 16
    v = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    table = pa.table(
        {
            "id": [f"id{i % 8}" for i in range(n)],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim),
        },
        schema=pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))]),
    )
    data = parquet_bytes(table)
    assert pq.read_table(pa.BufferReader(data)).equals(table)
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata.row_group(0)
    cols = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i) for i in range(2)}
    assert not cols["embedding"].has_dictionary_page
    assert cols["id"].has_dictionary_page
    assert cols["embedding"].compression == "ZSTD"


# ----------------------------------------------------------------------------- input paths


def test_list_input_follows_links_out_of_the_folder_and_names_what_it_skips(tmp_path, caplog):
    """Links to files and folders outside the input are listed under the link's name (each
    real folder once: a loop ends); a link into the input is not listed twice; a link to
    nothing and a name that is not UTF-8 are skipped with a warning naming them."""
    outside = tmp_path / "elsewhere"
    (outside / "sub").mkdir(parents=True)
    (outside / "pic.jpg").write_bytes(b"a")
    (outside / "sub" / "cap.txt").write_text("a dog")
    (outside / "sub" / "back").symlink_to(outside)  # a loop
    d = tmp_path / "in"
    d.mkdir()
    (d / "own.txt").write_text("mine")
    (d / "file-link.jpg").symlink_to(outside / "pic.jpg")
    (d / "folder-link").symlink_to(outside / "sub")
    (d / "inner-link.txt").symlink_to(d / "own.txt")  # its target is listed as own.txt
    (d / "nowhere.txt").symlink_to(tmp_path / "missing.txt")
    (d / "nowhere-inside.txt").symlink_to(d / "missing.txt")  # was dropped without a word
    os.close(os.open(os.path.join(os.fsencode(d), b"caf\xe9.txt"), os.O_CREAT | os.O_WRONLY))
    os.mkfifo(d / "pipe.txt")  # opening it would wait for a writer
    (d / "device.txt").symlink_to("/dev/zero")
    with caplog.at_level("WARNING", logger="pipelines.plan"):
        got = list_input(str(d))
    # pic.jpg is reached again through the loop (folder-link/back/pic.jpg): listed once
    assert [s.rel for s in got] == ["file-link.jpg", "folder-link/cap.txt", "own.txt"]
    by = {s.rel: s for s in got}
    assert by["file-link.jpg"].size == 1 and by["folder-link/cap.txt"].size == 5
    assert by["file-link.jpg"].uri == str(d / "file-link.jpg")
    warned = caplog.text
    assert "5 entries skipped" in warned and "nowhere.txt (a link to nothing" in warned
    assert "pipe.txt (not a regular file)" in warned
    assert "device.txt (not a regular file)" in warned
    assert "nowhere-inside.txt (a link to nothing" in warned
    assert "caf\\\\xe9.txt (its name is not UTF-8)" in warned
    # A folder of links only is listed, not "no input files found".
    only = tmp_path / "links"
    only.mkdir()
    (only / "a.jpg").symlink_to(outside / "pic.jpg")
    assert [s.rel for s in list_input(str(only))] == ["a.jpg"]


def test_input_and_output_paths_that_nest_or_collide(tmp_path):
    from pipelines.config import read_config_file
    from pipelines.plan import check_folder

    proj = tmp_path / "proj"
    (proj / "raw").mkdir(parents=True)
    (proj / "raw" / "a.txt").write_text("a")
    (proj / "b.txt").write_text("b")
    # an input inside the output is listed; an output inside the input is skipped
    assert [s.rel for s in list_input(str(proj / "raw"), exclude=str(proj))] == ["a.txt"]
    (proj / "raw" / "out").mkdir()
    (proj / "raw" / "out" / "c.txt").write_text("c")
    got = list_input(str(proj / "raw"), exclude=str(proj / "raw" / "out"))
    assert [s.rel for s in got] == ["a.txt"]
    with pytest.raises(PlanError, match="is the input"):
        list_input(str(proj), exclude=str(proj) + "/")
    # where a run writes must be a folder, or not exist yet
    check_folder(str(proj / "new" / "deeper"), "output")
    check_folder(str(proj), "index root")
    with pytest.raises(PlanError, match=r"^output .*b\.txt is an existing file"):
        check_folder(str(proj / "b.txt"), "output")
    with pytest.raises(PlanError, match=r"^index root .*/sub: .*b\.txt is a file, not a folder"):
        check_folder(str(proj / "b.txt" / "sub"), "index root")
    with pytest.raises(ConfigError, match="not a YAML config file"):
        read_config_file(str(proj))


def test_removing_a_shards_parts_also_removes_a_killed_writers_temporary(tmp_path):
    """A writer killed mid-write (an interrupted run) leaves its hidden temporary file beside
    the parts; once the shard is committed its parts folder and `_parts/` still go."""
    out = Output(str(tmp_path / "o"))
    shard_dir = tmp_path / "o" / "_parts" / "s"
    nested = tmp_path / "o" / "_parts" / "s" / "t"  # shard "s/t": not shard "s"'s to remove
    nested.mkdir(parents=True)
    (shard_dir / "p0.parquet").write_bytes(b"x")
    (shard_dir / ".p1.parquet.0a1b.tmp").write_bytes(b"half")
    (nested / "q.parquet").write_bytes(b"y")
    out.rm_parts("s")
    assert sorted(os.listdir(shard_dir)) == ["t"] and os.listdir(nested) == ["q.parquet"]
    out.rm_parts("s/t")
    out.prune_parts_dir()
    assert not (tmp_path / "o" / "_parts").exists()


def test_a_tar_cut_short_in_a_payload_lists_what_the_job_reads(tmp_path):
    # Listing seeks over payloads; the job reads them. A member whose payload the file cuts
    # short was listed, but the job could not read it (the shard is unreadable from there on):
    # a re-index saw it as new on every run. Both now stop before it.
    import io

    from pipelines.formats import tar_rows

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in ("a.jpg", "b.jpg", "c.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 5000
            tf.addfile(info, io.BytesIO(bytes(5000)))
    path = tmp_path / "t.tar"
    path.write_bytes(buf.getvalue()[: 512 + 5120 + 512 + 2000])  # inside b.jpg's payload
    got = {}
    for read in (False, True):
        rows = tar_rows("t", str(path), "fp", ["vision"], None, {}, read=read)
        got[read] = [(r["id"], r["status"]) for r in rows]
    assert got[False] == got[True] == [("t#a.jpg", "ok"), ("t#unreadable-vision", "error")]


def test_link_members_of_a_tar_are_error_rows_not_dropped(tmp_path):
    # A symbolic or hard link member with a media suffix was skipped (`not m.isfile()`): in
    # neither the output nor `_errors/`. Links are not followed; the item is an error row, the
    # same in the listing (a re-index counts it as a failure, not as new on every run).
    import io

    from pipelines.formats import tar_rows

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("a.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"one"))
        for name, kind in (("b.txt", tarfile.SYMTYPE), ("c.txt", tarfile.LNKTYPE)):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "a.txt"
            tf.addfile(link)
    path = tmp_path / "t.tar"
    path.write_bytes(buf.getvalue())
    for read in (False, True):
        rows = {r["id"]: r for r in tar_rows("t", str(path), "fp", ["text"], None, {}, read=read)}
        assert sorted(rows) == ["t#a.txt", "t#b.txt", "t#c.txt"]
        assert rows["t#a.txt"]["status"] == "ok"
        assert rows["t#b.txt"]["status"] == rows["t#c.txt"]["status"] == "error"
        assert (
            rows["t#b.txt"]["error"]
            == "tar member 'b.txt' is a symbolic link to 'a.txt', not a file"
        )
        assert "'c.txt' is a hard link to 'a.txt'" in rows["t#c.txt"]["error"]


def test_an_input_that_overflows_the_model_is_an_error_row_not_a_nan_vector():
    """An IMU recording of finite but huge values (1e30) makes the model's arithmetic overflow:
    the row becomes an error row with the same reason the endpoint gives, the others embed."""
    import io

    import imagebind_core as ibc
    from pipelines.rows import ITEM_SCHEMA, STATUS_ERROR, STATUS_OK
    from pipelines.stages import EncodeBatch, preprocess_batch

    def npy(value: float) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.full((6, 200), value, np.float32))
        return buf.getvalue()

    rows = {f.name: [None] * 3 for f in ITEM_SCHEMA}
    rows.update(
        id=["small", "huge", "other"],
        modality=["imu"] * 3,
        status=[STATUS_OK] * 3,
        data=[npy(0.5), npy(1e30), npy(-2.0)],
        fingerprint=["x"] * 3,
    )
    pre = preprocess_batch(pa.table(rows, schema=ITEM_SCHEMA))
    got = EncodeBatch("imu", model=ibc.build_model("tiny", ["imu"]))(pre).to_pylist()
    by_id = {r["id"]: r for r in got}
    assert by_id["huge"]["status"] == STATUS_ERROR and by_id["huge"]["embedding"] is None
    assert by_id["huge"]["error"] == ibc.overflow_reason("float32")
    assert "too large" in by_id["huge"]["error"] and "float16" not in by_id["huge"]["error"]
    for i in ("small", "other"):
        assert by_id[i]["status"] == STATUS_OK and np.isfinite(by_id[i]["embedding"]).all()
