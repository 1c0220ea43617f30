"""GPU run in one call: encoder throughput per modality, dtype, batch size and torch.compile,
decode + preprocess throughput per CPU core and across all cores, and the CPUs per GPU they imply.

    python3 benchmarks/bench_gpu.py --out benchmarks/results/gpu.md          # on a GPU machine
    python benchmarks/bench_gpu.py --preset tiny --device cpu --budget 0.1   # smoke test here

Encoders: random weights of `--preset` (huge by default: the published architecture), inputs
already on the device, CUDA-event timing, median of at least 3 timed batches after 2 warm-ups.
Variants: float32 (matmuls in full fp32), float32 with TF32 matmuls, bfloat16 and float16
weights (what `dtype:` in the job/serve config selects), and bfloat16 + `torch.compile` for a
subset. Each row also gives the minimum cosine and relative L2 error of the variant's outputs
against float32 on the same inputs, and the peak GPU memory of the call.

Preprocessing: `bench_preprocess.py --no-reference` in a subprocess (one core, CPU time), then
the same `imagebind_core.preprocess` over a process pool of every core (wall time): the pool's
items/s is what one machine of this size feeds an encoder.

The run keeps to `--deadline` seconds: cells that would start later are listed as skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from bench_model import make_inputs  # noqa: E402  (token ids framed as the tokenizer frames them)

import imagebind_core as ibc  # noqa: E402

T0 = time.perf_counter()

# modality -> (encoder key, input maker, batch sizes). Video is the vision encoder on
# (B, 15 clips, 3, 2 frames, 224, 224): one video costs 15 two-frame clips.
CASES = {
    "vision": ("vision", lambda b, g: torch.randn(b, 3, 224, 224, generator=g), (1, 64, 256)),
    "video": ("vision", lambda b, g: torch.randn(b, 15, 3, 2, 224, 224, generator=g), (4, 16)),
    "text": ("text", lambda b, g: make_inputs("text", b), (1, 256, 1024)),
    "audio": ("audio", lambda b, g: torch.randn(b, 3, 1, 128, 204, generator=g), (64, 256)),
    "depth": ("depth", lambda b, g: torch.randn(b, 1, 224, 224, generator=g), (64, 256)),
    "thermal": ("thermal", lambda b, g: torch.randn(b, 1, 224, 224, generator=g), (64, 256)),
    "imu": ("imu", lambda b, g: torch.randn(b, 6, 2000, generator=g), (256, 1024)),
}
# preprocessing benchmark name -> the modality row it feeds
PRE_FOR = {
    "vision": "image",
    "video": "video",
    "text": "text",
    "audio": "audio-mp3",
    "depth": "depth",
    "thermal": "thermal",
    "imu": "imu",
}


def left() -> float:
    return ARGS.deadline - (time.perf_counter() - T0)


def timed(fn, x, dev: torch.device, budget: float) -> float:
    """Median seconds per call after two warm-ups (CUDA events on a GPU)."""
    for _ in range(2):
        fn(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
        if dev.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn(x)
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1000)
        else:
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def encoders(dev: torch.device) -> list[dict]:
    mods = sorted({enc for enc, _, _ in CASES.values()})
    t = time.perf_counter()
    m32 = ibc.build_model(ARGS.preset, mods, device=dev)  # seeded random weights, fp32
    print(
        f"built {ARGS.preset} ({len(mods)} encoders) in {time.perf_counter() - t:.1f} s", flush=True
    )
    models = {"float32": m32, "tf32": m32}
    for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        if dt == torch.float16 and dev.type != "cuda":
            continue
        low = ibc.build_model(ARGS.preset, mods, device="meta", seed=None)
        low.load_state_dict(m32.state_dict(), assign=True)
        models[name] = low.to(dtype=dt).eval()
    comp = None
    if ARGS.compile:
        comp = ibc.build_model(ARGS.preset, mods, device="meta", seed=None)
        comp.load_state_dict(models["bfloat16"].state_dict(), assign=True)
        comp.eval().compile()
    rows: list[dict] = []
    g = torch.Generator().manual_seed(0)
    for modality, (enc, make, batches) in CASES.items():
        if ARGS.modalities and modality not in ARGS.modalities:
            continue
        for b in batches:
            x_cpu = make(b, g)
            x = x_cpu.to(dev)
            ref = None
            variants = [
                (v, models[v]) for v in ("float32", "tf32", "bfloat16", "float16") if v in models
            ]
            if comp is not None and modality in ARGS.compile and b == max(batches):
                variants.append(("bfloat16+compile", comp))
            for vname, model in variants:
                if left() < 0:
                    rows.append(
                        {"modality": modality, "batch": b, "variant": vname, "skipped": True}
                    )
                    continue
                torch.backends.cuda.matmul.allow_tf32 = vname == "tf32"
                torch.backends.cudnn.allow_tf32 = vname == "tf32"
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t_first = time.perf_counter()
                with torch.inference_mode():
                    out = model.encode(enc, x).float()
                    first = time.perf_counter() - t_first
                    s = timed(
                        lambda t, model=model, enc=enc: model.encode(enc, t), x, dev, ARGS.budget
                    )
                    s_host = s_pinned = None
                    if vname == "bfloat16" and modality == "vision":
                        # the job's actors get batches in host memory: include that copy, as a
                        # plain copy (what encode() does) and from pinned memory, asynchronously
                        s_host = timed(
                            lambda t, model=model, enc=enc: model.encode(enc, t),
                            x_cpu,
                            dev,
                            ARGS.budget,
                        )
                        if dev.type == "cuda":
                            s_pinned = timed(
                                lambda t, model=model, enc=enc: model.encode(
                                    enc, t.pin_memory().to(dev, non_blocking=True)
                                ),
                                x_cpu,
                                dev,
                                ARGS.budget,
                            )
                if ref is None:
                    ref = out
                cos = F.cosine_similarity(out, ref).min().item()
                rel = ((out - ref).norm() / ref.norm()).item()
                row = {
                    "modality": modality,
                    "batch": b,
                    "variant": vname,
                    "items_per_s": b / s,
                    "ms_per_batch": s * 1000,
                    "min_cos_vs_fp32": cos,
                    "rel_l2_vs_fp32": rel,
                    "first_call_s": first,
                    "peak_gb": torch.cuda.max_memory_allocated() / 1e9
                    if dev.type == "cuda"
                    else None,
                }
                if s_host is not None:
                    row["items_per_s_host_input"] = b / s_host
                if s_pinned is not None:
                    row["items_per_s_pinned_input"] = b / s_pinned
                rows.append(row)
                print(
                    f"{modality:8s} b={b:<5d} {vname:17s} {b / s:10.1f} items/s {s * 1000:8.1f} ms"
                    f"  cos>={cos:.5f} rel={rel:.1e} first={first:.1f}s"
                    + (f" peak={row['peak_gb']:.1f}GB" if row["peak_gb"] else "")
                    + (f" host-input {b / s_host:.1f}/s" if s_host else "")
                    + (f" pinned-input {b / s_pinned:.1f}/s" if s_pinned else ""),
                    flush=True,
                )
            del x, x_cpu, ref
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def per_core() -> dict[str, float]:
    """bench_preprocess.py --no-reference: items/s per core by its case name."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_preprocess.py"), "--no-reference"]
    cmd += ["--budget", str(ARGS.pre_budget)]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, left()))
    print(got.stdout, got.stderr[-2000:] if got.returncode else "", flush=True)
    rates = {}
    for line in got.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2:
            with contextlib.suppress(ValueError):
                rates[parts[0]] = float(parts[1])
    return rates


