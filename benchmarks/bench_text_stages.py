"""CPU time per caption of each text stage function, in one process without Ray.

read_shard_task on a 20 000-caption inline-text manifest (tables of BLOCK rows),
preprocess_batch on each block, the null-encoder EncodeBatch on each block (model batches of
512, as on a GPU), write_parts per block; beside them the bare tokenizing:
`preprocess_texts` per block (the null-encoder bench's bare loop, what the stage calls) and
`preprocess("text", ..., compact=True)` per caption.
Prints one JSON line of microseconds of CPU per caption. What Ray adds on top is in
`bench_pipeline.py --null-encoder`; this isolates the stage code, and CPU time is what a
loaded machine disturbs least.

    python benchmarks/bench_text_stages.py [block rows, default 8192]
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())
sys.path.insert(0, "benchmarks")
import bench_pipeline as bp
import pyarrow as pa
import pyarrow.parquet as pq

import imagebind_core as ibc
from pipelines.readers import read_shard_task
from pipelines.stages import EncodeBatch, preprocess_batch
from pipelines.writers import write_parts

_p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
_p.add_argument("block", type=int, nargs="?", default=8192, help="rows per text block")
B = _p.parse_args().block
tmp = tempfile.mkdtemp()
src = bp.make_text_manifests(tmp, 20000, 20000)
task = {
    "kind": "text",
    "format": "manifest",
    "shard": "part-0000",
    "uri": f"{src}/part-0000.parquet",
    "items": None,
    "fingerprint": None,
}
texts = pq.read_table(f"{src}/part-0000.parquet")["text"].to_pylist()
ibc.preprocess("text", texts[0])
enc = EncodeBatch("text", ibc.ModelSpec(preset="tiny"), null_encoder=True, batch_size=512)
c = time.process_time()
[ibc.preprocess("text", t, compact=True) for t in texts]
per_caption = time.process_time() - c
c = time.process_time()
for s in range(0, len(texts), B):
    ibc.preprocess.preprocess_texts(texts[s : s + B])
bare = time.process_time() - c
c = time.process_time()
blocks = list(read_shard_task(task, tmp + "/out", None, chunk_rows=B))
read = time.process_time() - c
tab = pa.concat_tables(blocks[:-1])
tot = {"pre": 0.0, "enc": 0.0, "write": 0.0}
for s in range(0, tab.num_rows, B):
    c = time.process_time()
    p = preprocess_batch(tab.slice(s, B))
    tot["pre"] += time.process_time() - c
    c = time.process_time()
    e = enc(p)
    tot["enc"] += time.process_time() - c
    c = time.process_time()
    write_parts(e, tmp + "/out", None, 32)
    tot["write"] += time.process_time() - c
n = tab.num_rows
tot.update(bare=bare, per_caption=per_caption, read=read)
r = {k: v / n * 1e6 for k, v in tot.items()}
print(json.dumps({"block": B, **{k: round(v, 1) for k, v in r.items()}}))
