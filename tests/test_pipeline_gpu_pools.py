"""Encoder pools on GPUs, proven with Ray's logical GPUs on a machine without any.

A separate Ray instance (a subprocess: the session's Ray has no GPUs and a process holds one
Ray) is started with 2 logical GPUs; a mixed corpus (images + sounds) is embedded with
`encoder_defaults.num_gpus: 1` and `device: cpu` (each actor holds its GPU share, the model
stays on the CPU). Every image actor holds one GPU of its own; the sound actors ask for half
a GPU each and share one; together the pools take both GPUs from the start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import defaultdict

import media
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from pipelines.config import load_config
    from pipelines.embed import run_job

    inp, out, trace = sys.argv[1:4]
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, log_to_driver=False)
    cfg = load_config(None, {
        "input": inp, "output": out, "preset": "tiny", "ray.progress_bars": False,
        "encoder_defaults.num_gpus": 1, "encoder_defaults.device": "cpu",
        "encoder_defaults.num_cpus": 0.5, "encoders.audio.num_gpus": 0.5,
        "preprocess.num_cpus": 0.5, "preprocess.batch_size": 2,
        "encoder_defaults.batch_size": 2, "debug.actor_trace_path": trace,
    })
    summary = run_job(cfg)
    print("SUMMARY " + json.dumps(summary.to_dict()))
    """
)


def test_pools_hold_whole_gpus_for_images_and_share_one_for_sounds(tmp_path):
    inp = tmp_path / "in"
    (inp / "img").mkdir(parents=True)
    (inp / "snd").mkdir()
    for i in range(6):
        (inp / "img" / f"p{i}.jpg").write_bytes(media.make_image("JPEG", (64, 48), seed=i))
    for i in range(4):
        (inp / "snd" / f"s{i}.wav").write_bytes(media.make_wav(0.5, 16000, 1, seed=i))
    trace = tmp_path / "actors.txt"
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(script), str(inp), str(tmp_path / "out"), str(trace)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")][-1]
    summary = json.loads(line.removeprefix("SUMMARY "))
    assert summary["kinds"]["vision"]["embedded"] == 6
    assert summary["kinds"]["audio"]["embedded"] == 4

    gpus: dict[str, list[str]] = defaultdict(list)
    for ln in trace.read_text().splitlines():
        _pid, kind, ids = ln.split()
        gpus[kind].append(ids)
    # vision: 1 actor on a GPU of its own at the start (it may grow when audio finishes)
    assert gpus["vision"] and all(len(ids.split(",")) == 1 for ids in gpus["vision"])
    # audio: 2 actors of half a GPU each, packed on one GPU
    assert len(gpus["audio"]) >= 2
    assert len(set(gpus["audio"][:2])) == 1, gpus
    assert set(gpus["audio"][:2]).isdisjoint(gpus["vision"][:1]), gpus
    # the model ran on the CPU although the actors hold GPUs
    files = sorted((tmp_path / "out").glob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 10 and all(r["embedding"] is not None for r in rows)
