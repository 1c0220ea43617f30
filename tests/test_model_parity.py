"""Parity with the live reference implementation (imagebind-unofficial 0.1.1), tiny config.

The reference is built with seeded random weights, its state dict is saved with torch.save and
loaded through *our* loader and key map: one test covers the table and the math together.
These tests must run in CI (the reference is installed by `make test`); they are never skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from numerics import EMBED_REL, assert_embeddings_close, embed_rel_err
from reference_shim import build_reference, build_reference_tiny

import imagebind_core as ibc
from imagebind_core.config import TINY_REFERENCE_KWARGS, ImageBindConfig
from imagebind_core.layers import Attention


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_reference_tiny(seed=0, tmp_path=tmp_path_factory.mktemp("ckpt"))


def text_ids(batch: int, eot_positions: list[int], seed: int = 0) -> torch.Tensor:
    """SOT + random BPE ids + EOT at the given index, zero padded (as the tokenizer frames)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    for i, pos in enumerate(eot_positions):
        ids[i, 0] = 49406
        ids[i, 1:pos] = torch.randint(1, 49406, (pos - 1,), generator=g)
        ids[i, pos] = 49407
    return ids


def random_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "vision": torch.randn(3, 3, 224, 224, generator=g),
        "text": text_ids(5, [1, 2, 17, 75, 76], seed),
        "audio": torch.randn(2, 3, 1, 128, 204, generator=g),
        "depth": torch.randn(2, 1, 224, 224, generator=g),
        "thermal": torch.randn(2, 1, 224, 224, generator=g),
        "imu": torch.randn(2, 6, 2000, generator=g),
    }


@torch.no_grad()
def test_every_modality_matches_reference(models):
    ref, ours = models
    x = random_inputs()
    expected = ref(x)
    got = ours(x)
    assert list(got) == list(x)
    for m in x:
        assert got[m].shape == (x[m].shape[0], 32)
        assert_embeddings_close(got[m], expected[m], m)


@torch.no_grad()
def test_video_with_15_clips_matches_reference(models):
    ref, ours = models
    video = torch.randn(2, 15, 3, 2, 224, 224, generator=torch.Generator().manual_seed(3))
    expected = ref({"vision": video})["vision"]
    got = ours({"vision": video})["vision"]
    assert_embeddings_close(got, expected)
    # Clip averaging happens after normalisation, so the norm is below 1 (reference quirk).
    assert (got.norm(dim=-1) < 1).all()


@torch.no_grad()
def test_text_with_literal_end_token_inside_pools_at_first_occurrence(models):
    ref, ours = models
    ids = text_ids(2, [40, 60], seed=5)
    ids[:, 10] = 49407  # a literal <|endoftext|> in user text moves the pooling position
    assert_embeddings_close(ours({"text": ids})["text"], ref({"text": ids})["text"])


@torch.no_grad()
def test_short_texts_run_only_through_the_last_end_token_and_match_reference(models):
    """The causal text trunk lets no token see a later one, and the head reads each row's EOT:
    the model drops the columns after the batch's last EOT (exact), doing a fraction of the
    work for short captions."""
    ref, ours = models
    ids = text_ids(4, [3, 9, 12, 5], seed=7)
    ids[0, 20:30] = 1234  # tokens after an EOT change nothing, whatever they are
    seen = []
    hook = ours.encoders["text"].trunk.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].shape[1])
    )
    try:
        got = ours({"text": ids})["text"]
    finally:
        hook.remove()
    assert seen == [13]
    assert_embeddings_close(got, ref({"text": ids})["text"], "trimmed vs reference")
    full = ours.encoders["text"](ids)  # the untrimmed tower on all 77 columns
    assert_embeddings_close(got, full, "trimmed vs full width")
    assert ibc.text_lengths(ids).tolist() == [4, 10, 13, 6]


@torch.no_grad()
def test_normalize_option_gives_unit_vectors_in_reference_direction(models):
    ref, ours = models
    x = random_inputs(seed=1)
    expected = ref(x)
    got = ours(x, normalize=True)
    for m in x:
        assert torch.allclose(got[m].norm(dim=-1), torch.ones(len(got[m])), atol=1e-6)
        assert_embeddings_close(got[m], F.normalize(expected[m], dim=-1), m)


