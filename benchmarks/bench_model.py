"""Encoder throughput: this implementation vs the reference, same weights, same process.

    .venv/bin/python benchmarks/bench_model.py                       # huge, vision+text, batch 8
    .venv/bin/python benchmarks/bench_model.py --preset base --iters 2   # quicker look
    .venv/bin/python benchmarks/bench_model.py --device cuda --batch 256 --no-reference  # GPU

Prints items/s per modality and dtype, the ratio to the reference's float32 throughput, and the
cosine similarity of bfloat16 embeddings to float32 ones. Runs are interleaved (reference, ours,
reference, ours ...) and the best of `--iters` is kept, so a noisy shared machine biases both
sides alike; absolute numbers are not comparable across runs, ratios are.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import imagebind_core as ibc
from imagebind_core.config import (
    BASE_REFERENCE_KWARGS,
    HUGE_REFERENCE_KWARGS,
    TINY_REFERENCE_KWARGS,
)

KWARGS = {
    "huge": HUGE_REFERENCE_KWARGS,
    "base": BASE_REFERENCE_KWARGS,
    "tiny": TINY_REFERENCE_KWARGS,
}


def make_inputs(modality: str, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if modality == "vision":
        return torch.randn(batch, 3, 224, 224, generator=g)
    if modality == "text":
        ids = torch.randint(1, 49406, (batch, 77), generator=g)
        ids[:, 0] = 49406
        for i in range(batch):  # captions of ~10-40 tokens, zero padded
            n = 10 + (i * 7) % 30
            ids[i, n] = 49407
            ids[i, n + 1 :] = 0
        return ids
    if modality == "audio":
        return torch.randn(batch, 3, 1, 128, 204, generator=g)
    raise ValueError(modality)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="huge", choices=sorted(KWARGS))
    ap.add_argument("--modalities", nargs="+", default=["vision", "text"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference model")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd encoders")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    dev = torch.device(args.device)

    t0 = time.perf_counter()
    if args.no_reference:
        ours32 = ibc.load_model(None, preset=args.preset, modalities=args.modalities, device=dev)
        ref = None
    else:
        from reference_shim import build_reference

        ref = build_reference(0, **KWARGS[args.preset]).to(dev)
        # Same weights: our fp32 model shares the reference's tensors (no copy).
        ours32 = ibc.build_model(args.preset, args.modalities, device="meta", seed=None)
        ours32.load_state_dict(
            ibc.map_reference_state_dict(ref.state_dict(), ours32), strict=True, assign=True
        )
        ours32.eval()
    print(f"built models in {time.perf_counter() - t0:.1f} s")
    low = torch.bfloat16
    ours_low = ibc.build_model(args.preset, args.modalities, device="meta", seed=None)
    ours_low.load_state_dict(ours32.state_dict(), assign=True)
    ours_low = ours_low.to(dtype=low).eval()  # a bf16 copy of the same weights

    variants: list[tuple[str, object]] = []
    if ref is not None:
        variants.append(("reference fp32", lambda m, x: ref({m: x})[m]))
    variants.append(("ours fp32", lambda m, x: ours32.encode(m, x)))
    variants.append(("ours bf16", lambda m, x: ours_low.encode(m, x)))
    if args.compile:
        comp = ibc.build_model(args.preset, args.modalities, device="meta", seed=None)
        comp.load_state_dict(ours_low.state_dict(), assign=True)
        comp.eval().compile()
        variants.append(("ours bf16 compiled", lambda m, x: comp.encode(m, x)))

    print(
        f"preset={args.preset} batch={args.batch} threads={args.threads} device={dev} "
        f"torch={torch.__version__}"
    )
    for m in args.modalities:
        x = make_inputs(m, args.batch).to(dev)
        outs = {}
        best = {name: float("inf") for name, _ in variants}
        with torch.inference_mode():
            for name, fn in variants:  # warm-up (and compile)
                outs[name] = fn(m, x).float()
            for _ in range(args.iters):
                for name, fn in variants:
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    fn(m, x)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    best[name] = min(best[name], time.perf_counter() - t)
        base_name = variants[0][0]
        base_out = outs["ours fp32"]
        for name, _ in variants:
            ips = args.batch / best[name]
            ratio = best[base_name] / best[name]
            cos = F.cosine_similarity(outs[name], base_out).min().item()
            print(
                f"  {m:7s} {name:20s} {ips:9.2f} items/s  x{ratio:5.2f} vs {base_name}"
                f"   min cos to ours fp32 {cos:.5f}"
            )
        if ref is not None:
            diff = (outs["ours fp32"] - outs["reference fp32"]).abs().max().item()
            print(f"  {m:7s} max |ours fp32 - reference| = {diff:.2e}")


if __name__ == "__main__":
    main()
