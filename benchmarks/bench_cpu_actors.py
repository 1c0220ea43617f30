"""One multi-threaded encoder process against several single-threaded ones, on CPU.

Why the offline job's CPU encoder pools default to one single-thread actor per core
(`encoders.*.max_actors: auto`, docs/pipelines.md): N processes with 1 torch thread each
against 1 process with N threads, same model, same batches, all processes released together
behind a barrier after building their models. Prints items/s of both and their ratio per round;
the machine is noisy, so read the spread of the rounds, never absolute numbers across runs.

    python benchmarks/bench_cpu_actors.py --kinds text,vision --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
import warnings


def _worker(kind: str, preset: str, threads: int, batches: int, batch: int, bar, q) -> None:
    import torch

    import imagebind_core as ibc

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")  # random weights
    m = ibc.model_modality(kind).value
    model = ibc.load_model(None, preset, modalities=[m], device="cpu")
    gen = torch.Generator().manual_seed(0)
    if kind == "text":
        x = torch.randint(1, 49000, (batch, 77), generator=gen)
        x[:, -1] = 49407  # full-length texts: every column runs (the model drops padding)
    else:
        x = torch.randn(batch, 3, 224, 224, generator=gen)
    with torch.inference_mode():
        model({m: x})  # warm-up
        bar.wait()
        t0 = time.perf_counter()
        for _ in range(batches):
            model({m: x})
        q.put(time.perf_counter() - t0)


def run(kind: str, preset: str, procs: int, threads: int, batches: int, batch: int) -> float:
    """items/s of `procs` processes x `threads` threads, each running `batches` batches."""
    ctx = mp.get_context("spawn")
    q, bar = ctx.Queue(), ctx.Barrier(procs)
    ps = [
        ctx.Process(target=_worker, args=(kind, preset, threads, batches, batch, bar, q))
        for _ in range(procs)
    ]
    for p in ps:
        p.start()
    seconds = [q.get() for _ in ps]
    for p in ps:
        p.join()
    return procs * batches * batch / max(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--kinds", default="text,vision")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--text-batches", type=int, default=24, help="batches per round, 1 process")
    p.add_argument("--vision-batches", type=int, default=4, help="batches per round, 1 process")
    a = p.parse_args()
    n = a.cores
    print(f"preset {a.preset}, batch {a.batch_size}, {n} cores: 1 x {n} threads vs {n} x 1")
    for kind in a.kinds.split(","):
        batches = a.text_batches if kind == "text" else a.vision_batches
        for r in range(a.rounds):
            one = run(kind, a.preset, 1, n, batches, a.batch_size)
            many = run(kind, a.preset, n, 1, max(1, batches // n), a.batch_size)
            print(
                f"{kind:7s} round {r + 1}: 1 x {n} threads {one:7.2f} items/s | "
                f"{n} x 1 thread {many:7.2f} items/s | ratio {many / one:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
