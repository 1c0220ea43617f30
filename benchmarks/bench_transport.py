"""Bytes moved and CPU time per item between the job's preprocessing and encoder stages.

For each kind, one block of preprocessed items is handed from the preprocessing stage to the
encoder stage in two ways, and each is timed on both sides in process CPU time:

- npy (the former transport): every item serialised with `np.save` into its own blob of an
  Arrow binary column; the encoder `np.load`s each blob and stacks the batch;
- buffer (the job's transport, `pipelines.stages.tensor_columns` / `batch_arrays`): every
  item in its smallest exact form (uint8 pixels, int32 token ids without padding), all rows in
  one contiguous buffer; the encoder views runs of rows as (B, ...) arrays.

"bytes/item" is the Arrow IPC stream of the block (what the object store holds and, on a
cluster, the network carries) divided by the items; "pre us/item" is the preprocessing side
(forming the column, after `preprocess`), "enc us/item" the encoder side (from the received
table to the batch array(s) the runner stages). Decoding itself is the same in both and not
counted (benchmarks/bench_preprocess.py measures it).

    python benchmarks/bench_transport.py --json benchmarks/results/transport-cpu.json
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
from _common import write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import media

import imagebind_core as ibc
from pipelines.stages import batch_arrays, compact_input, tensor_columns


def _items(kind: str, n: int) -> list[bytes]:
    make = {
        "vision": lambda i: media.make_image("JPEG", (640, 480), seed=i),
        "video": lambda i: media.make_video(3, 10, (320, 240)),
        "text": lambda i: f"a photo of {i} dogs playing in the park at dusk".encode(),
        "audio": lambda i: media.make_flac(4.0, 16000, 1, seed=i),
        "depth": lambda i: media.make_depth_png((320, 240), seed=i),
        "thermal": lambda i: media.make_gray_png((320, 240), seed=i),
        "imu": lambda i: media.make_imu_npy(2000, seed=i),
    }[kind]
    return [make(i) for i in range(n)]


def _ipc_bytes(table: pa.Table) -> int:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().size


def _cpu(fn, reps: int) -> tuple[float, object]:
    out = fn()
    t = time.process_time()
    for _ in range(reps):
        out = fn()
    return (time.process_time() - t) / reps, out


def npy_pre(tensors: list) -> pa.Table:
    blobs = []
    for t in tensors:
        buf = io.BytesIO()
        np.save(buf, t.numpy(), allow_pickle=False)
        blobs.append(buf.getvalue())
    return pa.table({"tensor": pa.array(blobs, pa.large_binary())})


def npy_enc(table: pa.Table) -> np.ndarray:
    blobs = table.column("tensor").to_pylist()
    return np.stack([np.load(io.BytesIO(b), allow_pickle=False) for b in blobs])


def buffer_pre(kind: str, tensors: list) -> pa.Table:
    t, s, d = tensor_columns([compact_input(kind, x) for x in tensors])
    return pa.table({"tensor": t, "tensor_shape": s, "tensor_dtype": d})


def buffer_enc(kind: str, table: pa.Table) -> list:
    return batch_arrays(table, range(table.num_rows), pad=kind == "text")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="vision,video,text,audio,depth,thermal,imu")
    ap.add_argument("--items", type=int, default=32, help="items per block (video: a quarter)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    results = {}
    print(
        f"{'kind':8s} {'npy bytes/item':>15s} {'buffer bytes/item':>18s} {'ratio':>6s} | "
        f"{'pre us/item npy':>15s} {'buffer':>7s} | {'enc us/item npy':>15s} {'buffer':>7s}"
    )
    for kind in args.kinds.split(","):
        n = max(2, args.items // 4) if kind == "video" else args.items
        tensors = [ibc.preprocess(kind, d, compact=True) for d in _items(kind, n)]
        reps = max(1, args.reps // 2) if kind == "video" else args.reps
        pre_old, old = _cpu(partial(npy_pre, tensors), reps)
        pre_new, new = _cpu(partial(buffer_pre, kind, tensors), reps)
        enc_old, _ = _cpu(partial(npy_enc, old), reps)
        enc_new, _ = _cpu(partial(buffer_enc, kind, new), reps)
        r = {
            "items": n,
            "npy_bytes_per_item": _ipc_bytes(old) / n,
            "buffer_bytes_per_item": _ipc_bytes(new) / n,
            "npy_pre_us_per_item": 1e6 * pre_old / n,
            "buffer_pre_us_per_item": 1e6 * pre_new / n,
            "npy_enc_us_per_item": 1e6 * enc_old / n,
            "buffer_enc_us_per_item": 1e6 * enc_new / n,
        }
        results[kind] = r
        print(
            f"{kind:8s} {r['npy_bytes_per_item']:15.0f} {r['buffer_bytes_per_item']:18.0f} "
            f"{r['npy_bytes_per_item'] / r['buffer_bytes_per_item']:5.1f}x | "
            f"{r['npy_pre_us_per_item']:15.1f} {r['buffer_pre_us_per_item']:7.1f} | "
            f"{r['npy_enc_us_per_item']:15.1f} {r['buffer_enc_us_per_item']:7.1f}",
            flush=True,
        )
    write_results(args.json, results, key="kinds")


if __name__ == "__main__":
    main()
