"""Reading a re-rank's candidate vectors from a memory-mapped file: cold and warm.

    .venv/bin/python benchmarks/bench_rerank_io.py [--n 500000] [--candidates 100 1000 2000]

A search that re-ranks reads `rerank x top_k` scattered rows of a shard's re-ranking vectors
(`<modality>.vectors.npy`, memory-mapped with MADV_RANDOM). This times that gather alone,
on one (n, 1024) float32 file written twice with the same rows:

- `numpy`: numpy's .npy header (64-byte aligned: every 4 KiB row straddles two pages), as
  indexes written before the page-aligned layout have it;
- `index`: the index's own writer (`imagebind_core.index._open_vectors`: rows start on a
  page);

each read with and without `imagebind_core.index.will_need` (every candidate's pages asked of
the kernel at once before the rows are touched). The baseline is `numpy` without
`will_need`, the code before both. The four variants read the same random rows, in an order
rotated from one draw to the next; `cold`: each read starts with the file's pages evicted
(MADV_DONTNEED on the mapping, POSIX_FADV_DONTNEED on the file: no root needed), `warm`:
after the same read once untimed. Prints the median milliseconds per read and the ratio to
the baseline. Needs 2 x n x 4 KiB of free disk in --dir (4 GB at the default n).
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import tempfile
import time

import fsspec
import numpy as np

from imagebind_core.index import _map_random, _open_vectors, _write_rows, will_need

DIM = 1024
BLOCK = 65_536


def write_files(folder: str, n: int) -> dict[str, str]:
    """The same n random rows as numpy's .npy and as the index writes it."""
    paths = {"numpy": f"{folder}/numpy.npy", "index": f"{folder}/index.npy"}
    rng = np.random.default_rng(0)
    out = np.lib.format.open_memmap(paths["numpy"], "w+", np.float32, (n, DIM))
    with _open_vectors(fsspec.filesystem("file"), paths["index"], n, DIM) as f:
        for s in range(0, n, BLOCK):
            x = rng.standard_normal((min(BLOCK, n - s), DIM), dtype=np.float32)
            out[s : s + len(x)] = x
            _write_rows(f, x)
    out.flush()
    del out
    return paths


def evict(arr: np.ndarray) -> None:
    arr._mmap.madvise(mmap.MADV_DONTNEED)
    with open(arr.filename, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def gather(arr: np.ndarray, rows: np.ndarray, prefetch: bool) -> float:
    t = time.perf_counter()
    if prefetch:
        will_need(arr, rows)
    x = np.asarray(arr[rows], np.float64)
    assert x.shape == (len(rows), DIM)
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500_000, help="rows in the file")
    p.add_argument("--candidates", type=int, nargs="+", default=[100, 1000, 2000])
    p.add_argument("--draws", type=int, default=30, help="random candidate sets per size")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench-rerank-io-", dir=a.dir)
    try:
        t = time.perf_counter()
        paths = write_files(work, a.n)
        print(f"n={a.n} dim={DIM}: two files of {a.n * DIM * 4 / 2**30:.2f} GiB written in "
              f"{time.perf_counter() - t:.0f} s")  # fmt: skip
        arrays = {name: _map_random(path) for name, path in paths.items()}
        print(f"header bytes: numpy {arrays['numpy'].offset}, index {arrays['index'].offset}")
        variants = [(layout, pf) for layout in ("numpy", "index") for pf in (False, True)]
        rng = np.random.default_rng(1)
        for k in a.candidates:
            for cold in (True, False):
                ms: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
                for d in range(a.draws):
                    rows = np.sort(rng.choice(a.n, k, replace=False))
                    for layout, pf in variants[d % 4 :] + variants[: d % 4]:
                        arr = arrays[layout]
                        if cold:
                            evict(arr)
                        else:
                            gather(arr, rows, False)
                        ms[layout, pf].append(gather(arr, rows, pf))
                base = statistics.median(ms["numpy", False])
                print(
                    f"{k:5d} candidates, {'cold' if cold else 'warm'}: "
                    + ", ".join(
                        f"{layout}{' + will_need' if pf else ''} "
                        f"{statistics.median(v):7.2f} ms ({statistics.median(v) / base:.2f}x)"
                        for (layout, pf), v in ms.items()
                    )
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
