"""Complement policies under the distributed optimizer at TP2 x DP2 (issue #14).

With bf16 parameters the distributed optimizer's fp32 main copies are shares of each parameter: frozen and
projection edit those shares and publish them (megatron's copy into the parameter buffer, then the
all-gather). Compared with the same run on the non-distributed optimizer -- whose gradients are the same
sums (two DP ranks) and whose AdamW is elementwise -- every weight must be bit-identical, every DP replica
must hold the same parameters, and the complement must be what the policy says: W0 bit for bit (frozen),
inside the ball (projection)."""

import pytest
import torch

from pmp_megatron.testing import spawn
from pmp_megatron.pmp.masks import mask_of

STEPS = 3
BASE = ["parallel.tensor_model_parallel_size=2", "pmp.mode=pmp", "pmp.rho=0.5", "optim.lr=1e-2",
        "optim.lr_decay_style=constant", "optim.weight_decay=0.1", "train.micro_batch_size=2",
        "train.global_batch_size=8"]
POLICIES = {
    "frozen": ["pmp.complement=frozen"],
    "projection": ["pmp.projection=true", "pmp.projection_target=rms", "pmp.projection_rms=1e-3",
                   "pmp.projection_interval=2"],
    "frozen+projection": ["pmp.complement=frozen", "pmp.projection=true", "pmp.projection_target=rms",
                          "pmp.projection_rms=1e-3", "pmp.projection_interval=1"],
}


def _run(overrides):
    from pmp_megatron import mcore
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import gather_full, shard_infos
    from pmp_megatron.pmp.update import MaskedUpdate
    from pmp_megatron.testing import attach_random_masks, init_debug_parallel, synthetic_batches
    from pmp_megatron.train.optimizer import build_optimizer, build_scheduler
    from pmp_megatron.train.step import train_step, wrap_ddp

    cfg = init_debug_parallel([*BASE, *overrides], 4)
    chunks = build_model(cfg)
    infos = shard_infos(chunks, cfg.model.vocab_size)
    w0 = gather_full({n: (p.detach().clone(), i) for n, (p, i) in infos.items()})
    model = wrap_ddp(chunks, cfg)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, train_steps=STEPS)
    attach_random_masks(chunks, cfg, density=0.5)
    rule = MaskedUpdate(chunks, opt, cfg)
    stats = []
    dp, r = mcore.dp_size(), mcore.dp_rank()
    for step in range(1, STEPS + 1):
        train_step(model, opt, synthetic_batches(cfg, 4, 2, seed=step)[r::dp], cfg)
        sched.step(1)
        stats.append(rule.after_step(step))
    return dict(weights=gather_full({n: (p.detach(), i) for n, (p, i) in infos.items()}), w0=w0,
                masks=gather_full({n: (mask_of(p), i) for n, (p, i) in infos.items()}), stats=stats,
                local={n: p.detach().clone() for n, (p, _) in infos.items()}, sharded=rule.sharded,
                where=(mcore.tp_rank(), mcore.pp_rank(), r), radius=rule.radius)


@pytest.mark.dist
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_bf16_distributed_optimizer_edits_its_shares_like_the_full_copies(policy):
    common = [*POLICIES[policy], "model.params_dtype=bfloat16"]
    shares = spawn(_run, 4, [*common, "parallel.use_distributed_optimizer=true"])
    full = spawn(_run, 4, [*common, "parallel.use_distributed_optimizer=false"])[0]
    assert all(r["sharded"] for r in shares) and not full["sharded"]
    a = shares[0]
    for name, w in full["weights"].items():
        assert torch.equal(a["weights"][name], w), name
    for x in shares:  # the DP replicas of one model-parallel rank hold the same parameters
        for y in shares:
            if x["where"][:2] == y["where"][:2]:
                for name, t in x["local"].items():
                    assert torch.equal(t, y["local"][name]), (name, x["where"], y["where"])
    moved = False
    for name, m in a["masks"].items():
        w, w0 = a["weights"][name], a["w0"][name]
        if "frozen" in policy and "projection" not in policy:
            assert torch.equal(w[~m], w0[~m]), name
        moved |= not torch.equal(w[m], w0[m])
    assert moved
    if "projection" in policy:
        projected = [s for s in a["stats"] if "projected_norm" in s]
        assert projected
        assert all(s["projected_norm"] == pytest.approx(a["radius"], rel=1e-2) for s in projected)
        norms = [[s.get("complement_norm") for s in r["stats"]] for r in (a, full)]
        assert [x is None for x in norms[0]] == [x is None for x in norms[1]]
        assert [x for x in norms[0] if x] == pytest.approx([x for x in norms[1] if x], rel=1e-12)
