"""The numeric bounds every test compares with, each written once with its reason.

Why not `allclose` with a tolerance that passed here: CPUs pick different GEMM kernels (AMX,
AVX-512, AVX2; MKL/oneDNN choose per machine) and a different batch shape picks a different
blocking of the same sums, so float32 results differ in the last bits between machines and
between a batch and a single item. Such a difference is a reordering of sums, never a different
computation, so its size follows from float32 rounding, not from what one machine showed.
`make test` runs the numeric modules a second time with the AVX2 kernels forced, so a bound
tuned to one instruction set fails there rather than on a user's machine.

EMBED_REL — embeddings (raw or normalised) computed two ways, as max |a - b| / ||b|| per row.
  float32's unit roundoff is u = 2^-24 = 6.0e-8. Reordering a length-K dot product changes it
  by about sqrt(K) * u of its magnitude (rounding errors of the partial sums add like a random
  walk); the tiny encoders' longest reduction is the vision patch embedding, K = 3 * 2 * 14 *
  14 = 1176, so one reordered reduction costs ~34 u = 2.0e-6 relative. LayerNorm rescales after
  every block, so the errors of successive layers add, they are not amplified, and the output
  stays within that order. Measured across AMX, AVX-512 and AVX2 kernels and batch shapes: at
  most 4.4 u (2.6e-7). A real bug is far above it: a change of 1e-3 in a single element of any
  LayerNorm weight of the tiny model moves some output by >= 9.8e-6 relative
  (`test_model_parity.test_bound_catches_one_perturbed_layernorm_element` keeps that true).

PREPROC_ATOL — model inputs (pixels, log-mel features) computed two ways, max absolute.
  Preprocessing is elementwise arithmetic and short reductions (resampling filters, FFT, a
  128 x 201 mel projection) on values of magnitude <= ~3 (normalised pixels) or <= ~10
  (normalised log-mel); 1e-5 absolute is >= 30 ulp of the largest of them, several times the
  few roundings each value goes through. Equal code paths give 0 (the audio codec matrix and the
  image parity tests hit 0.0 on this stack).

DEVICE_DECODE_MAX_LEVELS, DEVICE_DECODE_MEAN_LEVELS — compact still-image pixels (uint8) of the
  device decode (`preprocess.decode: {vision: gpu}`, run on the CPU: the same libjpeg-turbo
  decode, bit for bit) against the exact CPU path; grey levels, max and mean absolute.
  Both compute the same bicubic filter (a = -0.5, antialiased on downscale) and the same crop;
  they differ in rounding and clipping only. Pillow rounds its horizontal pass to uint8: <= 0.5
  level, times the vertical kernel's sum of |weights| (<= 1.25), plus each path's final
  rounding: <= 2 levels. Pillow also clips the horizontal pass to [0, 255]: the filter's
  negative lobe (weight >= -1/16) overshoots a full-range step by <= 255/16 ~ 16 levels, which
  only Pillow cuts off, so a pixel next to a saturated edge may differ by <= 16 more: max 18.
  The mean is rounding: two roundings of values <= ~0.6 apart average well under 0.5 level,
  and the clipped pixels are few. Photos (skimage.data, three sizes) measured max 5, mean 0.13.
  A one-pixel crop offset or a non-antialiased resize moves the mean by whole levels.
"""

from __future__ import annotations

import numpy as np
import torch

EMBED_REL = 2e-6
PREPROC_ATOL = 1e-5
DEVICE_DECODE_MAX_LEVELS = 18
DEVICE_DECODE_MEAN_LEVELS = 0.5


def _as_2d(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(torch.float64).cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    return a.reshape(1, -1) if a.ndim == 1 else a.reshape(-1, a.shape[-1])


def embed_rel_err(got, want) -> float:
    """max over rows of max |got - want| / ||want|| (rows: the last axis is the embedding)."""
    g, w = _as_2d(got), _as_2d(want)
    assert g.shape == w.shape, f"shapes differ: {g.shape} vs {w.shape}"
    norm = np.linalg.norm(w, axis=1)
    assert (norm > 0).all(), "reference row of norm 0: compare with an absolute bound"
    return float((np.abs(g - w).max(axis=1) / norm).max())


def assert_embeddings_close(got, want, what: str = "", rel: float = EMBED_REL) -> None:
    """`got` equals `want` up to float32 reordering of sums (see EMBED_REL)."""
    err = embed_rel_err(got, want)
    assert err <= rel, f"{what or 'embeddings'}: max |diff| / norm = {err:.3g} > {rel:g}"


def assert_inputs_close(got, want, what: str = "", atol: float = PREPROC_ATOL) -> None:
    """Model inputs equal up to a few float32 roundings (see PREPROC_ATOL)."""
    g = torch.as_tensor(got, dtype=torch.float32)
    w = torch.as_tensor(want, dtype=torch.float32)
    assert g.shape == w.shape, f"{what}: shapes differ: {tuple(g.shape)} vs {tuple(w.shape)}"
    err = (g - w).abs().max().item() if g.numel() else 0.0
    assert err <= atol, f"{what or 'inputs'}: max abs diff {err:.3g} > {atol:g}"
