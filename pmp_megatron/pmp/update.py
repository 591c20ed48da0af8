"""Stage II update rule: only masked-in entries learn.

Each step: backward -> megatron's ``finalize_model_grads`` (DP reduction, SP norm and embedding syncs)
-> **zero the complement's gradients** -> clip -> optimizer step -> complement policy.

The gradient mask is applied to ``param.main_grad`` right after ``finalize_model_grads`` (we wrap
``config.finalize_model_grads_func``), i.e. after the data-parallel reduction and before clipping. That
hook point sees every layer type: a tensor hook on the weight would be bypassed when Transformer
Engine's gradient-accumulation fusion writes straight into ``main_grad``.

Complement policies (``pmp.complement``), then the optional projection (``pmp.projection``):

- ``decay`` (the reference): gradients are masked, but AdamW's decoupled weight decay still shrinks the
  complement: after step t it equals ``W0 * prod_t (1 - lr_t * wd)``.
- ``frozen``: the complement stays at W0 bit for bit. Its Adam update is exactly zero (zero gradient from
  the first step, so zero moments), so the only thing that moves it is the decoupled decay; we keep the
  complement's values (``(1 - rho)`` of the parameters) and write them back after each optimizer step,
  into the model parameters and the optimizer's main copies.
- projection: every ``projection_interval`` steps, if the joint L2 norm of ALL complement entries of the
  model (reduced over TP and PP, replicated copies counted once, padded rows excluded) exceeds
  ``projection_radius``, the complement is scaled onto the ball of that radius.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pmp_megatron import mcore
from pmp_megatron.model.params import shard_infos


def _leaf_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def sync_main_params(optimizer) -> None:
    """After editing model parameters in place, refresh the optimizer's fp32 main copies (if any)."""
    for opt in _leaf_optimizers(optimizer):
        if hasattr(opt, "_copy_model_params_to_main_params"):
            opt._copy_model_params_to_main_params()


class MaskedUpdate:
    """Applies the PMP update rule to a model whose parameters carry ``pmp_mask`` (see module docstring)."""

    def __init__(self, chunks, optimizer, cfg):
        self.cfg = cfg
        self.optimizer = optimizer
        self.entries = list(shard_infos(chunks, cfg.model.vocab_size).values())
        tcfg = getattr(chunks[0], "module", chunks[0]).config
        inner = tcfg.finalize_model_grads_func
        assert inner is not None, "wrap the model in DDP (train.step.wrap_ddp) before MaskedUpdate"

        def finalize_then_mask(*args, **kwargs):
            out = inner(*args, **kwargs)
            self.mask_grads()
            return out

        tcfg.finalize_model_grads_func = finalize_then_mask
        self.frozen_values = None
        if cfg.pmp.complement == "frozen":
            self.frozen_values = [p.detach()[~p.pmp_mask].clone() for p, _ in self.entries]

    @torch.no_grad()
    def mask_grads(self) -> None:
        for p, _ in self.entries:
            p.main_grad.mul_(p.pmp_mask)

    @torch.no_grad()
    def after_step(self, step: int) -> dict:
        """Complement policy after optimizer step number ``step`` (1-based). Returns logged stats."""
        stats = {}
        changed = False
        if self.frozen_values is not None:
            for (p, _), values in zip(self.entries, self.frozen_values, strict=True):
                p.data.masked_scatter_(~p.pmp_mask, values)
            changed = True
        pmp = self.cfg.pmp
        if pmp.projection and step % pmp.projection_interval == 0:
            norm = self.complement_norm()
            stats["complement_norm"] = norm
            if norm > pmp.projection_radius:
                scale = pmp.projection_radius / norm
                for p, _ in self.entries:
                    p.data.copy_(torch.where(p.pmp_mask, p.data, p.data * scale))
                changed = True
                stats["projected_norm"] = self.complement_norm()
        if changed:
            sync_main_params(self.optimizer)
        return stats

    @torch.no_grad()
    def complement_norm(self) -> float:
        """Joint L2 norm of every complement entry of the whole model (each real entry counted once)."""
        sq = torch.zeros(1, dtype=torch.float64, device=mcore.device())
        for p, info in self.entries:
            if info.counted:
                comp = ~p.pmp_mask & info.real(p.shape, device=p.device)
                sq += p.data.double().pow(2)[comp].sum()
        if dist.is_initialized():
            dist.all_reduce(sq, group=mcore.model_parallel_group())
        return math.sqrt(sq.item())
