"""Stage II complement options at TP2 with bf16 parameters (the fp32 main copies are edited, then copied
down): the redraw keeps masked-in entries bit for bit and replicated tensors identical on both TP ranks,
and the size-free projection radii equal the one-process computation from the gathered W0 and masks."""

import math

import pytest
import torch

from pmp_megatron.testing import spawn
from pmp_megatron.pmp.masks import mask_of

SECRET = 0x51C7_9F3A_B684_0E2D_E7A0_4C19_D2F1_3B5D
TP2_BF16 = ["parallel.tensor_model_parallel_size=2", "model.params_dtype=bfloat16"]
INTERVAL = 2


def _tp2(extra):
    """Two Stage II steps at TP2/bf16; the local shards before and after each ``after_step``, the rule's
    radius and that of a rule rebuilt from the trained weights (a resume), the gathered W0 and masks."""
    from pmp_megatron import mcore
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import gather_full, shard_infos
    from pmp_megatron.pmp.update import MaskedUpdate
    from pmp_megatron.testing import attach_random_masks, init_debug_parallel, synthetic_batches
    from pmp_megatron.train.optimizer import build_optimizer, build_scheduler
    from pmp_megatron.train.step import train_step, wrap_ddp

    cfg = init_debug_parallel(["optim.lr=1e-2", "pmp.mode=pmp", "pmp.rho=0.5", "model.seed=null",
                               "optim.lr_decay_style=constant", *TP2_BF16, *extra], 2)
    cfg.model.seed = SECRET  # as train.resume.resolve_seed does
    chunks = build_model(cfg)
    infos = shard_infos(chunks, cfg.model.vocab_size)
    w0 = gather_full({n: (p.float(), i) for n, (p, i) in infos.items()})
    model = wrap_ddp(chunks, cfg)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, train_steps=INTERVAL)
    attach_random_masks(chunks, cfg, density=0.5)
    rule = MaskedUpdate(chunks, opt, cfg, secret_seed=SECRET)
    at_build = rule.complement_norm()

    def snap():
        return {n: p.detach().clone() for n, (p, _) in infos.items()}

    before, after, stats = [], [], []
    for step in range(1, INTERVAL + 1):
        train_step(model, opt, synthetic_batches(cfg, 2, 2, seed=step)[mcore.dp_rank()::mcore.dp_size()], cfg)
        sched.step(1)
        before.append(snap())
        stats.append(rule.after_step(step))
        after.append(snap())
    resumed = MaskedUpdate(chunks, opt, cfg, secret_seed=SECRET).radius if cfg.pmp.projection else None
    masks = gather_full({n: (mask_of(p), i) for n, (p, i) in infos.items()})
    return dict(before=before, after=after, stats=stats, radius=rule.radius, resumed=resumed,
                at_build=at_build, w0=w0, masks=masks,
                local_masks={n: mask_of(p) for n, (p, _) in infos.items()},
                real={n: i.real(p.shape) for n, (p, i) in infos.items()},
                sharded={n: bool(getattr(p, "tensor_model_parallel", False)) for n, (p, _) in infos.items()})


@pytest.mark.dist
def test_tp2_bf16_redraw_keeps_masked_in_entries_and_replicas_in_step():
    ranks = spawn(_tp2, 2, ["pmp.complement=redraw", f"pmp.redraw_interval={INTERVAL}"])
    for r in ranks:
        assert r["stats"][0] == {} and r["stats"][1]["redrawn_entries"] == sum(
            int((~m).sum()) for m in r["masks"].values())  # each real complement entry once
        b, a = r["before"][-1], r["after"][-1]
        for name, m in r["local_masks"].items():
            comp = ~m & r["real"][name]
            assert torch.equal(a[name][~comp], b[name][~comp]), name  # bf16 model params, bit for bit
            assert not torch.equal(a[name][comp], b[name][comp]), name
    replicated = [n for n, sharded in ranks[0]["sharded"].items() if not sharded]
    assert replicated  # the norms
    for name in replicated:  # one stream per global place: the TP replicas draw the same values
        assert torch.equal(ranks[0]["after"][-1][name], ranks[1]["after"][-1][name]), name


@pytest.mark.dist
def test_tp2_bf16_projection_radii_equal_the_one_process_computation():
    extra = ["pmp.complement=decay", "pmp.projection=true", "pmp.projection_target=shrink",
             "pmp.projection_shrink=0.05", f"pmp.projection_interval={INTERVAL}"]
    r = spawn(_tp2, 2, extra)[0]
    w0, masks = r["w0"], r["masks"]
    w0_norm = math.sqrt(sum(w0[n][~m].double().pow(2).sum().item() for n, m in masks.items()))
    assert r["radius"] == pytest.approx(0.05 * w0_norm, rel=1e-12)
    assert r["radius"] == 0.05 * r["at_build"]  # regenerated W0 == the bf16 weights the run started from
    assert r["resumed"] == r["radius"]
    assert r["stats"][1]["projected_norm"] == pytest.approx(r["radius"], rel=1e-6)


def _bf16_distopt_redraw():
    from pmp_megatron.pmp.update import MaskedUpdate
    from pmp_megatron.testing import attach_random_masks, init_debug_model
    from pmp_megatron.train.optimizer import build_optimizer
    from pmp_megatron.train.step import wrap_ddp

    cfg, chunks = init_debug_model(["pmp.mode=pmp", "pmp.rho=0.5", "model.params_dtype=bfloat16",
                                    "parallel.use_distributed_optimizer=true"], 1)
    cfg.pmp.complement = "redraw"
    model = wrap_ddp(chunks, cfg)
    attach_random_masks(chunks, cfg, density=0.5)
    try:
        MaskedUpdate(model, build_optimizer(model, cfg), cfg, secret_seed=SECRET)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.dist
def test_redraw_with_bf16_and_the_distributed_optimizer_is_refused_by_name():
    message = spawn(_bf16_distopt_redraw, 1)[0]
    assert message is not None and "parallel.use_distributed_optimizer" in message
