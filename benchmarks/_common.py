"""Pieces the benchmark scripts share: a free local port, a measurement in a fresh process, and
the results file (`--json`) that records the command beside its figures."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from typing import Any

# The checkout this file is in. Every benchmark imports its packages from here, not from the
# copy the virtualenv has installed (an editable install points at one checkout): a baseline
# in a git worktree then measures its own code, in this process and in the workers of a local
# Ray it starts (they inherit PYTHONPATH).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path[:2]:
    sys.path.insert(0, ROOT)
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != ROOT:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd` (one measurement in a fresh process, so its peak memory is its own; `env`:
    its environment, default this one's) and return the JSON object its last line of output
    holds."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(out.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    sys.stderr.write(out.stderr[-4000:])
    raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode} without a JSON line")


def tree_bytes(root: str) -> dict[str, int]:
    """The files under `root` (paths) and their sizes in bytes."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[p] = os.path.getsize(p)
    return out


def key_value(text: str) -> tuple[str, str]:
    """An argparse type: "KEY=VALUE" -> (KEY, VALUE); anything else is refused with its text."""
    key, eq, value = text.partition("=")
    if not (key and eq):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def write_results(path: str | None, results: Any, key: str = "results") -> None:
    """Write `{"command": <this command line>, key: results}` to `path` (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump({"command": " ".join(sys.argv), key: results}, f, indent=2)


def add_table_args(p: argparse.ArgumentParser, sizes: list[int], workdir: str) -> None:
    """The options of the benchmarks over a synthetic embeddings table: `--sizes` (rows),
    `--dim`, `--changed` (rows changed), `--workdir`, `--json`."""
    p.add_argument("--sizes", type=int, nargs="+", default=sizes)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--changed", type=int, default=1000)
    p.add_argument("--workdir", default=workdir)
    p.add_argument("--json", help="also write the results here")


def null_encoder_settings(kind: str) -> dict[str, Any]:
    """`--set` overrides of a job whose `kind` encoders run no model, batched as on a GPU
    (one actor): the pipeline's own ceiling (bench_pipeline --null-encoder, bench_warmup)."""
    from pipelines.config import DEFAULT_ENCODER_BATCH_GPU, DEFAULT_PREPROCESS_BATCH_GPU

    return {
        "preset": "tiny",
        "ray.progress_bars": False,
        "debug.null_encoder": True,
        "encoder_defaults.min_actors": 1,
        "encoder_defaults.max_actors": 1,
        "encoder_defaults.batch_size": DEFAULT_ENCODER_BATCH_GPU[kind],
        "preprocess.batch_size": DEFAULT_PREPROCESS_BATCH_GPU[kind],
    }


def status_kb(field: str) -> int:
    """A field of this process's /proc/self/status in KiB (e.g. "VmRSS", "VmHWM")."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)
