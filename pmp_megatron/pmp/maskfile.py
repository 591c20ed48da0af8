"""The private mask file: the owner's key, kept out of every release.

Format (safetensors): one uint8 tensor per Hugging Face Llama parameter name of the release
(``model.layers.0.self_attn.q_proj.weight``, ...), holding ``numpy.packbits`` of the row-major flattened
bool mask (True = trainable). Metadata: each tensor's shape as JSON under the tensor's name, ``rho``
(the kept fraction), ``format`` and ``sha256`` -- a hash over the names, shapes and packed bytes in name
order. The file is written with mode 0600, never overwritten unless asked, and a loaded file whose hash
does not match is refused (tampered or corrupted).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

FORMAT = "pmp-mask-v1"
_RESERVED = {"rho", "sha256", "format"}


def _digest(packed: dict[str, np.ndarray], shapes: dict[str, list[int]]) -> str:
    h = hashlib.sha256()
    for name in sorted(packed):
        h.update(name.encode())
        h.update(json.dumps(shapes[name]).encode())
        h.update(packed[name].tobytes())
    return h.hexdigest()


def save(masks: dict[str, torch.Tensor], path: str | os.PathLike, rho: float, force: bool = False) -> str:
    """Write ``masks`` (HF name -> bool tensor) to ``path`` (mode 0600); return the sha256."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; refusing to overwrite a private mask (use --force)")
    if _RESERVED & set(masks):
        raise ValueError(f"mask names collide with reserved metadata keys {_RESERVED & set(masks)}")
    packed = {n: np.packbits(m.detach().cpu().to(torch.bool).numpy().reshape(-1)) for n, m in masks.items()}
    shapes = {n: list(m.shape) for n, m in masks.items()}
    digest = _digest(packed, shapes)
    meta = {n: json.dumps(s) for n, s in shapes.items()}
    meta.update(rho=repr(float(rho)), sha256=digest, format=FORMAT)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    os.chmod(tmp, 0o600)
    save_file(packed, str(tmp), metadata=meta)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return digest


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a mask file; return (HF name -> bool tensor, {"rho", "sha256"})."""
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
    if meta.get("format") != FORMAT:
        raise ValueError(f"mask file {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    shapes = {n: json.loads(meta[n]) for n in packed}
    if _digest(packed, shapes) != meta.get("sha256"):
        raise ValueError(f"mask file {path} failed its sha256 check: it was modified or corrupted")
    masks = {}
    for n, bits in packed.items():
        numel = int(np.prod(shapes[n]))
        masks[n] = torch.from_numpy(np.unpackbits(bits, count=numel).astype(bool)).reshape(shapes[n])
    return masks, {"rho": float(meta["rho"]), "sha256": meta["sha256"]}
