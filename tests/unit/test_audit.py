"""The release leakage audit on synthetic tensors: a complement shrunk 100x is recovered by |w| with IoU ~1,
an unshrunk one is not (IoU near chance) -- but the init-regeneration attacker recovers it exactly; a mask
of other tensors is refused by name; the table and the loud warning; W0 regenerates without megatron-core.
``audit_release`` takes the init seed from the key (never writing it), and refuses a key of another run
or a dense release (the owner manifest's records), and a manifest that describes other weights."""

import logging
import subprocess
import sys

import pytest
import torch

from pmp_megatron.release import audit

RHO = 0.3
SHAPES = {
    "model.embed_tokens.weight": (64, 32),
    "model.layers.0.input_layernorm.weight": (32,),
    "model.layers.0.self_attn.q_proj.weight": (32, 32),
    "model.layers.0.self_attn.k_proj.weight": (16, 32),
    "model.layers.0.self_attn.v_proj.weight": (16, 32),
    "model.layers.0.self_attn.o_proj.weight": (32, 32),
    "model.layers.0.post_attention_layernorm.weight": (32,),
    "model.layers.0.mlp.gate_proj.weight": (48, 32),
    "model.layers.0.mlp.up_proj.weight": (48, 32),
    "model.layers.0.mlp.down_proj.weight": (32, 48),
    "model.norm.weight": (32,),
    "lm_head.weight": (64, 32),
}


def _synthetic(shrink: float, seed: int = 0):
    """(released weights, true mask, W0): the masked-in entries moved away from W0 by training, the
    complement is ``W0 / shrink`` (one scale for the whole model, like the projection)."""
    gen = torch.Generator().manual_seed(seed)
    weights, masks, w0 = {}, {}, {}
    for name, shape in SHAPES.items():
        init = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        mask = torch.rand(shape, generator=gen) < RHO
        trained = init + torch.randn(shape, generator=gen) * 0.02
        weights[name] = torch.where(mask, trained, init / shrink)
        masks[name], w0[name] = mask, init
    return weights, masks, w0


def test_tensor_types():
    assert [audit.tensor_type(n) for n in SHAPES] == [
        "embed", "norms", "q", "k", "v", "o", "norms", "gate", "up", "down", "norms", "lm_head"]
    with pytest.raises(ValueError, match="not a parameter"):
        audit.tensor_type("model.layers.0.pmp_mask")


def test_shrunk_complement_is_recovered_by_magnitude(caplog):
    weights, masks, _ = _synthetic(shrink=100.0)
    with caplog.at_level(logging.WARNING):
        report = audit.audit(weights, masks)
    by_magnitude = report["attackers"]["recovery_global"]["iou"]
    assert by_magnitude["overall"] > 0.9
    assert report["attackers"]["recovery_per_tensor"]["iou"]["overall"] > 0.9
    assert set(by_magnitude) == {*audit.TENSOR_TYPES, "overall"}
    assert report["max_iou"] > 0.9 and report["warning"] and "MASK LEAK" in caplog.text
    assert "recovery_init" not in report["attackers"]  # no W0 given
    table = audit.markdown_table(report)
    assert table.splitlines()[0].startswith("| attacker | overall | embed | q |")
    assert "WARNING: MASK LEAK" in table


def test_unshrunk_complement_is_not_recovered_by_magnitude_but_by_init():
    weights, masks, w0 = _synthetic(shrink=1.0)
    report = audit.audit(weights, masks, warn_level=0.5)
    chance = audit.chance_iou(report["mask_density"])
    assert report["chance_iou"] == pytest.approx(chance) and abs(report["mask_density"] - RHO) < 0.02
    for name in ("recovery_global", "recovery_per_tensor"):
        assert report["attackers"][name]["iou"]["overall"] < chance + 0.2, name
    assert report["warning"] is None
    with_init = audit.audit(weights, masks, w0=iter(w0.items()))
    assert with_init["attackers"]["recovery_init"]["iou"]["overall"] == 1.0
    assert with_init["max_iou_attacker"] == "recovery_init" and with_init["warning"]


def test_mask_of_other_tensors_is_refused():
    weights, masks, _ = _synthetic(shrink=100.0)
    masks["model.layers.7.mlp.up_proj.weight"] = masks.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="does not match the release names"):
        audit.audit(weights, masks)
    weights, masks, _ = _synthetic(shrink=100.0)
    masks["model.norm.weight"] = masks["model.norm.weight"][:16]
    with pytest.raises(ValueError, match="model.norm.weight"):
        audit.audit(weights, masks)


