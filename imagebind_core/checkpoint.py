"""Checkpoints: fetch (any fsspec URL) -> sha256 -> local cache -> safe load -> key map -> model.

- Only `torch.load(..., weights_only=True)`: no code path unpickles arbitrary objects.
- The published `imagebind_huge.pth` layout (the reference's key names) is mapped onto ours
  through one explicit table; every unknown, missing or mis-shaped key is reported at once.
- Only the requested modalities' weights are materialised.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from imagebind_core.config import ImageBindConfig, get_config
from imagebind_core.errors import CheckpointError
from imagebind_core.io import (
    StorageOptions,
    file_lock,
    filesystem,
    local_cache_dir,
    protocol_of,
    write_atomic,
)
from imagebind_core.kinds import Modality
from imagebind_core.model import ImageBindModel, build_model

log = logging.getLogger(__name__)

_M = r"(vision|text|audio|depth|thermal|imu)"
_BLOCK_LEAF = (
    r"attn\.in_proj_weight|attn\.in_proj_bias|attn\.bias_k|attn\.bias_v|attn\.out_proj\.weight"
    r"|attn\.out_proj\.bias|norm_1\.weight|norm_1\.bias|norm_2\.weight|norm_2\.bias"
    r"|mlp\.fc1\.weight|mlp\.fc1\.bias|mlp\.fc2\.weight|mlp\.fc2\.bias"
)

# Reference key pattern -> our key (relative to `encoders.`). First match wins.
REFERENCE_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"modality_preprocessors\.vision\.rgbt_stem\.proj\.1\.weight", r"vision.stem.proj.weight"),
    (rf"modality_preprocessors\.{_M}\.cls_token", r"\1.stem.cls_token"),
    (rf"modality_preprocessors\.{_M}\.pos_embedding_helper\.pos_embed", r"\1.stem.pos_embed"),
    (r"modality_preprocessors\.(text|imu)\.pos_embed", r"\1.stem.pos_embed"),
    (r"modality_preprocessors\.text\.token_embedding\.weight", r"text.stem.token_embedding.weight"),
    (r"modality_preprocessors\.(audio|thermal)\.rgbt_stem\.proj\.weight", r"\1.stem.proj.weight"),
    (r"modality_preprocessors\.depth\.depth_stem\.proj\.weight", r"depth.stem.proj.weight"),
    (r"modality_preprocessors\.imu\.imu_stem\.proj\.weight", r"imu.stem.proj.weight"),
    (
        r"modality_preprocessors\.(audio|thermal|depth|imu)\.(?:rgbt|depth|imu)_stem"
        r"\.norm_layer\.(weight|bias)",
        r"\1.stem.norm.\2",
    ),
    (
        r"modality_trunks\.vision\.pre_transformer_layer\.0\.(weight|bias)",
        r"vision.trunk.pre_norm.\1",
    ),
    (rf"modality_trunks\.{_M}\.blocks\.(\d+)\.({_BLOCK_LEAF})", r"\1.trunk.blocks.\2.\3"),
    (r"modality_heads\.text\.proj\.0\.(weight|bias)", r"text.head.norm.\1"),
    (r"modality_heads\.text\.proj\.1\.weight", r"text.head.proj.weight"),
    (r"modality_heads\.(vision|audio|depth|thermal|imu)\.0\.(weight|bias)", r"\1.head.norm.\2"),
    (r"modality_heads\.(vision|audio|depth|thermal)\.2\.weight", r"\1.head.proj.weight"),
    (r"modality_heads\.imu\.3\.weight", r"imu.head.proj.weight"),  # index 3: Dropout at 2
    (
        r"modality_postprocessors\.(text|audio|depth|thermal|imu)\.1\.log_logit_scale",
        r"\1.post.log_logit_scale",
    ),
)

# Reference keys we drop on purpose, with the reason.
IGNORED_REFERENCE_KEYS: dict[str, str] = {
    "modality_preprocessors.text.mask": "the causal mask; we use SDPA's is_causal=True",
}

_COMPILED_MAP = tuple((re.compile(p), r) for p, r in REFERENCE_KEY_MAP)


def map_reference_key(key: str) -> str | None:
    """Our key (under `encoders.`) for a reference key, None if ignored; KeyError if unknown."""
    if key in IGNORED_REFERENCE_KEYS:
        return None
    for pat, rep in _COMPILED_MAP:
        m = pat.fullmatch(key)
        if m:
            return "encoders." + m.expand(rep)
    raise KeyError(key)


def _unwrap(obj: object, source: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping) and len(obj) == 1:
        ((k, v),) = obj.items()
        if k in ("model", "state_dict", "module") and isinstance(v, Mapping):
            obj = v
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: not a state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{source}: not a state dict: {len(bad)} entries are not name -> tensor, e.g. {bad[:3]}"
        )
    return obj


def map_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: ImageBindModel
) -> dict[str, torch.Tensor]:
    """Map a reference-layout (or our own layout) state dict onto `model`'s keys.

    Keeps only the modalities `model` holds. Raises CheckpointError listing every unknown,
    missing and mis-shaped key. Works on meta tensors (no memory needed).
    """
    expected = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    native = all(k.startswith("encoders.") for k in state_dict)
    loaded = {m.value for m in model.modalities}
    for key, tensor in state_dict.items():
        if native:
            ours = key
            if key.split(".")[1] not in {m.value for m in Modality}:
                unknown.append(key)
                continue
        else:
            try:
                ours = map_reference_key(key)
            except KeyError:
                unknown.append(key)
                continue
            if ours is None:
                continue
        if ours.split(".")[1] not in loaded:
            continue  # another modality: never materialised
        if ours not in expected:
            unknown.append(key)
            continue
        mapped[ours] = tensor
    missing = sorted(set(expected) - set(mapped))
    mis_shaped = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if unknown or missing or mis_shaped:
        lines = [f"checkpoint does not match the {model.config.name!r} configuration:"]
        if unknown:
            lines.append(f"  {len(unknown)} unknown key(s): " + ", ".join(unknown))
        if missing:
            lines.append(f"  {len(missing)} missing key(s): " + ", ".join(missing))
        if mis_shaped:
            lines.append(f"  {len(mis_shaped)} mis-shaped key(s): " + "; ".join(mis_shaped))
        raise CheckpointError("\n".join(lines))
    return mapped


def _file_signature(path: str) -> str:
    """What identifies one version of a local file's bytes without reading them: device, inode,
    size, mtime and ctime, in nanoseconds. ctime cannot be set from user space (writing the
    file or resetting its mtime with `os.utime` moves it to "now"), so unlike (size, mtime) this
    cannot be forged to pass a different file off as a hashed one."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _cached_digest(digest_file: str, local: str) -> str | None:
    """The digest recorded for `local`, if the record was made for the file as it is now."""
    try:
        digest, _, signature = Path(digest_file).read_text().strip().partition(" ")
    except OSError:
        return None
    return digest if digest and signature == _file_signature(local) else None


