"""The README's main-job command: `make demo` generates the demo corpus and runs
`imagebind-embed --config configs/demo.yaml`; here the same config runs end to end (paths
redirected into a temporary folder), then a rerun finds nothing to do."""

from __future__ import annotations

import json
import os
import re

import yaml
from helpers.pipeline import read_output

from pipelines.cli import embed_main as main
from pipelines.demo_corpus import demo_files, write_demo_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "demo.yaml")


def test_make_demo_runs_this_config():
    with open(os.path.join(ROOT, "Makefile")) as f:
        recipe = re.search(r"^demo:.*?\n((?:\t.*\n)+)", f.read(), re.M).group(1)
    with open(CONFIG) as f:
        cfg = yaml.safe_load(f)
    assert f"pipelines.demo_corpus {cfg['input']}" in recipe
    assert "imagebind-embed --config configs/demo.yaml" in recipe
    assert cfg["preset"] == "tiny" and cfg.get("checkpoint") is None


def test_demo_corpus_is_deterministic(tmp_path):
    paths = write_demo_corpus(str(tmp_path))
    mtimes = {p: os.path.getmtime(p) for p in paths}
    assert write_demo_corpus(str(tmp_path)) == paths
    assert {p: os.path.getmtime(p) for p in paths} == mtimes, "unchanged files are not rewritten"
    assert demo_files() == demo_files()


def test_demo_config_end_to_end(tmp_path, ray_session, capsys):
    corpus, out = str(tmp_path / "corpus"), str(tmp_path / "embeddings")
    write_demo_corpus(corpus)
    argv = ["--config", CONFIG, "--input", corpus, "--output", out, "--no-progress", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    kinds = {"vision": 4, "text": 4, "audio": 1}
    assert {k: v["embedded"] for k, v in summary["kinds"].items()} == kinds
    assert all(v["errors"] == 0 for v in summary["kinds"].values())
    emb, err, files = read_output(out)
    assert emb.num_rows == sum(kinds.values()) and err.num_rows == 0
    assert sorted(emb.column("id").to_pylist()) == sorted(demo_files())
    assert len(files) == summary["shards_total"]
    # The same command again: every shard is committed, nothing runs.
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["shards_committed"] == 0 and again["kinds"] == {}
