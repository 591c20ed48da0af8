"""The W0 seed is part of the key: a release whose W0 came from a small public seed gives its mask away to
an attacker who merely guesses seeds (0..10^4 and the repo's recipe seeds), one drawn from a 128-bit secret
does not (IoU at chance). The "release" is built in-process: W0 from ``model.w0``, a random rho-mask, the
kept entries perturbed, the complement shrunk to 0.01 W0 (the projection's doing)."""

import json
import secrets

import pytest
import torch

from pmp_megatron.config import ModelConfig
from pmp_megatron.model.w0 import w0_tensor
from pmp_megatron.release import audit, recovery

RHO = 0.5
PUBLIC_SEED = 7
MARGIN = 0.02


def _arch(seed=None) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=128, vocab_size=256, seed=seed, untie_embeddings=True)


def _release(seed: int):
    """(released HF weights, true mask) of a PMP-like model whose W0 came from ``seed``."""
    gen = torch.Generator().manual_seed(0)
    weights, masks = {}, {}
    for name, w0 in recovery.iter_w0(_arch(seed)):
        mask = torch.rand(w0.shape, generator=gen) < RHO
        trained = w0 + 0.02 * torch.randn(w0.shape, generator=gen)
        weights[name], masks[name] = torch.where(mask, trained, 0.01 * w0), mask
    return weights, masks


def _guess(weights, candidates=None):
    return recovery.recover("recovery_seed_guess", weights, model_cfg=_arch(),
                            candidates=recovery.seed_candidates() if candidates is None else candidates)


def test_probe_draw_is_the_prefix_of_w0():
    """Seed guessing draws only a prefix of one tensor; torch must fill it like the full W0 draw."""
    name = recovery._PROBE[0]
    for numel_shape in ((64, 64), (37, 53), (256, 2048)):
        full = w0_tensor(name, numel_shape, PUBLIC_SEED, 1.0).reshape(-1)
        n = recovery.probe_length(full.numel())
        assert n >= 256 and torch.equal(recovery.probe_w0(PUBLIC_SEED, name, n), full[:n]), numel_shape


def test_public_small_seed_gives_the_mask_away():
    weights, masks = _release(PUBLIC_SEED)
    recovered, info = _guess(weights)
    assert info["seed_found"] and info["seed_z"] > 20 and info["num_guesses"] >= 10_001
    assert recovery.iou(recovered, masks) > 0.99


def test_secret_128_bit_seed_leaves_the_guess_at_chance():
    secret = secrets.randbits(128) | (1 << 127)
    weights, masks = _release(secret)
    recovered, info = _guess(weights)
    assert not info["seed_found"] and info["seed_z"] < recovery.SEED_FOUND_Z
    chance = audit.chance_iou(recovery.mask_density(masks))
    assert recovery.iou(recovered, masks) <= chance + MARGIN
    assert str(secret) not in json.dumps(info)


def test_seeds_of_the_shipped_recipes_are_guessed(tmp_path):
    recipe_seed = 987_654_321
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "x.yaml").write_text(f"model:\n  seed: {recipe_seed}\ntrain: {{seed: 5}}\n")
    (tmp_path / "broken.yaml").write_text("a: [\n")
    assert recovery.config_seeds(tmp_path) == [5, recipe_seed]
    weights, masks = _release(recipe_seed)
    recovered, info = _guess(weights, recovery.seed_candidates(100, tmp_path))
    assert info["seed_found"] and recovery.iou(recovered, masks) > 0.99
    assert all(isinstance(s, int) for s in recovery.config_seeds())  # the repo's own recipes parse


@pytest.mark.parametrize("seed", [PUBLIC_SEED, "secret"])
def test_audit_runs_the_seed_guess_and_reports_no_seed(seed):
    seed = secrets.randbits(128) if seed == "secret" else seed
    weights, masks = _release(seed)
    report = audit.audit(weights, masks, model_cfg=_arch(), seed_guesses=200)
    guess = report["attackers"]["recovery_seed_guess"]
    if seed == PUBLIC_SEED:
        assert guess["seed_found"] and guess["iou"]["overall"] > 0.99 and report["warning"]
    else:
        assert not guess["seed_found"] and guess["iou"]["overall"] <= report["chance_iou"] + MARGIN
        assert str(seed) not in json.dumps(report)