def _record_digest(digest_file: str, local: str, digest: str) -> None:
    write_atomic(digest_file, f"{digest} {_file_signature(local)}".encode())


def _sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_digest(actual: str, expected: str | None, uri: str) -> None:
    if expected is not None and actual.lower() != expected.lower():
        raise CheckpointError(
            f"sha256 mismatch for {uri}: expected {expected.lower()}, got {actual}"
        )


def fetch_checkpoint(
    uri: str,
    *,
    sha256: str | None = None,
    storage_options: StorageOptions | None = None,
    cache_dir: str | None = None,
) -> tuple[str, str]:
    """Make `uri` available as a local file; return (local path, sha256 hex digest).

    Local paths are used in place. Remote objects (`s3://`, `https://`, ...) are streamed into
    `cache_dir` (default $IMAGEBIND_CACHE or ~/.cache/imagebind-ray) while hashing, written
    under a temporary name and renamed when complete; a later call reuses the cached copy if
    the remote size/ETag are unchanged. A given `sha256` is verified in every case. Digests
    are cached beside the cache entries and trusted only while the file's device, inode, size,
    mtime and ctime are those it had when it was hashed (see `_file_signature`); otherwise the
    file is hashed again.
    """
    cache_dir = cache_dir or local_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    fs, path, info = _stat(uri, storage_options)
    size = info.get("size")
    tag = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified"))
    key = hashlib.sha256(f"{uri}\0{size}\0{tag}".encode()).hexdigest()[:24]
    base = os.path.basename(path.rstrip("/")) or "checkpoint"
    digest_file = os.path.join(cache_dir, f"{key}.sha256")

    if protocol_of(uri) == "file":
        local = path
        with file_lock(digest_file + ".lock"):
            digest = _cached_digest(digest_file, local)
            if digest is None:
                digest = _sha256_file(local)
                _record_digest(digest_file, local, digest)
        _check_digest(digest, sha256, uri)
        return local, digest

    local = os.path.join(cache_dir, f"{key}-{base}")
    with file_lock(local + ".lock"):
        digest = _cached_digest(digest_file, local) if os.path.exists(local) else None
        if digest is not None:
            _check_digest(digest, sha256, uri)
            return local, digest
        log.info("downloading checkpoint %s -> %s", uri, local)
        digest = _download(fs, path, uri, local, size, sha256, digest_file)
    return local, digest


