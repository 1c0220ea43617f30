"""Checkpoint loading: key map over the full huge inventory (on meta tensors), fsspec sources
(local, file://, s3:// over moto's HTTP server), sha256, unsafe/corrupt/foreign files."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from numerics import assert_embeddings_close
from reference_shim import build_reference

import imagebind_core as ibc
from imagebind_core import checkpoint as ckpt
from imagebind_core.checkpoint import RandomWeightsWarning, map_reference_key
from imagebind_core.config import TINY_REFERENCE_KWARGS
from imagebind_core.model import ImageBindModel, init_random_weights

INVENTORY = Path(__file__).parent / "data" / "reference-huge-state-dict.tsv"


def huge_inventory() -> dict[str, torch.Tensor]:
    """The published checkpoint's 1,311 keys as meta tensors (no 4.8 GB needed)."""
    rows = INVENTORY.read_text().strip().splitlines()[1:]
    out = {}
    for row in rows:
        key, shape, _dtype, _kind = row.split("\t")
        dims = [int(d) for d in shape.strip("[]").split(",") if d.strip()]
        out[key] = torch.empty(dims, device="meta")
    return out


@pytest.fixture(scope="module")
def huge_meta():
    return ibc.build_model("huge", device="meta")


def test_huge_inventory_maps_key_for_key(huge_meta):
    inv = huge_inventory()
    assert len(inv) == 1311
    mapped = ibc.map_reference_state_dict(inv, huge_meta)
    # Everything but the causal-mask buffer lands, and nothing is left out.
    assert len(mapped) == 1310
    assert set(mapped) == set(huge_meta.state_dict())
    assert sum(t.numel() for t in mapped.values()) == 1_200_781_057 + 4  # params + 4 scales


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ("remove", "missing key(s): encoders.vision.trunk.blocks.7.mlp.fc1.weight"),
        ("rename", "unknown key(s): modality_trunks.vision.blocks.7.mlp.fc9.weight"),
        ("reshape", "encoders.vision.trunk.blocks.7.mlp.fc1.weight: checkpoint (5120, 1279)"),
    ],
)
def test_huge_inventory_with_one_bad_key_is_rejected_naming_it(huge_meta, edit, needle):
    inv = huge_inventory()
    key = "modality_trunks.vision.blocks.7.mlp.fc1.weight"
    t = inv.pop(key)
    if edit == "rename":
        inv[key.replace("fc1", "fc9")] = t
    elif edit == "reshape":
        inv[key] = torch.empty(5120, 1279, device="meta")
    with pytest.raises(ibc.CheckpointError) as e:
        ibc.map_reference_state_dict(inv, huge_meta)
    assert needle in str(e.value)


def test_subset_mapping_never_touches_other_modalities():
    text_only = ibc.build_model("huge", modalities=["text"], device="meta")
    mapped = ibc.map_reference_state_dict(huge_inventory(), text_only)
    assert mapped and all(k.startswith("encoders.text.") for k in mapped)
    assert map_reference_key("modality_heads.imu.3.weight") == "encoders.imu.head.proj.weight"
    assert map_reference_key("modality_preprocessors.text.mask") is None


def test_huge_builds_on_meta_with_published_parameter_counts(huge_meta):
    counts = {m: sum(p.numel() for p in enc.parameters()) for m, enc in huge_meta.encoders.items()}
    assert counts["vision"] == 632_829_440
    assert counts["text"] == 354_032_641 - 1  # the reference's learnable text scale: a buffer
    assert counts["audio"] == 86_235_648
    assert counts["depth"] == 21_871_872
    assert counts["thermal"] == 86_211_072
    assert counts["imu"] == 19_600_384


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    ref = build_reference(0, **TINY_REFERENCE_KWARGS)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(ref.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ref, path, digest


def _text_batch():
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[:, 0], ids[0, 1:4], ids[0, 4], ids[1, 1:9], ids[1, 9] = 49406, 7, 49407, 11, 49407
    return ids


def _same_text_output(model, ref) -> None:
    ids = _text_batch()
    with torch.no_grad():
        assert_embeddings_close(model({"text": ids})["text"], ref({"text": ids})["text"])


def test_load_from_file_url_with_sha256(tiny_checkpoint, tmp_path):
    ref, path, digest = tiny_checkpoint
    model = ibc.load_model(
        f"file://{path}", preset="tiny", sha256=digest, cache_dir=str(tmp_path), device="cpu"
    )
    assert model.checkpoint_sha256 == digest
    assert model.lineage()["checkpoint_sha256"] == digest
    _same_text_output(model, ref)


def test_load_from_s3_over_http(tiny_checkpoint, s3_server, tmp_path):
    ref, path, digest = tiny_checkpoint
    bucket = s3_server.create_bucket("weights")
    s3_server.client().upload_file(str(path), bucket, "models/tiny.pth")
    uri = f"s3://{bucket}/models/tiny.pth"
    cache = tmp_path / "cache"
    model = ibc.load_model(
        uri,
        preset="tiny",
        modalities=["text"],
        sha256=digest,
        storage_options=s3_server.storage_options,
        cache_dir=str(cache),
        device="cpu",
    )
    _same_text_output(model, ref)
    # Only the requested modality was materialised.
    assert model.modalities == (ibc.Modality.TEXT,)
    assert all(k.startswith("encoders.text.") for k in model.state_dict())
    # Streamed into the cache, complete, no partial files left behind.
    cached = [p for p in cache.iterdir() if p.name.endswith("tiny.pth")]
    assert len(cached) == 1 and cached[0].stat().st_size == path.stat().st_size
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]
    # A second load is served from the cache (the object could be gone now).
    s3_server.client().delete_object(Bucket=bucket, Key="models/tiny.pth")
    s3_server.client().put_object(Bucket=bucket, Key="models/tiny.pth", Body=path.read_bytes())
    again = ibc.load_model(
        uri, preset="tiny", modalities=["text"], sha256=digest,
        storage_options=s3_server.storage_options, cache_dir=str(cache), device="cpu",
    )  # fmt: skip
    _same_text_output(again, ref)


