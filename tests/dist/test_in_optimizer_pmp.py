"""PMP inside the optimizer step (issue #14) against the path it replaced, at TP2 x DP2 with the distributed
optimizer (fp32).

The path it replaced, written out here as the reference: each parameter's ``main_grad`` multiplied by its
bool mask after ``finalize_model_grads``; after ``optimizer.step`` (Megatron's copy and all-gather done) the
complement policy on the whole parameters -- frozen written back, projection onto the ball with the norm
of the whole tensors over the model-parallel group -- then copied into the distributed optimizer's shares.
The new path (``MaskedUpdate``: packed masks on this rank's bucket shares, the policies on the shares in the
inner step's post-hook, one all-reduce) must give the same weights bit for bit on every rank, leave the
masks as attached, and keep one bit of mask per gradient-buffer entry."""

import math

import pytest
import torch

from pmp_megatron.pmp.masks import mask_of
from pmp_megatron.testing import spawn

STEPS = 4
BASE = ["parallel.tensor_model_parallel_size=2", "parallel.use_distributed_optimizer=true", "pmp.mode=pmp",
        "pmp.rho=0.5", "optim.lr=1e-2", "optim.lr_decay_style=constant", "optim.weight_decay=0.1",
        "train.micro_batch_size=2", "train.global_batch_size=8"]
PROJECTION = ["pmp.projection=true", "pmp.projection_target=radius", "pmp.projection_radius=2.0"]
POLICIES = {
    "decay": [],
    "frozen": ["pmp.complement=frozen"],
    "decay+projection": [*PROJECTION, "pmp.projection_interval=2"],
    "frozen+projection": ["pmp.complement=frozen", *PROJECTION, "pmp.projection_interval=1"],
}


class _ReplacedPath:
    """The per-parameter masking and after-step policies that ``MaskedUpdate`` replaced (fp32)."""

    def __init__(self, chunks, optimizer, cfg, masks):
        from pmp_megatron import mcore
        from pmp_megatron.model.params import shard_infos

        self.cfg, self.optimizer = cfg, optimizer
        infos = shard_infos(chunks, cfg.model.vocab_size)
        self.entries = [(p, info, masks[name]) for name, (p, info) in infos.items()]
        self.frozen = [p.detach()[~m].clone() for p, _, m in self.entries]
        tcfg = mcore.unwrap(chunks[0]).config
        inner = tcfg.finalize_model_grads_func

        def finalize_then_mask(*args, **kwargs):
            out = inner(*args, **kwargs)
            for p, _, m in self.entries:
                p.main_grad.mul_(m)
            return out

        tcfg.finalize_model_grads_func = finalize_then_mask

    @torch.no_grad()
    def after_step(self, step):
        from pmp_megatron import mcore

        pmp = self.cfg.pmp
        if pmp.complement == "frozen":
            for (p, _, m), values in zip(self.entries, self.frozen, strict=True):
                p.data.masked_scatter_(~m, values)
        if pmp.projection and step % pmp.projection_interval == 0:
            sq = torch.zeros(1, dtype=torch.float64)
            for p, info, m in self.entries:
                if info.counted:
                    sq += p.double().pow(2)[~m & info.real(p.shape)].sum()
            mcore.all_reduce(sq, group=mcore.model_parallel_group())
            norm = math.sqrt(sq.item())
            if norm > pmp.projection_radius:
                scale = pmp.projection_radius / norm
                for p, _, m in self.entries:
                    p.data.copy_(torch.where(m, p.data, p.data * scale))
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            opt._copy_model_params_to_main_params()


def _run(overrides, replaced):
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
    model = wrap_ddp(chunks, cfg)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, train_steps=STEPS)
    attach_random_masks(chunks, cfg, density=0.5)
    attached = {n: mask_of(p) for n, (p, _) in infos.items()}
    rule = _ReplacedPath(chunks, opt, cfg, attached) if replaced else MaskedUpdate(chunks, opt, cfg)
    dp, r = mcore.dp_size(), mcore.dp_rank()
    for step in range(1, STEPS + 1):
        train_step(model, opt, synthetic_batches(cfg, 4, 2, seed=step)[r::dp], cfg)
        sched.step(1)
        rule.after_step(step)
    out = dict(weights=gather_full({n: (p.detach(), i) for n, (p, i) in infos.items()}),
               local={n: p.detach().clone() for n, (p, _) in infos.items()})
    if not replaced:
        out["masks_kept"] = all(torch.equal(mask_of(p), attached[n]) for n, (p, _) in infos.items())
        out["sharded"] = rule.sharded
        out["mask_bytes"] = rule.grad_masks.nbytes()
        out["buffer_entries"] = sum(base.numel() for base in {b.data_ptr(): b for b, *_ in
                                                             rule.grad_masks.ranges}.values())
        out["masked_entries"] = sum(hi - lo for *_, lo, hi in rule.grad_masks.ranges)
    return out


@pytest.mark.dist
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_in_optimizer_path_is_bit_identical_to_the_replaced_one(policy):
    new = spawn(_run, 4, POLICIES[policy], False)
    old = spawn(_run, 4, POLICIES[policy], True)
    for a, b in zip(new, old, strict=True):
        for name, w in b["local"].items():
            assert torch.equal(a["local"][name], w), (policy, name)
    moved = any(not torch.equal(new[0]["weights"][n], w) for n, w in spawn(_w0, 4)[0].items())
    assert moved
    for r in new:
        assert r["masks_kept"] and r["sharded"]
        assert r["mask_bytes"] == math.ceil(r["buffer_entries"] / 8)  # one bit per gradient-buffer entry
        assert r["masked_entries"] * 2 == r["buffer_entries"]  # DP2: this rank's half of each bucket


def _w0():
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import gather_full, shard_infos
    from pmp_megatron.testing import init_debug_parallel

    cfg = init_debug_parallel(BASE, 4)
    infos = shard_infos(build_model(cfg), cfg.model.vocab_size)
    return gather_full({n: (p.detach(), i) for n, (p, i) in infos.items()})
