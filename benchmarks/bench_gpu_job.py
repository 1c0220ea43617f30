"""The offline job on a GPU node against its bare encoder, in the same run.

What a GPU node's bill depends on: how close the job (reading, decoding and preprocessing on
the CPUs, Ray Data moving blocks, the encoder actor on the GPU, writing and committing) comes
to the encoder alone. Per kind, on a generated corpus (vision: JPEGs of img2dataset-like sizes,
512x384 and 384x512; text: captions of 6-19 words in inline-text Parquet manifests):

1. bare: the encoder runner the job's actor runs (`imagebind_core.EncoderRunner`), fed from
   host memory in the form the job hands it (uint8 pixels, int32 token ids trimmed to the
   batch's width), at the job's batch size: items/s;
2. the job as a user runs it (`python -m pipelines.embed --json` in a fresh process that starts
   its own local Ray): end to end, Ray's start included, items/s and its share of bare;
3. the same job on `--part` of the corpus: the steady state is the full job minus the part job
   (items over wall seconds; the fixed costs cancel), and its share of bare;
4. GPU utilisation (`nvidia-smi`, every 0.5 s, averaged over the node's GPUs) over the full
   job, and over its steady window: from the job's first encoded batch to the last sample the
   GPU was busy;
5. the CPU cores the job kept busy (its whole process tree), and a check that the output holds
   every item exactly once.

`--variant NAME:KEY=VALUE` runs the job again with a config override (repeat the flag to add
more keys to a variant, or to add variants), e.g. device JPEG decode or batches in flight:

    python benchmarks/bench_gpu_job.py --json benchmarks/results/gpu-job.json   # a GPU node
    python benchmarks/bench_gpu_job.py --kinds vision \
        --variant gpudecode:preprocess.decode.vision=gpu      # device JPEG decode too
    python benchmarks/bench_gpu_job.py --device cpu --preset tiny --dtype float32 \
        --images 256 --texts 20000 --bare-seconds 3           # a smoke test without a GPU

The defaults (100,000 images, 400,000 captions, huge, bfloat16) are sized to take 6-8 minutes
on one H200 with 16 cores, estimated from the job's rates there on 2026-12-04 (it has not run
on a GPU yet), most of it the jobs; the corpus is kept in `--corpus DIR` if given and reused by
later runs. The last line reads `gpu job, steady state / bare: vision <share>, text
<share>`. Timings vary with the node: only the shares printed by one run are comparable.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from _common import key_value, write_results
from bench_pipeline import make_text_manifests
from bench_warmup import cli_job

FORMATS = {"vision": "files", "text": "manifest"}


# ----------------------------------------------------------------------------- corpus


def _write_images(job: tuple[str, int, int]) -> int:
    """JPEGs `lo`..`hi` in `root`: a gradient under 8x8-pixel blocks of noise, so they
    compress like photographs (~40-80 KB), not like flat colour."""
    from PIL import Image

    root, lo, hi = job
    rng = np.random.default_rng(lo)
    for i in range(lo, hi):
        w, h = (512, 384) if i % 3 else (384, 512)
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1, 3)
        noise = rng.normal(0, 30, (h // 8, w // 8, 3)).repeat(8, 0).repeat(8, 1)
        img = np.clip(base + noise + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(f"{root}/{i:07d}.jpg", quality=90)
    return hi - lo


def make_images(root: str, n: int) -> str:
    """`n` JPEGs in `root` (kept if already there), written by a process per core."""
    if os.path.isdir(root) and len(os.listdir(root)) == n:
        return root
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    step = 500
    with ProcessPoolExecutor(os.cpu_count()) as ex:
        list(ex.map(_write_images, [(root, i, min(i + step, n)) for i in range(0, n, step)]))
    return root


def corpus(workdir: str, kind: str, n: int, part: float) -> tuple[str, str]:
    """(full, part) inputs of `kind` under `workdir` (kept if already there): the part job's
    images are the full one's first files; its captions, manifests of their own."""
    if kind == "text":
        sub = _texts(f"{workdir}/text-{n}-part-{part:g}", max(1, int(n * part)))
        return _texts(f"{workdir}/text-{n}", n), sub
    full = make_images(f"{workdir}/images-{n}", n)
    sub = f"{workdir}/images-{n}-part-{part:g}"
    if not os.path.isdir(sub):
        os.makedirs(sub + ".tmp")
        for name in sorted(os.listdir(full))[: max(1, int(n * part))]:
            os.link(f"{full}/{name}", f"{sub}.tmp/{name}")
        os.rename(sub + ".tmp", sub)
    return full, sub