# What a file `torch.load` reads starts with: torch.save's zip format, or a pickle (the legacy
# format; protocol 2 and later begin with the PROTO opcode).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


def _check_magic(head: bytes, source: str) -> None:
    if not head:
        raise CheckpointError(f"{source}: file is empty")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise CheckpointError(
            f"{source}: not a PyTorch checkpoint (it starts with {head[:8]!r}, neither "
            "torch.save's zip format nor a pickle)"
        )


def check_checkpoint(uri: str, storage_options: StorageOptions | None = None) -> None:
    """Raise `CheckpointError` naming `uri` if it is missing, unreachable, empty or plainly not
    a PyTorch checkpoint, from its metadata and first bytes: what a job checks before it
    starts Ray or writes anything. What it holds is checked where it is loaded."""
    fs, path, info = _stat(uri, storage_options)
    if info.get("type") == "directory":
        raise CheckpointError(f"{uri}: is a folder, not a checkpoint file")
    try:
        with fs.open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {uri}: {e}") from None
    _check_magic(head, uri)


def _stat(uri: str, storage_options: StorageOptions | None) -> tuple[Any, str, dict]:
    """(filesystem, path, fsspec info) of a checkpoint, or `CheckpointError` saying why not."""
    try:
        fs, path = filesystem(uri, storage_options)
        return fs, path, fs.info(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {uri}") from None
    except Exception as e:
        raise CheckpointError(f"cannot reach checkpoint {uri}: {e}") from None


def _download(
    fs: Any,
    path: str,
    uri: str,
    local: str,
    size: int | None,
    sha256: str | None,
    digest_file: str,
) -> str:
    """Stream `uri` to `local` while hashing it: written under a temporary name beside `local`
    and renamed only when complete and (if given) matching `sha256`; the digest is recorded in
    `digest_file` and returned."""
    base = os.path.basename(local)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(local), prefix=f".{base}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, fs.open(path, "rb", block_size=1 << 23) as src:
            while block := src.read(1 << 23):
                h.update(block)
                out.write(block)
        digest = h.hexdigest()
        if size is not None and os.path.getsize(tmp) != size:
            raise CheckpointError(
                f"download of {uri} is incomplete: {os.path.getsize(tmp)} of {size} bytes"
            )
        _check_digest(digest, sha256, uri)
        os.replace(tmp, local)
        _record_digest(digest_file, local, digest)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot download checkpoint {uri}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return digest


def load_checkpoint(path: str, source: str | None = None) -> Mapping[str, torch.Tensor]:
    """Read a state dict from a local file with `weights_only=True` (memory-mapped when the
    file is in the zip format with uncompressed entries, as `torch.save` writes it, so untouched
    modalities are never read into memory; a re-zipped file with compressed entries is read
    whole)."""
    source = source or path
    if not os.path.isfile(path):
        raise CheckpointError(f"{source}: no such file")
    with open(path, "rb") as f:
        _check_magic(f.read(len(_ZIP_MAGIC)), source)
    is_zip = zipfile.is_zipfile(path)
    mmap = is_zip
    if is_zip:
        compressed = _compressed_entries(path, source)
        if compressed:
            # Memory-mapping reads tensor bytes straight from the file: a deflated entry would
            # be mapped as-is (garbage weights or a resize error). Read it normally instead.
            log.warning(
                "%s: %d zip entries are compressed (e.g. %s); loading without mmap, so the "
                "whole checkpoint is read into memory",
                source,
                len(compressed),
                compressed[0],
            )
            mmap = False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # UnpicklingError, RuntimeError from the zip reader, EOFError, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            reason = (
                "refused: the file contains Python objects other than tensors, and it is "
                "only ever loaded with weights_only=True"
            )
        elif is_zip or "zip" in msg.lower() or isinstance(e, EOFError):
            reason = f"truncated or corrupt checkpoint ({msg})"
        else:
            reason = f"not a PyTorch checkpoint ({msg})"
        raise CheckpointError(f"{source}: {reason}") from None
    return _unwrap(obj, source)


