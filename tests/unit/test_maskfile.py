"""The private key file: packbits layout, 0600, hash verification (tensors, rho and the W0 seed), no silent
overwrite, v1 files still load, and the write never follows a link planted at its temp name."""

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
    assert meta == {"rho": 0.5, "sha256": digest, "w0_seed": None, "format": "pmp-mask-v2"}
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


SECRET = (1 << 127) + 12345  # a 128-bit seed: more than a float or an int64 holds


def test_key_holds_the_w0_seed_under_the_hash(tmp_path, masks):
    path = tmp_path / "key.safetensors"
    digest = maskfile.save(masks, path, rho=0.5, w0_seed=SECRET)
    loaded, meta = maskfile.load(path)
    assert meta == {"rho": 0.5, "sha256": digest, "w0_seed": SECRET, "format": "pmp-mask-v2"}
    assert maskfile.is_key_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta_raw = f.metadata()
    raw = load_file(str(path))
    for key, value in (("w0_seed", str(SECRET + 1)), ("rho", "0.9")):  # a changed scalar fails the hash
        save_file(raw, str(path), metadata={**meta_raw, key: value})
        with pytest.raises(ValueError, match="sha256"):
            maskfile.load(path)
    with pytest.raises(ValueError, match="w0_seed"):
        maskfile.save(masks, tmp_path / "bad.safetensors", rho=0.5, w0_seed=-1)


def test_v1_key_without_seed_still_loads(tmp_path, masks):
    import hashlib
    import json

    packed = {n: np.packbits(m.numpy().reshape(-1)) for n, m in masks.items()}
    h = hashlib.sha256()
    for name in sorted(packed):
        h.update(name.encode())
        h.update(json.dumps(list(masks[name].shape)).encode())
        h.update(packed[name].tobytes())
    meta = {n: json.dumps(list(m.shape)) for n, m in masks.items()}
    meta.update(rho="0.5", sha256=h.hexdigest(), format="pmp-mask-v1")
    path = tmp_path / "v1.safetensors"
    save_file(packed, str(path), metadata=meta)
    loaded, info = maskfile.load(path)
    assert info["w0_seed"] is None and info["format"] == "pmp-mask-v1" and info["sha256"] == h.hexdigest()
    assert all(torch.equal(loaded[n], m) for n, m in masks.items())


def test_export_never_follows_a_link_planted_at_a_temp_name(tmp_path, masks, monkeypatch):
    """The old writer opened ``.NAME.tmp`` with O_TRUNC (following a symlink there), then chmodded it: a
    link planted there truncated and chmodded its target. Now the temp file is O_EXCL|O_NOFOLLOW."""
    import os

    from pmp_megatron import atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o644)
    out = tmp_path / "private"
    out.mkdir()
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: "0" * (2 * n))
    for name in (".mask.safetensors.tmp", f".mask.safetensors.{'0' * 16}.tmp"):
        os.symlink(victim, out / name)
    with pytest.raises(FileExistsError):  # the predictable temp name is taken: refuse, never follow
        maskfile.save(masks, out / "mask.safetensors", rho=0.5, w0_seed=1)
    monkeypatch.undo()
    maskfile.save(masks, out / "mask.safetensors", rho=0.5, w0_seed=1)
    assert victim.read_text() == "precious" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert maskfile.load(out / "mask.safetensors")[1]["w0_seed"] == 1
    assert not maskfile.is_key_file(victim)
