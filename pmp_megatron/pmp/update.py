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

from pmp_megatron import mcore
from pmp_megatron.model.params import shard_infos


def _leaf_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _main_params(optimizer) -> dict[int, torch.Tensor]:
    """id(model param) -> its fp32 main copy, for megatron's non-distributed mixed-precision optimizer."""
    out = {}
    for opt in _leaf_optimizers(optimizer):
        for model_group, main_group in zip(getattr(opt, "float16_groups", []),
                                           getattr(opt, "fp32_from_float16_groups", []), strict=True):
            out.update({id(p): m for p, m in zip(model_group, main_group, strict=True)})
    return out


class MaskedUpdate:
    """Applies the PMP update rule to a model whose parameters carry ``pmp_mask`` (see module docstring).

    The complement policies edit the tensors the optimizer actually steps: the fp32 main copies under
    bf16/fp16 (then copied down to the model), the parameters themselves in fp32.
    """

    def __init__(self, chunks, optimizer, cfg):
        self.cfg = cfg
        self.optimizer = optimizer
        infos = shard_infos(chunks, cfg.model.vocab_size)
        unmasked = [name for name, (p, _) in infos.items() if not hasattr(p, "pmp_mask")]
        if unmasked:
            raise ValueError(f"MaskedUpdate needs a PMP mask on every parameter (pmp.masks.attach); "
                             f"{len(unmasked)} of {len(infos)} have none, e.g. {unmasked[0]}")
        self.entries = list(infos.values())
        edits_complement = cfg.pmp.complement == "frozen" or cfg.pmp.projection
        mixed = cfg.model.params_dtype != "float32"
        if edits_complement and mixed and cfg.parallel.use_distributed_optimizer:
            raise ValueError("pmp.complement=frozen and pmp.projection need model.params_dtype=float32 or "
                             "parallel.use_distributed_optimizer=false with bf16/fp16 (the distributed "
                             "optimizer's sharded fp32 copies are not edited yet)")
        main = _main_params(optimizer) if mixed else {}
        # (tensor the optimizer steps, mask, info) per parameter
        self.targets = [(main.get(id(p), p), p.pmp_mask, info) for p, info in self.entries]
        self.frozen_values = None
        if cfg.pmp.complement == "frozen":
            self.frozen_values = [t.detach()[~m].clone() for t, m, _ in self.targets]
        tcfg = mcore.unwrap(chunks[0]).config
        inner = tcfg.finalize_model_grads_func
        assert inner is not None, "wrap the model in DDP (train.step.wrap_ddp) before MaskedUpdate"

        def finalize_then_mask(*args, **kwargs):
            out = inner(*args, **kwargs)
            self.mask_grads()
            return out

        tcfg.finalize_model_grads_func = finalize_then_mask

    def _publish(self) -> None:
        """Make model params and optimizer copies agree after an edit of ``targets``."""
        for opt in _leaf_optimizers(self.optimizer):
            if self.cfg.model.params_dtype != "float32":
                opt._copy_main_params_to_model_params()  # main (edited) -> bf16/fp16 model params
            elif hasattr(opt, "_copy_model_params_to_main_params"):
                opt._copy_model_params_to_main_params()  # fp32 model (edited) -> distributed shards

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
            for (t, m, _), values in zip(self.targets, self.frozen_values, strict=True):
                t.data.masked_scatter_(~m, values)
            changed = True
        pmp = self.cfg.pmp
        if pmp.projection and step % pmp.projection_interval == 0:
            norm = self.complement_norm()
            stats["complement_norm"] = norm
            if norm > pmp.projection_radius:
                scale = pmp.projection_radius / norm
                for t, m, _ in self.targets:
                    t.data.copy_(torch.where(m, t.data, t.data * scale))
                changed = True
                stats["projected_norm"] = self.complement_norm()
        if changed:
            self._publish()
        return stats

    @torch.no_grad()
    def complement_norm(self) -> float:
        """Joint L2 norm of every complement entry of the whole model (each real entry counted once)."""
        sq = torch.zeros(1, dtype=torch.float64, device=mcore.device())
        for t, m, info in self.targets:
            if info.counted:
                comp = ~m & info.real(m.shape, device=m.device)
                sq += t.data.double().pow(2)[comp].sum()
        if torch.distributed.is_initialized():
            mcore.all_reduce(sq, group=mcore.model_parallel_group())
        return math.sqrt(sq.item())