_PAYLOAD: tuple[str, bytes] | None = None
_BARRIER = None


def _init(kind: str, data: bytes, barrier) -> None:
    global _PAYLOAD, _BARRIER
    torch.set_num_threads(1)
    _PAYLOAD, _BARRIER = (kind, data), barrier


def _work(n: int) -> int:
    from imagebind_core.preprocess import preprocess

    kind, data = _PAYLOAD
    for _ in range(n):
        preprocess(kind, data)
    return n


def _warm(_: int) -> int:
    _work(1)
    # Hold every worker here until all have started: the executor starts processes lazily,
    # one per task that finds no idle worker, and a process started later would put its
    # start-up (torch import) inside the timed phase.
    _BARRIER.wait(timeout=600)
    return 1


def pool_rate(kind: str, data: bytes, workers: int, seconds: float) -> float:
    """Items/s of `workers` processes preprocessing `data` (wall time, every worker warm)."""
    ctx = mp.get_context("spawn")  # CUDA may be initialised in this process: never fork it
    barrier = ctx.Barrier(workers)
    with cf.ProcessPoolExecutor(
        workers, ctx, initializer=_init, initargs=(kind, data, barrier)
    ) as ex:
        list(ex.map(_warm, range(workers)))  # start + import + first call in every worker
        t = time.perf_counter()
        list(ex.map(_work, [1] * workers))
        chunk = max(1, int(seconds / max(time.perf_counter() - t, 1e-4) / 4))
        t = time.perf_counter()
        done = sum(ex.map(_work, [chunk] * (workers * 4)))
        return done / (time.perf_counter() - t)