def _compressed_entries(path: str, source: str) -> list[str]:
    """Names of the zip entries that are not stored uncompressed (torch.save never compresses;
    a checkpoint re-zipped by another tool may)."""
    try:
        with zipfile.ZipFile(path) as z:
            return [i.filename for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{source}: truncated or corrupt checkpoint ({e})") from None


class RandomWeightsWarning(UserWarning):
    """A model was built with random weights because no checkpoint was given."""


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX-512 BF16).

    Elsewhere (AVX2-only CPUs: most AMD before Zen 4, older Intel) torch emulates bf16 through
    float32 conversions and bfloat16 is slower than float32, not faster.
    """
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def auto_dtype(device: torch.device | str | None) -> str:
    """What `dtype="auto"` means on `device`: bfloat16 on CUDA and on CPUs with hardware bf16
    (`cpu_has_fast_bf16`), float32 on other CPUs. bfloat16 embeddings are within cosine
    0.9999 of float32 ones, not equal: an index keeps one dtype (it is in the lineage)."""
    dev = _resolve_device(device)
    if dev.type == "cuda" or (dev.type == "cpu" and cpu_has_fast_bf16()):
        return "bfloat16"
    return "float32"


def resolve_dtype(
    dtype: torch.dtype | str | None, device: torch.device | str | None = None
) -> torch.dtype:
    """`torch.float32` for None; accepts names like "bfloat16"/"bf16"/"fp16", and "auto"
    (`auto_dtype` of `device`)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return _DTYPES[auto_dtype(device)]
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(_DTYPES)}") from None


def _mapped(
    local: str,
    cfg: ImageBindConfig,
    modalities: Iterable[Modality | str] | None,
    source: str,
) -> tuple[ImageBindModel, dict[str, torch.Tensor]]:
    """A model of `cfg` on the meta device (no memory) and the checkpoint's tensors mapped onto
    its keys (CheckpointError listing what does not match)."""
    state = load_checkpoint(local, source=source)
    model = build_model(cfg, modalities, device="meta", seed=None)
    return model, map_reference_state_dict(state, model)


def verify_checkpoint(
    local: str,
    preset: str | ImageBindConfig,
    modalities: Iterable[Modality | str] | None = None,
    source: str | None = None,
) -> bool:
    """CheckpointError if the local checkpoint file does not hold `modalities` of `preset`
    (unknown, missing or mis-shaped keys; not a state dict). Only a file in torch.save's
    zip format with uncompressed entries is checked, memory-mapped: no tensor is read, so a
    4.5 GB checkpoint costs a second and no memory. Returns False (nothing checked) for
    other files, which would be read whole; loading them checks the same."""
    if not zipfile.is_zipfile(local) or _compressed_entries(local, source or local):
        return False
    _mapped(local, get_config(preset), modalities, source or local)
    return True


def load_model(
    checkpoint: str | None = None,
    preset: str | ImageBindConfig = "huge",
    modalities: Iterable[Modality | str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    sha256: str | None = None,
    storage_options: StorageOptions | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    compile: bool = False,
) -> ImageBindModel:
    """Build an eval-mode ImageBind model, optionally loading published weights.

    Args:
        checkpoint: local path or fsspec URL (`file://`, `s3://`, `https://`) of a state dict
            in the published `imagebind_huge.pth` layout (or this package's own). None builds
            deterministic random weights from `seed` and warns (RandomWeightsWarning); the
            model's `checkpoint_sha256` is then "random".
        preset: "huge" (the published checkpoint), "tiny", "base", or an ImageBindConfig.
        modalities: subset to build and load (default all six); others are never materialised.
        device: "cpu", "cuda", "cuda:1", ... or None/"auto" (CUDA if available, else CPU).
        dtype: float32 (default), bfloat16 (CPU or CUDA), float16 (CUDA only), or "auto"
            (`auto_dtype`: bfloat16 on CUDA and on CPUs with AMX / AVX-512 BF16, else float32).
        sha256: expected digest of the checkpoint file; a mismatch raises CheckpointError.
        storage_options: fsspec options, e.g. `s3_storage_options(endpoint_url=...)`.
        cache_dir: where remote checkpoints are cached.
        compile: wrap each encoder in `torch.compile`.
    """
    cfg = get_config(preset)
    dev = _resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dt == torch.float16 and dev.type != "cuda":
        raise ValueError("float16 is supported on CUDA only; use bfloat16 on CPU")
    if checkpoint is None:
        warnings.warn(
            f"no checkpoint given: building {cfg.name!r} with RANDOM weights (seed={seed}); "
            "embeddings are meaningless except for testing",
            RandomWeightsWarning,
            stacklevel=2,
        )
        model = build_model(cfg, modalities, device=dev, dtype=dt, seed=seed)
        model.checkpoint_sha256 = "random"
        model.checkpoint = None
    else:
        local, digest = fetch_checkpoint(
            checkpoint, sha256=sha256, storage_options=storage_options, cache_dir=cache_dir
        )
        model, mapped = _mapped(local, cfg, modalities, checkpoint)
        model.load_state_dict(mapped, strict=True, assign=True)
        del mapped
        model = model.to(device=dev, dtype=dt).eval().requires_grad_(False)
        model.checkpoint = checkpoint
        model.checkpoint_sha256 = digest
    if compile:
        model.compile()
    return model