def test_sha256_mismatch_is_rejected(tiny_checkpoint, tmp_path):
    _, path, _ = tiny_checkpoint
    with pytest.raises(ibc.CheckpointError, match="sha256 mismatch"):
        ibc.load_model(str(path), preset="tiny", sha256="0" * 64, cache_dir=str(tmp_path))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/imagebind_ray_pwned",))


def test_pinned_sha256_is_checked_against_the_bytes_not_size_and_mtime(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """The digest cache must not vouch for a different file of the same size whose mtime was
    put back: the pinned digest is what the lineage reports as loaded."""
    _, path, digest = tiny_checkpoint
    local = tmp_path / "model.pth"
    local.write_bytes(path.read_bytes())
    cache = str(tmp_path / "cache")
    ckpt.fetch_checkpoint(str(local), sha256=digest, cache_dir=cache)  # hashed and recorded
    st = local.stat()
    other = bytearray(local.read_bytes())
    other[len(other) // 2] ^= 0xFF  # one flipped byte inside a tensor: same size, still loads
    time.sleep(0.05)  # ctime is kept at a coarse tick on some filesystems
    local.write_bytes(bytes(other))
    os.utime(local, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert local.stat().st_size == st.st_size and local.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ibc.CheckpointError, match="sha256 mismatch"):
        ibc.load_model(str(local), preset="tiny", sha256=digest, cache_dir=cache)
    # Unpinned, the lineage names the digest of the bytes loaded, not the cached one.
    model = ibc.load_model(str(local), preset="tiny", modalities=["text"], cache_dir=cache)
    assert model.checkpoint_sha256 == hashlib.sha256(other).hexdigest() != digest
    # An unchanged file is not hashed again (the cache still works).
    calls = []
    real = ckpt._sha256_file
    monkeypatch.setattr(ckpt, "_sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    ckpt.fetch_checkpoint(str(local), cache_dir=cache)
    assert calls == []


def test_compressed_zip_entries_load_the_right_weights(tiny_checkpoint, tmp_path):
    """A checkpoint re-zipped with deflate (not what torch.save writes): memory-mapping would
    map compressed bytes as tensors; it is read without mmap and gives the same weights."""
    _, path, _ = tiny_checkpoint
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(path) as zi, zipfile.ZipFile(deflated, "w") as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info), compress_type=zipfile.ZIP_DEFLATED)
    model = ibc.load_model(str(deflated), preset="tiny", cache_dir=str(tmp_path), device="cpu")
    plain = ibc.load_model(str(path), preset="tiny", cache_dir=str(tmp_path), device="cpu")
    for (k, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_pickle_that_would_execute_code_is_refused(tmp_path):
    marker = Path("/tmp/imagebind_ray_pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    torch.save({"modality_heads.imu.3.weight": torch.zeros(1), "x": _Exploit()}, path)
    with pytest.raises(ibc.CheckpointError, match="weights_only"):
        ibc.load_model(str(path), preset="tiny", cache_dir=str(tmp_path))
    # The legacy (non-zip) pickle format is refused the same way.
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as f:
        pickle.dump(_Exploit(), f)
    with pytest.raises(ibc.CheckpointError):
        ibc.load_model(str(legacy), preset="tiny", cache_dir=str(tmp_path))
    assert not marker.exists()


def test_truncated_checkpoint_gets_a_clear_error(tiny_checkpoint, tmp_path):
    _, path, _ = tiny_checkpoint
    cut = tmp_path / "cut.pth"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ibc.CheckpointError, match="truncated or corrupt"):
        ibc.load_model(str(cut), preset="tiny", cache_dir=str(tmp_path))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n" * 10, b"PK\x03\x04junk"])
def test_foreign_or_empty_file_gets_a_clear_error(tmp_path, content):
    path = tmp_path / "foreign.pth"
    path.write_bytes(content)
    with pytest.raises(ibc.CheckpointError, match=r"foreign\.pth"):
        ibc.load_model(str(path), preset="tiny", cache_dir=str(tmp_path))


def test_non_state_dict_payload_and_wrong_preset_are_reported(tiny_checkpoint, tmp_path):
    p = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], p)
    with pytest.raises(ibc.CheckpointError, match="not a state dict"):
        ibc.load_model(str(p), preset="tiny", cache_dir=str(tmp_path))
    _, path, _ = tiny_checkpoint
    with pytest.raises(ibc.CheckpointError, match="mis-shaped key"):
        ibc.load_model(str(path), preset="huge", modalities=["depth"], cache_dir=str(tmp_path))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ibc.CheckpointError, match="not found"):
        ibc.load_model(str(tmp_path / "nope.pth"), preset="tiny", cache_dir=str(tmp_path))


