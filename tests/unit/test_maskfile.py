"""The private mask file: packbits layout, 0600, hash verification, no silent overwrite."""

import stat

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from pmp_megatron.pmp import maskfile


@pytest.fixture
def masks():
    gen = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.rand(7, 5, generator=gen) < 0.5,
            "model.norm.weight": torch.rand(5, generator=gen) < 0.5}


def test_round_trip_layout_and_mode(tmp_path, masks):
    path = tmp_path / "mask.safetensors"
    digest = maskfile.save(masks, path, rho=0.5)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = load_file(str(path))
    flat = masks["model.embed_tokens.weight"].numpy().reshape(-1)
    assert np.array_equal(raw["model.embed_tokens.weight"], np.packbits(flat))
    loaded, meta = maskfile.load(path)
    assert meta == {"rho": 0.5, "sha256": digest}
    for n, m in masks.items():
        assert torch.equal(loaded[n], m)


def test_refuses_overwrite_without_force(tmp_path, masks):
    path = tmp_path / "mask.safetensors"
    maskfile.save(masks, path, rho=0.5)
    with pytest.raises(FileExistsError, match="--force"):
        maskfile.save(masks, path, rho=0.5)
    maskfile.save(masks, path, rho=0.9, force=True)
    assert maskfile.load(path)[1]["rho"] == 0.9


def test_tampered_file_is_refused(tmp_path, masks):
    path = tmp_path / "mask.safetensors"
    maskfile.save(masks, path, rho=0.5)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    raw = load_file(str(path))
    raw["model.norm.weight"] = raw["model.norm.weight"] ^ np.uint8(1)  # flip one bit
    save_file(raw, str(path), metadata=meta)
    with pytest.raises(ValueError, match="sha256"):
        maskfile.load(path)


def test_missing_and_corrupted_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        maskfile.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a readable"):
        maskfile.load(bad)
