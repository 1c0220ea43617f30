"""Crash and resume: the CLI killed from outside (SIGKILL to its process group, nothing the code
can catch) in the middle of a run, then rerun with the same command: every item ends up exactly
once (embeddings or _errors), and work committed before the kill is not recomputed — proven
with the job's trace file (one line per item preprocessed, per run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml
from helpers.pipeline import read_output

from pipelines.cli import embed_main as main

N_SHARDS = 10
PER_SHARD = 3


def _committed(out: str) -> dict[str, float]:
    """Committed shard files -> mtime."""
    found = {}
    for name in os.listdir(out) if os.path.isdir(out) else []:
        if name.endswith(".parquet") and not name.startswith(("_", ".")):
            found[name] = os.path.getmtime(os.path.join(out, name))
    return found


def _ids_in(paths: list[str]) -> set[str]:
    ids: set[str] = set()
    for p in paths:
        ids.update(pq.read_table(p, columns=["id"]).column("id").to_pylist())
    return ids


def _trace(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.split(" ", 1)[1].strip() for line in f if line.strip()]


@pytest.mark.slow
def test_kill_and_resume(tmp_path, ray_session):
    corpus = tmp_path / "manifests"
    corpus.mkdir()
    all_ids = set()
    for s in range(N_SHARDS):
        rows = ["id,modality,text"]
        for i in range(PER_SHARD):
            rows.append(f"s{s}-{i},text,caption {i} of shard {s}")
            all_ids.add(f"s{s}-{i}")
        if s == 3:  # one bad row: must end in _errors, exactly once, across the crash too
            rows.append("s3-bad,smell,not a modality")
            all_ids.add("s3-bad")
        (corpus / f"shard-{s:02d}.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "input": str(corpus),
                "output": str(out),
                "preset": "tiny",
                # One item at a time, slowly, so the kill lands mid-way.
                "preprocess": {"num_cpus": 1.0, "batch_size": 1, "read_num_cpus": 0.25},
                "encoder_defaults": {"num_cpus": 0.25, "batch_size": 2},
                "ray": {"num_cpus": 2, "progress_bars": False},
                "debug": {"trace_path": str(tmp_path / "trace1.txt"), "delay_per_item_s": 0.4},
            }
        )
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.embed",
            "--config",
            str(cfg_path),
            "--ray-address",
            "local",
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill reaches Ray's processes too
    )
    try:
        deadline = time.time() + 240
        while len(_committed(str(out))) < 2:
            if proc.poll() is not None:
                pytest.fail(f"the job ended before it was killed: {proc.stderr.read()[-3000:]!r}")
            if time.time() > deadline:
                pytest.fail("no shard was committed within 240 s")
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    time.sleep(0.5)
    before = _committed(str(out))
    assert 2 <= len(before) < N_SHARDS, f"kill did not land mid-way: {sorted(before)}"
    committed_ids = _ids_in([str(out / n) for n in before])
    errors_dir = out / "_errors"
    if errors_dir.exists():
        committed_ids |= _ids_in([str(errors_dir / n) for n in os.listdir(errors_dir)])
    parts = [
        os.path.join(d, f)
        for d, _, fs in os.walk(out / "_parts")
        for f in fs
        if f.endswith(".parquet") and not f.startswith(".")
    ]
    parts_ids = _ids_in(parts)
    first_run = set(_trace(str(tmp_path / "trace1.txt")))
    assert committed_ids <= first_run | {"s3-bad"}

    # The same command again (in this process: the Ray of the test session), no delay.
    trace2 = tmp_path / "trace2.txt"
    rc = main(
        [
            "--config",
            str(cfg_path),
            "--no-progress",
            "--set",
            f"debug.trace_path={trace2}",
            "--set",
            "debug.delay_per_item_s=0",
        ]
    )
    assert rc == 0
    second_run = _trace(str(tmp_path / "trace2.txt"))

    emb, err, _ = read_output(str(out))
    ids = emb.column("id").to_pylist() + err.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an item is present twice"
    assert set(ids) == all_ids
    assert err.column("id").to_pylist() == ["s3-bad"]
    # Completed work is not recomputed: nothing committed (or already in a part) before the
    # kill was preprocessed again, and each item was preprocessed at most once by the rerun.
    assert not (set(second_run) & (committed_ids | parts_ids))
    assert len(second_run) == len(set(second_run))
    assert set(second_run) | first_run >= all_ids - {"s3-bad"}
    # Committed files were not rewritten.
    after = _committed(str(out))
    assert {n: after[n] for n in before} == before
    assert not os.path.exists(out / "_lock")