def media_for(case: str) -> tuple[str, bytes]:
    import media

    return {
        "image": lambda: ("vision", media.make_image("JPEG", (1280, 720), quality=90)),
        "text": lambda: ("text", b"A golden retriever puppy chases a red ball across the sand"),
        "audio-mp3": lambda: ("audio", media.make_mp3(10.0, 44100, 2)),
        "video": lambda: ("video", media.make_video(10, 30, (1280, 720))),
        "depth": lambda: ("depth", media.make_depth_png((640, 480), bits=16)),
    }[case]()


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="huge")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, default=1.0, help="timed seconds per encoder cell")
    ap.add_argument("--pre-budget", type=float, default=1.5, help="seconds per preprocessing case")
    ap.add_argument("--deadline", type=float, default=380.0, help="skip cells after this many s")
    ap.add_argument("--modalities", nargs="*", default=None, help="subset of " + " ".join(CASES))
    ap.add_argument("--compile", nargs="*", default=["vision", "text"], help="bf16+compile these")
    ap.add_argument("--pool", nargs="*", default=["image", "audio-mp3", "video", "depth"])
    ap.add_argument("--skip-preprocess", action="store_true")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    ap.add_argument("--json", default=None, help="write all figures as JSON here")
    ARGS = ap.parse_args()
    warnings.simplefilter("ignore")
    dev = torch.device(ARGS.device)
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "cpus": os.cpu_count(),
        "preset": ARGS.preset,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(env), flush=True)

    cores: dict[str, float] = {}
    pools: dict[str, float] = {}
    if not ARGS.skip_preprocess:
        cores = per_core()
        workers = os.cpu_count() or 1
        for case in ARGS.pool:
            if left() < 60:
                break
            kind, data = media_for(case)
            pools[case] = pool_rate(kind, data, workers, ARGS.pre_budget * 2)
            print(f"pool {case}: {pools[case]:.1f} items/s on {workers} processes", flush=True)
    rows = encoders(dev)
    report = render(env, rows, cores, pools)
    print(report)
    if ARGS.out:
        Path(ARGS.out).write_text(report)
    if ARGS.json:
        Path(ARGS.json).write_text(
            json.dumps({"env": env, "encoders": rows, "per_core": cores, "pool": pools}, indent=1)
        )


def render(env: dict, rows: list[dict], cores: dict, pools: dict) -> str:
    lines = [
        f"# GPU run: {env['device']}, torch {env['torch']}, {env['cpus']} CPUs, "
        f"preset {env['preset']}, {env['date']}",
        "",
        "Command: `python3 benchmarks/bench_gpu.py` (random weights; inputs on the device;",
        "median CUDA-event time per batch; cosine/rel. error against float32 on the same inputs).",
        "",
        "| modality | batch | variant | items/s | × fp32 | ms/batch | min cos vs fp32 "
        "| rel. L2 vs fp32 | peak GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fp32 = {
        (r["modality"], r["batch"]): r["items_per_s"]
        for r in rows
        if r["variant"] == "float32" and not r.get("skipped")
    }
    for r in rows:
        if r.get("skipped") or (r["modality"], r["batch"]) not in fp32:
            lines.append(
                f"| {r['modality']} | {r['batch']} | {r['variant']} | skipped (deadline) "
                "| | | | | |"
            )
            continue
        extra = (
            f" ({r['items_per_s_host_input']:.0f} from host memory"
            + (
                f", {r['items_per_s_pinned_input']:.0f} pinned"
                if "items_per_s_pinned_input" in r
                else ""
            )
            + ")"
            if "items_per_s_host_input" in r
            else ""
        )
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        lines.append(
            f"| {r['modality']} | {r['batch']} | {r['variant']} | {r['items_per_s']:.1f}{extra} | "
            f"{r['items_per_s'] / fp32[(r['modality'], r['batch'])]:.2f} | "
            f"{r['ms_per_batch']:.1f} | {r['min_cos_vs_fp32']:.5f} | "
            f"{r['rel_l2_vs_fp32']:.1e} | {peak} |"
        )
    best: dict[str, float] = {}
    for r in rows:
        if not r.get("skipped") and r["variant"] in ("bfloat16", "bfloat16+compile"):
            best[r["modality"]] = max(best.get(r["modality"], 0.0), r["items_per_s"])
    if cores:
        lines += [
            "",
            "CPUs per GPU = bf16 encoder items/s (best batch) / decode+preprocess items/s per core",
            "(`bench_preprocess.py --no-reference`, one core, CPU time;",
            "pool: every core, wall time):",
            "",
            "| modality | encoder items/s | preprocess items/s per core "
            "| pool items/s (all cores) | CPUs per GPU |",
            "|---|---|---|---|---|",
        ]
        for modality, case in PRE_FOR.items():
            if modality not in best or case not in cores:
                continue
            pool = f"{pools[case]:.0f}" if case in pools else "-"
            lines.append(
                f"| {modality} ({case}) | {best[modality]:.0f} | {cores[case]:.1f} | {pool} | "
                f"{best[modality] / cores[case]:.1f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