def test_regenerating_w0_needs_no_megatron():
    """The init-regeneration attacker (and the audit running it) import torch, not megatron-core."""
    code = ("import sys; import pmp_megatron.model.w0, pmp_megatron.release.recovery, "
            "pmp_megatron.release.audit; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformer_engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# ----------------------------------------------------------------------------- audit_release and the key


def _written_release(tmp_path, seed, source=None, name="rel"):
    """A PMP-like release of a tiny model whose W0 came from ``seed`` (complement 0.5 W0), its mask, and
    its owner manifest recording ``source`` (default: a PMP run with that seed)."""
    from pmp_megatron.config import ModelConfig
    from pmp_megatron.pmp.maskfile import seed_fingerprint
    from pmp_megatron.release import recovery
    from pmp_megatron.release.writer import write_release

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, vocab_size=128, seed=seed)
    gen = torch.Generator().manual_seed(1)
    weights, masks = {}, {}
    for n, w0 in recovery.iter_w0(cfg):
        masks[n] = torch.rand(w0.shape, generator=gen) < RHO
        weights[n] = torch.where(masks[n], w0 + 0.02 * torch.randn(w0.shape, generator=gen), 0.5 * w0)
    if source is None:
        source = {"pmp_mode": "pmp", "has_masks": True, "w0_seed_sha256": seed_fingerprint(seed)}
    out = write_release(weights.items(), tmp_path / name, cfg, "float32", source)
    return out, masks


def test_audit_takes_the_init_seed_from_the_key(tmp_path):
    import json
    import secrets

    from pmp_megatron.pmp import maskfile

    secret = secrets.randbits(128)
    out, masks = _written_release(tmp_path, secret)
    key = tmp_path / "key.safetensors"
    maskfile.save(masks, key, rho=RHO, w0_seed=secret)
    report = audit.audit_release(out, key, seed_guesses=50)
    assert report["init_seed_known"] and report["attackers"]["recovery_init"]["iou"]["overall"] > 0.99
    assert not report["attackers"]["recovery_seed_guess"]["seed_found"]
    assert str(secret) not in json.dumps(report)
    no_init = audit.audit_release(out, key, init_attack=False, seed_guesses=50)
    assert "recovery_init" not in no_init["attackers"] and not no_init["init_seed_known"]
    v1 = tmp_path / "v1.safetensors"  # no seed in the key: no init attacker unless a seed is given
    maskfile.save(masks, v1, rho=RHO)
    assert "recovery_init" not in audit.audit_release(out, v1, seed_guesses=50)["attackers"]
    given = audit.model_config_for_audit(out, secret)
    assert audit.audit_release(out, v1, model_cfg=given, seed_guesses=50)["init_seed_known"]
    with pytest.raises(ValueError, match="given init seed is not the W0 seed in mask file"):
        audit.audit_release(out, key, model_cfg=audit.model_config_for_audit(out, secret + 1))


def test_audit_refuses_a_key_that_does_not_fit_the_release(tmp_path):
    """The audit used to score any key with the right names against any release: the key of another run
    (another W0 seed) and a dense release were audited without a word."""
    from pmp_megatron.pmp import maskfile

    out, masks = _written_release(tmp_path, 11)
    other = tmp_path / "other.safetensors"
    maskfile.save(masks, other, rho=RHO, w0_seed=12)
    with pytest.raises(ValueError, match="key of another run: its W0 seed is not the one of the release"):
        audit.audit_release(out, other)
    dense, _ = _written_release(tmp_path, 11, source={"pmp_mode": "dense", "has_masks": False}, name="dense")
    key = tmp_path / "key.safetensors"
    maskfile.save(masks, key, rho=RHO, w0_seed=11)
    with pytest.raises(ValueError, match="is a dense run"):
        audit.audit_release(dense, key)
    # The owner manifest of the first release beside new weights: it describes another release.
    (out / "model.safetensors").write_bytes((dense / "model.safetensors").read_bytes()[:-4] + b"\0" * 4)
    with pytest.raises(ValueError, match="does not describe the release .*model.safetensors differs"):
        audit.audit_release(out, key)
    with pytest.raises(ValueError, match="has no release_manifest.json"):
        audit.audit_release(dense, key, owner_dir=tmp_path)