def test_random_weights_are_explicit_and_deterministic():
    with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):
        a = ibc.load_model(None, preset="tiny", device="cpu")
    assert a.checkpoint_sha256 == "random" and a.lineage()["checkpoint"] == "random"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        b = ibc.load_model(None, preset="tiny", modalities=["text", "imu"], device="cpu")
        c = ibc.load_model(None, preset="tiny", seed=1, device="cpu")
    # Same seed: same weights, whichever subset of modalities is built.
    for k, v in b.state_dict().items():
        assert torch.equal(v, a.state_dict()[k]), k
    assert not torch.equal(c.state_dict()["encoders.text.head.proj.weight"],
                           a.state_dict()["encoders.text.head.proj.weight"])  # fmt: skip


def test_building_a_model_skips_torch_default_init(tiny_checkpoint, tmp_path):
    """Every encoder actor and replica builds its model at start-up. Torch's own module init is
    wasted work here (weights come from a checkpoint or `init_random_weights`) and, on meta
    tensors, imports torch._dynamo and sympy (1-1.5 s per process): it must not run."""
    _, path, _ = tiny_checkpoint
    code = (
        "import sys, warnings; warnings.simplefilter('ignore')\n"
        "import imagebind_core as ibc\n"
        "ibc.load_model(None, 'tiny', device='cpu')\n"
        f"ibc.load_model({str(path)!r}, 'tiny', device='cpu')\n"
        "ibc.build_model('huge', device='meta')\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    # ... and a module built that way is the same model as torch-initialised-then-overwritten.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        a = ibc.load_model(None, preset="tiny", device="cpu")
    b = ImageBindModel(ibc.get_config("tiny"))  # torch's default init, on CPU
    init_random_weights(b, seed=0)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_bfloat16_on_cpu_is_close_to_float32():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        f32 = ibc.load_model(None, preset="tiny", device="cpu")
        bf16 = ibc.load_model(None, preset="tiny", device="cpu", dtype="bfloat16")
    x = {"vision": torch.randn(2, 3, 224, 224), "text": _text_batch()}
    with torch.no_grad():
        a, b = f32(x, normalize=True), bf16(x, normalize=True)
    for m in x:
        assert b[m].dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a[m], b[m]).min() >= 0.99
    with pytest.raises(ValueError, match="CUDA only"):
        ibc.load_model(None, preset="tiny", device="cpu", dtype="float16")


def test_dtype_auto_picks_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    import imagebind_core.checkpoint as C

    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert C.auto_dtype("cpu") == "float32" and C.auto_dtype("cuda") == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        assert ibc.load_model(None, "tiny", ["text"], "cpu", "auto").dtype == torch.float32
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
        assert C.auto_dtype("cpu") == "bfloat16"
        model = ibc.load_model(None, "tiny", ["text"], "cpu", "auto")
    assert model.dtype == torch.bfloat16 and model.lineage()["dtype"] == "bfloat16"


def test_bad_inputs_to_forward_are_explained():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = ibc.load_model(None, preset="tiny", modalities=["text"], device="cpu")
    with pytest.raises(ValueError, match="not loaded"):
        model({"vision": torch.zeros(1, 3, 224, 224)})
    with pytest.raises(ValueError, match="unexpected input shape"):
        model({"text": torch.zeros(77, dtype=torch.long)})
    with pytest.raises(TypeError, match="expected a tensor"):
        model({"text": None})
    with pytest.raises(ValueError, match="unknown preset"):
        ibc.load_model(None, preset="gigantic")