def _texts(root: str, n: int) -> str:
    if not os.path.isdir(root):
        shutil.rmtree(root + ".tmp", ignore_errors=True)
        make_text_manifests(root + ".tmp", n, 20_000)
        os.rename(root + ".tmp", root)
    return f"{root}/manifests"


# ----------------------------------------------------------------------------- bare encoder


def bare_inputs(kind: str, source: str, batch: int) -> np.ndarray:
    """One model batch as the job's actor receives it: uint8 pixels of `batch` corpus images,
    or the int32 token ids of `batch` captions trimmed to the longest."""
    import imagebind_core as ibc

    if kind == "vision":
        files = sorted(os.listdir(source))[:batch]
        return np.stack(
            [ibc.preprocess(kind, Path(source, f).read_bytes(), compact=True) for f in files]
        )
    import pyarrow.parquet as pq

    first = sorted(os.listdir(source))[0]
    texts = pq.read_table(f"{source}/{first}", columns=["text"])["text"].to_pylist()[:batch]
    ids, errors = ibc.preprocess.preprocess_texts(texts)
    assert not errors, errors
    width = int((ids != 0).sum(axis=1).max())
    return ids[:, :width].astype(np.int32)


def bare_rate(kind: str, spec, x: np.ndarray, seconds: float) -> float:
    """Items/s of the runner encoding `x` again and again for about `seconds` (two batches of
    warm-up first), the next batch's copy in flight while one computes, as in the job."""
    import imagebind_core as ibc

    runner = ibc.EncoderRunner(spec, ibc.model_modality(kind))
    for _ in runner.encode_all((kind, x) for _ in range(2)):
        pass
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in runner.encode_all((kind, x) for _ in range(4)):
            n += len(x)
    rate = n / (time.perf_counter() - t0)
    del runner
    _free_device()
    return rate


def _free_device() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the job


