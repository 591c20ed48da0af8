"""The private key file: the mask AND the W0 seed, the owner's secret, kept out of every release.

Format ``pmp-mask-v2`` (safetensors): one uint8 tensor per Hugging Face Llama parameter name of the
release (``model.layers.0.self_attn.q_proj.weight``, ...), holding ``numpy.packbits`` of the row-major
flattened bool mask (True = trainable). Metadata: each tensor's shape as JSON under the tensor's name,
``rho`` (the kept fraction), ``w0_seed`` (the seed W0 was drawn from, as a decimal string; absent when not
known), ``format`` and ``sha256`` -- a hash over the names, shapes and packed bytes in name order, then the
format, ``rho`` and ``w0_seed``. Whoever holds the seed regenerates W0 and with it the mask of a release
(``release.recovery``), so the seed is as secret as the mask.

The file is written with mode 0600 through a fresh ``O_EXCL | O_NOFOLLOW`` temp file renamed into place
(``atomic``: nothing planted at a temp name is followed), never overwritten unless asked, and a loaded file
whose hash does not match is refused (tampered or corrupted). ``pmp-mask-v1`` files (no seed, a hash over
the tensors only) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from pmp_megatron.atomic import write_bytes_atomic

FORMAT = "pmp-mask-v2"
_V1 = "pmp-mask-v1"
_RESERVED = {"rho", "sha256", "format", "w0_seed"}


def _digest(packed: dict[str, np.ndarray], shapes: dict[str, list[int]], fmt: str, rho: str = "",
            w0_seed: str = "") -> str:
    h = hashlib.sha256()
    for name in sorted(packed):
        h.update(name.encode())
        h.update(json.dumps(shapes[name]).encode())
        h.update(packed[name].tobytes())
    if fmt != _V1:  # v2 covers the scalars too: a changed seed or rho fails the check like a flipped bit
        h.update(f"\0format={fmt}\0rho={rho}\0w0_seed={w0_seed}".encode())
    return h.hexdigest()


def _parse_seed(text: str, path: Path) -> int:
    try:
        seed = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise ValueError(f"mask file {path} has an unreadable w0_seed {text[:20]!r}") from None
    if seed < 0:
        raise ValueError(f"mask file {path} has a negative w0_seed")
    return seed


def save(masks: dict[str, torch.Tensor], path: str | os.PathLike, rho: float, w0_seed: int | None = None,
         force: bool = False) -> str:
    """Write the key: ``masks`` (HF name -> bool tensor) and ``w0_seed`` to ``path`` (mode 0600); return its
    sha256."""
    from safetensors.numpy import save as to_bytes

    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; refusing to overwrite a private mask (use --force)")
    if _RESERVED & set(masks):
        raise ValueError(f"mask names collide with reserved metadata keys {_RESERVED & set(masks)}")
    if w0_seed is not None and (isinstance(w0_seed, bool) or not isinstance(w0_seed, int) or w0_seed < 0):
        raise ValueError(f"w0_seed must be a non-negative integer or None, got a {type(w0_seed).__name__}")
    packed = {n: np.packbits(m.detach().cpu().to(torch.bool).numpy().reshape(-1)) for n, m in masks.items()}
    shapes = {n: list(m.shape) for n, m in masks.items()}
    rho_text = repr(float(rho))
    seed_text = "" if w0_seed is None else str(w0_seed)
    digest = _digest(packed, shapes, FORMAT, rho_text, seed_text)
    meta = {n: json.dumps(s) for n, s in shapes.items()}
    meta.update(rho=rho_text, sha256=digest, format=FORMAT)
    if w0_seed is not None:
        meta["w0_seed"] = seed_text
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, to_bytes(packed, metadata=meta), mode=0o600)
    return digest


def seed_fingerprint(w0_seed: int) -> str:
    """A one-way tag of a W0 seed (sha256), for the owner's release manifest: it lets the audit tell whether
    a key belongs to a release without storing the seed there."""
    return hashlib.sha256(f"pmp-w0-seed:{w0_seed}".encode()).hexdigest()


def is_key_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file with a ``pmp-mask`` format tag (a private key); reads the
    header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            fmt = (f.metadata() or {}).get("format", "")
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not a key
        return False
    return fmt.startswith("pmp-mask")


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a key file; return (HF name -> bool tensor, {"rho", "sha256", "w0_seed", "format"});
    ``w0_seed`` is None for a v1 file or a key written without it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            packed = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupted file
        raise ValueError(f"mask file {path} is not a readable safetensors file: {e}") from e
    fmt = meta.get("format")
    if fmt not in (FORMAT, _V1):
        raise ValueError(f"mask file {path} has format {fmt!r}, expected {FORMAT!r} (or {_V1!r})")
    try:
        shapes = {n: json.loads(meta[n]) for n in packed}
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"mask file {path} lacks a tensor shape: it was modified or corrupted") from None
    seed_text = meta.get("w0_seed", "")
    if _digest(packed, shapes, fmt, meta.get("rho", ""), seed_text) != meta.get("sha256"):
        raise ValueError(f"mask file {path} failed its sha256 check: it was modified or corrupted")
    masks = {}
    for n, bits in packed.items():
        numel = int(np.prod(shapes[n]))
        masks[n] = torch.from_numpy(np.unpackbits(bits, count=numel).astype(bool)).reshape(shapes[n])
    seed = _parse_seed(seed_text, path) if seed_text else None
    return masks, {"rho": float(meta["rho"]), "sha256": meta["sha256"], "w0_seed": seed, "format": fmt}
