"""CPU time per image of each stage function of the job, in one process without Ray.

The job's image stages as it runs them with GPU-sized blocks (`bench_pipeline`'s null-encoder
settings): read_tasks over each shard of a files corpus of 640x480 JPEGs (tables of the
preprocessing block size), preprocess_batch on each block, the null-encoder EncodeBatch, and
write_parts; beside them the bare loop (`bench_pipeline.bare_preprocess`: read the file and
`preprocess("vision", ..., compact=True)`). Prints one JSON line of milliseconds of CPU per
image. What Ray adds on top is in `bench_pipeline.py --null-encoder`; the text counterpart is
`bench_text_stages.py`.

    python benchmarks/bench_image_stages.py [images]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())
sys.path.insert(0, "benchmarks")
import bench_pipeline as bp
import pyarrow as pa
import torch

from pipelines.plan import plan_job, shard_tasks
from pipelines.readers import read_tasks
from pipelines.rows import STATUS_EOS
from pipelines.stages import EncodeBatch, preprocess_batch
from pipelines.writers import write_parts

torch.set_num_threads(1)  # as in a Ray worker with one logical CPU
_p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
_p.add_argument("images", type=int, nargs="?", default=1024, help="JPEGs in the corpus")
N = _p.parse_args().images
tmp = tempfile.mkdtemp()
try:
    folder = bp.make_corpus(tmp, N, 0)["vision"]
    out = f"{tmp}/out"
    cfg = bp.null_config("vision", folder, out, "files")
    plan = plan_job(cfg)
    block = cfg.preprocess_batch("vision")
    enc = EncodeBatch(
        "vision",
        cfg.model_spec("vision"),
        null_encoder=True,
        batch_size=cfg.encoder("vision").batch_size,
    )
    n, bare_cpu, _ = bp.bare_preprocess("vision", folder, N)
    tot = {"read": 0.0, "pre": 0.0, "enc": 0.0, "write": 0.0}
    items = 0
    for task in shard_tasks(plan, cfg, plan.shards)["vision"]:
        c = time.process_time()
        blocks = list(read_tasks(pa.table({"task": [task["task"]]}), out, None, None, block))
        tot["read"] += time.process_time() - c
        for b in blocks:
            c = time.process_time()
            p = preprocess_batch(b, read_threads=cfg.preprocess.read_threads)
            tot["pre"] += time.process_time() - c
            c = time.process_time()
            e = enc(p)
            tot["enc"] += time.process_time() - c
            c = time.process_time()
            write_parts(e, out, None, enc.dim)
            tot["write"] += time.process_time() - c
            items += sum(st != STATUS_EOS for st in b.column("status").to_pylist())
    r = {k: round(v / items * 1e3, 3) for k, v in tot.items()}
    stages = sum(tot.values()) / items * 1e3
    print(
        json.dumps(
            {
                "block": block,
                "images": items,
                "bare": round(bare_cpu / n * 1e3, 3),
                **r,
                "stages_over_bare": round(stages / (bare_cpu / n * 1e3), 3),
            }
        )
    )
finally:
    shutil.rmtree(tmp, ignore_errors=True)