class GpuSampler:
    """`nvidia-smi` utilisation every 0.5 s while the block runs: [(unix time, mean % over
    the node's GPUs)]; empty where there is no nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen | None = None
        self._t: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            cmd = ["nvidia-smi", "--query-gpu=index,utilization.gpu"]
            cmd += ["--format=csv,noheader,nounits", "-lms", "500"]
            self._proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            self._t = threading.Thread(target=self._read, daemon=True)
            self._t.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        tick: dict[str, float] = {}
        for line in self._proc.stdout:
            index, _, util = (p.strip() for p in line.partition(","))
            if not util.isdigit():
                continue
            if index in tick:  # the next round of samples starts: one point per round
                self.samples.append((time.time(), sum(tick.values()) / len(tick)))
                tick = {}
            tick[index] = float(util)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
        if self._t is not None:
            self._t.join(timeout=2)

    def mean(self, start: float = 0.0, end: float = float("inf")) -> float | None:
        vals = [u for t, u in self.samples if start <= t <= end]
        return sum(vals) / len(vals) if vals else None

    def last_busy(self) -> float | None:
        busy = [t for t, u in self.samples if u > 0]
        return busy[-1] if busy else None


def job(kind: str, source: str, out: str, sets: dict, timeout: float) -> dict:
    """One job from the command line, in a fresh process and Ray: its figures, GPU
    utilisation and the check that every item is in the output once."""
    import pyarrow.dataset as pads

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    with GpuSampler() as gpu:
        s, cpu, wall = cli_job(kind, source, FORMATS[kind], out, sets, null=False, timeout=timeout)
    k = s["kinds"][kind]
    items = k["embedded"] + k["errors"]
    ids = pads.dataset(out, format="parquet").to_table(columns=["id"]).column("id")
    first = s["first_batch_seconds"]
    busy = gpu.last_busy()
    return {
        "items": items,
        "errors": k["errors"],
        "every_id_once": len(ids) == items and len(set(ids.to_pylist())) == items,
        "wall_s": round(wall, 2),
        "ray_up_s": s["ray_up_seconds"],
        "first_batch_s": first,
        "cores_busy": round(cpu.seconds / wall, 2),
        "gpu_util_job": gpu.mean(t0, t0 + wall),
        "gpu_util_steady": gpu.mean(t0 + first, busy) if first is not None and busy else None,
    }


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} %"


def run_variant(kind: str, name: str, full: str, part: str, sets: dict, args, bare: float) -> dict:
    tmp = f"{args.workdir}/out"
    f = job(kind, full, f"{tmp}/{kind}-{name}-full", sets, args.timeout)
    p = job(kind, part, f"{tmp}/{kind}-{name}-part", sets, args.timeout)
    dn, dw = f["items"] - p["items"], f["wall_s"] - p["wall_s"]
    steady = dn / dw if dw > 0 else float("nan")
    end_to_end = f["items"] / f["wall_s"]
    r = {
        "full": f,
        "part": p,
        "end_to_end_items_s": round(end_to_end, 1),
        "steady_items_s": round(steady, 1),
        "end_to_end_share": round(end_to_end / bare, 3),
        "steady_share": round(steady / bare, 3),
    }
    print(
        f"{kind:6s} {name}: end to end {end_to_end:8.1f} items/s = {r['end_to_end_share']:.2f} "
        f"of bare ({f['items']} in {f['wall_s']:.1f} s, Ray up {f['ray_up_s']:.1f} s, first "
        f"batch {f['first_batch_s']:.1f} s) | steady {steady:8.1f} items/s = "
        f"{r['steady_share']:.2f} of bare | GPU busy: steady {_pct(f['gpu_util_steady'])}, "
        f"whole job {_pct(f['gpu_util_job'])} | {f['cores_busy']:.1f} cores busy | errors "
        f"{f['errors']} | every id once: {f['every_id_once'] and p['every_id_once']}",
        flush=True,
    )
    return r


def _variant(text: str) -> tuple[str, str, str]:
    name, colon, kv = text.partition(":")
    if not (name and colon):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:KEY=VALUE")
    return (name, *key_value(kv))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="vision,text")
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--texts", type=int, default=400_000)
    p.add_argument("--part", type=float, default=0.25, help="the smaller job's share")
    p.add_argument("--preset", default="huge")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", help="cuda (one GPU per actor) or cpu")
    p.add_argument("--bare-seconds", type=float, default=15.0)
    p.add_argument(
        "--variant", action="append", default=[], type=_variant, metavar="NAME:KEY=VALUE"
    )
    p.add_argument("--timeout", type=float, default=540.0, help="seconds per job")
    p.add_argument("--corpus", help="keep the generated corpus here (reused if there)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    import yaml

    base = {"preset": args.preset, "encoder_defaults.dtype": args.dtype}
    if args.device == "cuda":
        base["encoder_defaults.num_gpus"] = 1
    variants: dict[str, dict] = {"default": {}}
    for name, key, value in args.variant:
        variants.setdefault(name, {})[key] = yaml.safe_load(value)
    args.workdir = tempfile.mkdtemp(prefix="bench-gpu-job-")
    kinds = args.kinds.split(",")
    results: dict = {"cores": os.cpu_count(), "preset": args.preset, "dtype": args.dtype}
    try:
        # The corpus first, before this process imports torch: its writers are forked.
        inputs = {}
        for kind in kinds:
            t = time.perf_counter()
            n = args.images if kind == "vision" else args.texts
            inputs[kind] = corpus(args.corpus or args.workdir, kind, n, args.part)
            print(f"{kind:6s} corpus: {n} items ({time.perf_counter() - t:.0f} s)", flush=True)
        import torch

        import imagebind_core as ibc
        from pipelines.config import load_config

        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        print(
            f"gpu job: {device}, {os.cpu_count()} cores; {args.preset} {args.dtype}; "
            f"images {args.images}, texts {args.texts}, part {args.part}",
            flush=True,
        )
        results["device"] = device
        for kind in kinds:
            full, part = inputs[kind]
            cfg = load_config(None, {"input": full, "output": "x", **base})
            batch = cfg.encoder(kind).batch_size
            spec = ibc.ModelSpec(preset=args.preset, dtype=args.dtype, device=args.device)
            bare = bare_rate(kind, spec, bare_inputs(kind, full, batch), args.bare_seconds)
            print(f"{kind:6s} bare: {bare:8.1f} items/s (batch {batch})", flush=True)
            n = args.images if kind == "vision" else args.texts
            results[kind] = {"items": n, "batch": batch, "bare_items_s": round(bare, 1)}
            for name, sets in variants.items():
                results[kind][name] = run_variant(
                    kind, name, full, part, {**base, **sets}, args, bare
                )
        write_results(args.json, results)
        print(
            "gpu job, steady state / bare: "
            + ", ".join(f"{k} {results[k]['default']['steady_share']:.2f}" for k in kinds)
        )
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
