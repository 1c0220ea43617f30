"""Import the reference ImageBind model (imagebind-unofficial 0.1.1) on current libraries.

The reference package's `__init__` imports its data module, which imports pytorchvideo (broken on
torchvision >= 0.17) and pkg_resources (gone from setuptools >= 82). The model code needs neither:
if the plain import fails, a placeholder data module is registered for the duration of the import
only, so a later real import of `imagebind.data` (the preprocessing parity tests) still works.
"""

from __future__ import annotations

import sys
import types

import torch

from imagebind_core.config import TINY_REFERENCE_KWARGS


def import_reference_model() -> types.ModuleType:
    try:
        from imagebind.models import imagebind_model

        return imagebind_model
    except ImportError:
        pass
    placeholder = types.ModuleType("imagebind.data")
    sys.modules["imagebind.data"] = placeholder
    try:
        from imagebind.models import imagebind_model
    finally:
        if sys.modules.get("imagebind.data") is placeholder:
            del sys.modules["imagebind.data"]
    return imagebind_model


def build_reference(seed: int = 0, **kwargs) -> torch.nn.Module:
    """The reference model with seeded random weights, in eval mode (mandatory: drop path)."""
    ref = import_reference_model()
    torch.manual_seed(seed)
    model = ref.ImageBindModel(**kwargs).eval()
    # Non-trivial values for everything the reference initialises to constants (LayerNorm
    # affine, biases, logit scales), so the parity test exercises every weight.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "pre_transformer_layer" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("log_logit_scale"):
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return model


def build_reference_tiny(seed: int = 0, tmp_path=None):
    """(reference tiny model, our tiny model loaded from the reference's state dict through
    `imagebind_core.load_model`). `tmp_path` is where the checkpoint file is written."""
    import tempfile

    import imagebind_core as ibc

    ref = build_reference(seed, **TINY_REFERENCE_KWARGS)
    path = f"{tmp_path or tempfile.mkdtemp()}/reference_tiny_{seed}.pth"
    torch.save(ref.state_dict(), path)
    ours = ibc.load_model(path, preset="tiny", device="cpu")
    return ref, ours