@torch.no_grad()
def test_batch_invariance(models):
    _, ours = models
    x = random_inputs(seed=2)
    x["vision"] = torch.randn(2, 15, 3, 2, 224, 224)  # clip axis too
    batched = ours(x)
    for m, t in x.items():
        singles = torch.cat([ours({m: t[i : i + 1]})[m] for i in range(len(t))])
        assert_embeddings_close(batched[m], singles, m)


def test_non_default_reference_sizes_build_and_match(tmp_path):
    """Any size the reference constructor accepts can be expressed (here: other kernels,
    strides, mel bins, target length, frame count)."""
    kw = dict(
        TINY_REFERENCE_KWARGS,
        video_frames=4,
        kernel_size=(2, 16, 16),
        audio_kernel_size=12,
        audio_stride=8,
        audio_num_mel_bins=64,
        audio_target_len=100,
        depth_kernel_size=32,
        thermal_kernel_size=8,
        out_embed_dim=24,
    )
    ref = build_reference(7, **kw)
    torch.save(ref.state_dict(), tmp_path / "custom.pth")
    cfg = ImageBindConfig.from_reference_kwargs("custom", **kw)
    ours = ibc.load_model(str(tmp_path / "custom.pth"), preset=cfg, device="cpu")
    g = torch.Generator().manual_seed(0)
    x = {
        "vision": torch.randn(1, 2, 3, 4, 224, 224, generator=g),  # 4-frame clips
        "audio": torch.randn(2, 3, 1, 64, 100, generator=g),
        "depth": torch.randn(2, 1, 224, 224, generator=g),
        "thermal": torch.randn(2, 1, 224, 224, generator=g),
    }
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    for m in x:
        assert_embeddings_close(got[m], expected[m], m)


@torch.no_grad()
def test_off_nominal_image_size_interpolates_positions_like_reference(models):
    ref, ours = models
    x = torch.randn(1, 3, 256, 256)
    assert_embeddings_close(ours({"vision": x})["vision"], ref({"vision": x})["vision"])


# The combinations the reference uses: plain (vision), causal (text), bias_kv (the others).
@pytest.mark.parametrize(("bias_kv", "causal"), [(False, False), (False, True), (True, False)])
@torch.no_grad()
def test_attention_matches_torch_multihead_attention(bias_kv, causal):
    torch.manual_seed(0)
    D, H, L = 32, 4, 9
    mha = torch.nn.MultiheadAttention(D, H, add_bias_kv=bias_kv).eval()
    ours = Attention(D, H, bias_kv=bias_kv, causal=causal)
    ours.load_state_dict(mha.state_dict())
    x = torch.randn(3, L, D)
    mask = torch.full((L, L), float("-inf")).triu(1) if causal else None
    expected = mha(*(x.transpose(0, 1),) * 3, attn_mask=mask, need_weights=False)[0]
    assert torch.allclose(ours(x), expected.transpose(0, 1), atol=1e-6)


@torch.no_grad()
def test_bound_catches_one_perturbed_layernorm_element(models):
    """The parity bound is tight enough for a real bug: 1e-3 added to one element of any one
    LayerNorm weight (the smallest plausible porting slip) moves that encoder's output past
    EMBED_REL, while the unperturbed model stays within it."""
    ref, ours = models
    x = random_inputs(seed=4)
    expected = ref(x)
    norms = [(n, p) for n, p in ours.named_parameters() if "norm" in n and n.endswith("weight")]
    assert len(norms) >= 6 * 3  # every encoder's stem/trunk/head norms are covered
    for name, p in norms:
        kind = name.split(".")[1]
        assert embed_rel_err(ours(x)[kind], expected[kind]) <= EMBED_REL
        p.view(-1)[0] += 1e-3
        try:
            err = embed_rel_err(ours({kind: x[kind]})[kind], expected[kind])
        finally:
            p.view(-1)[0] -= 1e-3
        assert err > EMBED_REL, f"{name}: a 1e-3 slip moved the output by only {err:.2g}"


def test_the_forced_kernel_variant_is_in_force():
    """`make test` reruns this module with ATEN_CPU_CAPABILITY=avx2 (and oneDNN/MKL capped to
    AVX2): that run proves portability only if torch really dispatches to those kernels."""
    want = os.environ.get("ATEN_CPU_CAPABILITY")
    got = torch.backends.cpu.get_cpu_capability()
    assert got in ("DEFAULT", "VSX", "ZVECTOR", "AVX2", "AVX512", "SVE256")
    if want:
        assert got == want.upper(), f"asked for {want}, torch dispatches to {got}"
