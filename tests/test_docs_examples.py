"""README.md's and docs/*.md's shell and Python examples, run as written.

Every fenced `bash`/`sh`/`python` block is either run (`RUN`, in that order: later blocks use
what earlier ones made, e.g. the demo corpus and its embeddings) or listed in `NOT_RUN` with
the reason; a command inside a run block that cannot run here is listed in `SKIPPED_COMMANDS`.
A new block fails `test_every_example_is_run_or_listed` until it is put in one of them.

The blocks run in a scratch folder that looks like a checkout after `make setup`: `configs/`
is the repository's, `.venv/bin/` and `PATH` hold `python`, `imagebind-embed` and
`imagebind-reindex` of the interpreter running the tests.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
from logcheck import alarming_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}

# The blocks run, in order, each named by (file, a string only that block contains).
RUN: list[tuple[str, str]] = [
    ("docs/pipelines.md", "python -m pipelines.demo_corpus demo-output/corpus          #"),
    ("README.md", "# offline job (local folder or s3:// in"),
    ("README.md", 'ds.dataset("demo-output/embeddings"'),
    ("docs/reindex.md", "# laptop: local Ray, local folders, tiny random weights"),
    ("docs/reindex.md", 'root = "demo-output/index"'),
]

# Blocks not run: (file, a string the block contains) -> why.
NOT_RUN: dict[tuple[str, str], str] = {
    ("README.md", "make demo   # from nothing"): "builds a venv from nothing (minutes, PyPI); "
    "docs/pipelines.md's block runs the two commands `make demo` runs",
    ("README.md", "ibc.load_model("): "needs the published huge checkpoint on S3 and a dog.jpg",
    ("docs/pipelines.md", "TRUST='{"): "creates AWS IAM roles (a cloud account)",
    ("docs/pipelines.md", "aws ssm get-parameter"): "queries AWS (a cloud account)",
    ("docs/pipelines.md", "ray up cluster.yaml"): "starts an AWS cluster",
    ("docs/pipelines.md", "from pipelines.config import load_config"): "a library sketch: "
    "job.yaml on S3 and `changed_mask` are the reader's",
    ("docs/preprocessing.md", "import imagebind_core as ibc"): "needs a dog.jpg and a loaded "
    "`model` (README's load_model example, the published checkpoint)",
    ("docs/reindex.md", "docker build -f deploy/Dockerfile"): "builds and pushes a container "
    "image to a registry",
    ("docs/reindex.md", "ray up cluster.yaml"): "starts an AWS cluster",
    ("docs/reindex.md", "bench_reindex.py"): "a benchmark (minutes); its figures are in "
    "benchmarks/results/",
    ("docs/reindex.md", "benchmarks/bench_search.py --n 100000"): "a benchmark (minutes, "
    "100,000 vectors)",
    ("docs/reindex.md", "update_index(\n    out_uri,"): "a signature sketch of the interface "
    "with the re-index job; tests/test_search_shards.py calls update_index",
    ("docs/reindex.md", "/tmp/bench_ivfflat.py"): "a benchmark of the IVF-Flat script at commit "
    "4b26d1d (minutes, 100,000 vectors)",
    ("docs/reindex.md", ".venv/bin/pytest -q tests/test_reindex.py"): "the tests themselves",
    ("docs/serve.md", "# Laptop (2 cores is enough)"): "starts a long-running Serve app in the "
    "foreground (`serve run`); tests/test_serve_cli.py starts the same app",
    ("docs/serve.md", "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 serve run"): "a long-running Serve app",
    ("docs/serve.md", "RAY_SERVE_PROXY_USE_GRPC=1 serve run"): "a long-running Serve app",
    ("docs/serve.md", "curl -s localhost:8000/v1/embeddings"): "run as written against `serve "
    "run serve.app:app preset=tiny` by tests/test_serve_ux.py::"
    "test_serve_run_answers_every_documented_curl_example",
    ("docs/serve.md", ".venv/bin/python -m pipelines.demo_corpus demo-output/corpus"): "starts "
    "the search page's long-running Serve app; tests/test_search_page_browser.py drives the page "
    "over the same demo index",
    ("docs/serve.md", "from openai import OpenAI"): "needs a running Serve app; "
    "tests/test_serve_app.py runs the OpenAI client against one",
    ("docs/serve.md", ".venv/bin/pytest tests/test_serve_app.py"): "the tests themselves",
    ("docs/serve.md", "bench_serve.py"): "a benchmark (minutes)",
}

# Commands inside run blocks that are not run: (file, the command's start) -> why.
SKIPPED_COMMANDS: dict[tuple[str, str], str] = {
    ("docs/pipelines.md", "make demo"): "builds a venv from nothing; the block's next two "
    "lines are what it runs",
    ("README.md", ".venv/bin/imagebind-embed --input s3://"): "needs S3 and the huge checkpoint",
    ("README.md", ".venv/bin/serve run"): "a long-running Serve app (tests/test_serve_cli.py)",
    ("README.md", "curl -s localhost:8000"): "run as written against `serve run serve.app:app "
    "preset=tiny` by tests/test_serve_ux.py::test_serve_run_answers_every_documented_curl_example",
    ("docs/reindex.md", "imagebind-reindex --config reindex.yaml"): "the cluster form: "
    "reindex.yaml is the reader's config for their store",
}


@dataclass(frozen=True)
class Block:
    file: str
    line: int
    lang: str  # "bash" or "python"
    text: str


def blocks() -> list[Block]:
    """The fenced shell and Python blocks of README.md and docs/*.md."""
    out = []
    for rel in DOCS:
        with open(os.path.join(ROOT, rel)) as f:
            lines = f.read().split("\n")
        i = 0
        while i < len(lines):
            m = re.match(r"^\s*```(\S*)\s*$", lines[i])
            if not m:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if re.match(r"^\s*```\s*$", lines[j]))
            if m.group(1) in LANGS:
                out.append(Block(rel, i + 1, LANGS[m.group(1)], "\n".join(lines[i + 1 : end])))
            i = end + 1
    return out


def _find(all_blocks: list[Block], file: str, marker: str) -> list[Block]:
    return [b for b in all_blocks if b.file == file and marker in b.text]


def commands(text: str) -> list[str]:
    """A shell block's commands, continuation lines joined, comments and blank lines dropped."""
    out, cur = [], ""
    for line in text.split("\n"):
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        cmd = cur.strip()
        cur = ""
        if cmd and not cmd.startswith("#"):
            out.append(cmd)
    return out


def test_every_example_is_run_or_listed():
    found = blocks()
    named: dict[Block, str] = {}
    for file, marker in [*RUN, *NOT_RUN]:
        hits = _find(found, file, marker)
        assert len(hits) == 1, f"{file}: {marker!r} names {len(hits)} blocks, not one"
        assert hits[0] not in named, f"{file}:{hits[0].line} is listed twice"
        named[hits[0]] = marker
    unlisted = [f"{b.file}:{b.line}" for b in found if b not in named]
    assert not unlisted, f"run these examples or list them in NOT_RUN with a reason: {unlisted}"
    run_cmds = {(b.file, c) for b in found for c in commands(b.text) if b.lang == "bash"}
    for file, start in SKIPPED_COMMANDS:
        assert any(f == file and c.startswith(start) for f, c in run_cmds), (file, start)


def _workspace(tmp_path) -> tuple[str, dict[str, str]]:
    ws = tmp_path / "checkout"
    (ws / ".venv" / "bin").mkdir(parents=True)
    os.symlink(os.path.join(ROOT, "configs"), ws / "configs")
    shims = {
        "python": None,
        "imagebind-embed": "pipelines.embed",
        "imagebind-reindex": "pipelines.reindex",
    }
    for name, module in shims.items():
        exe = ws / ".venv" / "bin" / name
        run = f'-m {module} "$@"' if module else '"$@"'
        exe.write_text(f"#!/bin/sh\nexec {sys.executable} {run}\n")
        exe.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{ws / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": ROOT,
        "RAY_AUTH_MODE": "disabled",
    }
    return str(ws), env


def _script(block: Block) -> str:
    if block.lang == "python":
        return block.text
    kept = []
    for cmd in commands(block.text):
        if not any(f == block.file and cmd.startswith(s) for f, s in SKIPPED_COMMANDS):
            kept.append(cmd)
    return "set -euo pipefail\n" + "\n".join(kept) + "\n"


@pytest.mark.slow
def test_examples_run_as_written(tmp_path):
    ws, env = _workspace(tmp_path)
    found = blocks()
    outputs = {}
    for file, marker in RUN:
        (block,) = _find(found, file, marker)
        cmd = ["bash", "-c"] if block.lang == "bash" else [sys.executable, "-c"]
        res = subprocess.run(
            [*cmd, _script(block)], cwd=ws, env=env, capture_output=True, text=True, timeout=900
        )
        text = res.stdout + res.stderr
        assert res.returncode == 0, f"{file}:{block.line} failed:\n{text}"
        # A clean demo run and re-index log nothing at WARNING or above but random weights.
        assert alarming_lines(text) == [], f"{file}:{block.line}:\n{text}"
        outputs[(file, marker)] = text
    # What the examples say they do.
    assert "imagebind-embed: done" in outputs[RUN[0]]
    assert "shards:  3 (3 already committed, 0 to do)" in outputs[RUN[1]]
    assert "imagebind-reindex: published" in outputs[RUN[1]]
    assert "(9, 32)" in outputs[RUN[2]]
    assert outputs[RUN[3]].count("imagebind-reindex: unchanged") == 2
    read = re.search(r"version \S+: (\d+) rows, (\d+) in its record", outputs[RUN[4]])
    assert read and read.group(1) == read.group(2) != "0", outputs[RUN[4]]


def _doc_table(rel: str, header: str) -> dict[str, str]:
    """{first cell's `name`: second cell} of the markdown table under `header` in `rel`."""
    with open(os.path.join(ROOT, rel)) as f:
        lines = f.read().split("\n")
    start = lines.index(header) + 2  # past the header and its |---| line
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1]
    return rows


def test_the_index_settings_table_is_the_config_model():
    """docs/reindex.md's `index.` table names every field `IndexSettings` accepts, no other,
    and its numeric and boolean defaults are the model's."""
    from pipelines.config import IndexSettings

    table = _doc_table("docs/reindex.md", "| `index.` field | default | meaning |")
    assert set(table) == set(IndexSettings.model_fields)
    checked = 0
    for name, default in table.items():
        want = IndexSettings.model_fields[name].default
        if default in ("true", "false"):
            assert want is (default == "true"), name
        elif re.fullmatch(r"[0-9.]+", default):
            assert isinstance(want, int | float) and float(default) == want, name
        else:
            continue
        checked += 1
    assert checked >= 15  # most defaults are plain numbers or booleans
