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
  complement's values (``(1 - rho)`` of the parameters; under the distributed optimizer only this rank's
  share) and write them back after each optimizer step, into the tensors the optimizer steps, then
  publish them to the model parameters.
- ``redraw``: every ``redraw_interval`` steps (after the optimizer step numbered ``step``, at its
  multiples) each tensor's complement is replaced by a fresh secret draw from the values of its trained
  entries (``pmp/redraw.py``: the draw, its seed, what holds under TP). Between redraws the
  complement decays as under ``decay``. It needs the secret W0 seed (``secret_seed``).
- projection: every ``projection_interval`` steps, if the joint L2 norm of ALL complement entries of the
  model (reduced over TP and PP, replicated copies counted once, padded rows excluded) exceeds the radius
  R, the complement is scaled onto the ball of radius R. R (``projection_target``, fixed when the rule is
  built and logged): ``radius``: ``projection_radius``; ``rms``: ``projection_rms * sqrt(number of real
  complement entries)``; ``shrink``: ``projection_shrink`` * the joint norm of the complement at W0, the
  start of Stage II. That norm is computed from W0 regenerated from ``model.seed`` (``model.w0``, cast to
  the parameters' dtype as the model held it), not from the current weights, so a resumed run gets the
  same R bit for bit as the run that started at W0.

What is edited: the tensors the optimizer steps. In fp32 these are the parameters (the distributed
optimizer's fp32 shards are views of them); under bf16/fp16 the fp32 main copies, then copied down. With
bf16/fp16 and the distributed optimizer each data-parallel rank holds the fp32 main copy of its share of
each parameter only (a 1-D slice): the policies edit that share (the projection's norm is then summed over
the data-parallel group too), megatron's own copy puts it into the parameter buffer, and the parameters
are all-gathered over the data-parallel group. The redraw needs whole tensors and is refused there.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

from pmp_megatron import mcore
from pmp_megatron.model.params import shard_infos
from pmp_megatron.model.w0 import w0_tensor
from pmp_megatron.pmp import redraw

logger = logging.getLogger(__name__)


def _leaf_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _main_params(optimizer) -> dict[int, tuple[torch.Tensor, tuple[int, int] | None]]:
    """id(bf16/fp16 model param) -> (its fp32 main copy, None), or under the distributed optimizer, for
    every param it steps (this rank's fp32 main share, the (start, end) of the flattened param it holds)."""
    out = {}
    for opt in _leaf_optimizers(optimizer):
        for model_group, main_group in zip(getattr(opt, "float16_groups", []),
                                           getattr(opt, "fp32_from_float16_groups", []), strict=True):
            out.update({id(p): (m, None) for p, m in zip(model_group, main_group, strict=True)})
        # the distributed optimizer: fp32 shares of bf16/fp16 params, and shares (views) of fp32 params
        for models, shards in (("model_float16_groups", "shard_fp32_from_float16_groups"),
                               ("model_fp32_groups", "shard_fp32_groups")):
            for model_group, shard_group in zip(getattr(opt, models, []), getattr(opt, shards, []),
                                                strict=True):
                for p, shard in zip(model_group, shard_group, strict=True):
                    r = opt._get_model_param_range_map(p)["param"]
                    out[id(p)] = (shard, (r.start, r.end))
    return out


def _share(t: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor:
    """The part of a parameter-shaped tensor that a target covers (all of it, or a flat slice)."""
    return t if span is None else t.view(-1)[span[0]: span[1]]


class MaskedUpdate:
    """Applies the PMP update rule to a model whose parameters carry ``pmp_mask`` (see module docstring).

    The complement policies edit the tensors the optimizer actually steps: the fp32 main copies under
    bf16/fp16 (then copied down to the model), the parameters themselves in fp32. ``secret_seed``: the
    secret W0 seed, needed by ``pmp.complement=redraw`` only (None when the seed is public); never logged.
    """

    def __init__(self, chunks, optimizer, cfg, secret_seed: int | None = None):
        self.cfg = cfg
        self.optimizer = optimizer
        infos = shard_infos(chunks, cfg.model.vocab_size)
        unmasked = [name for name, (p, _) in infos.items() if not hasattr(p, "pmp_mask")]
        if unmasked:
            raise ValueError(f"MaskedUpdate needs a PMP mask on every parameter (pmp.masks.attach); "
                             f"{len(unmasked)} of {len(infos)} have none, e.g. {unmasked[0]}")
        self.entries = list(infos.values())
        mixed = cfg.model.params_dtype != "float32"
        if cfg.pmp.complement == "redraw" and mixed and cfg.parallel.use_distributed_optimizer:
            raise ValueError("pmp.complement=redraw draws from whole tensors, and with bf16/fp16 the "
                             "distributed optimizer holds a share of each: set model.params_dtype=float32 "
                             "or parallel.use_distributed_optimizer=false")
        if cfg.pmp.complement == "redraw" and secret_seed is None:
            raise ValueError("pmp.complement=redraw draws the complement from the secret W0 seed, and this "
                             "run has none (a public model.seed); leave model.seed unset or use "
                             "model.seed_file")
        if cfg.pmp.projection and cfg.pmp.projection_target == "shrink" and cfg.model.seed is None:
            raise ValueError("pmp.projection_target=shrink regenerates W0 and needs model.seed (the Trainer "
                             "sets it to the run's seed)")
        self._secret_seed = secret_seed
        self.masking = True  # False only inside ``unmasked()``
        main = _main_params(optimizer) if mixed else {}
        # (tensor the optimizer steps, its mask, info, the flat span of the parameter it covers or None)
        self.targets = []
        shares = mixed and cfg.parallel.use_distributed_optimizer  # each rank steps a share of each param
        for p, info in self.entries:
            # a parameter with no share on this rank under the distributed optimizer: nothing to edit here
            t, span = main.get(id(p), (p.detach().view(-1)[:0], (0, 0)) if shares else (p, None))
            self.targets.append((t, _share(p.pmp_mask, span), info, span))
        self.sharded = any(span is not None for *_, span in self.targets)
        self.frozen_values = None
        if cfg.pmp.complement == "frozen":
            self.frozen_values = [t.detach()[~m].clone() for t, m, _, _ in self.targets]
        self.radius = self._projection_radius() if cfg.pmp.projection else None
        tcfg = mcore.unwrap(chunks[0]).config
        inner = tcfg.finalize_model_grads_func
        assert inner is not None, "wrap the model in DDP (train.step.wrap_ddp) before MaskedUpdate"

        def finalize_then_mask(*args, **kwargs):
            out = inner(*args, **kwargs)
            if self.masking:
                self.mask_grads()
            return out

        tcfg.finalize_model_grads_func = finalize_then_mask

    def _publish(self) -> None:
        """Make model params and optimizer copies agree after an edit of ``targets``."""
        for opt in _leaf_optimizers(self.optimizer):
            if self.cfg.model.params_dtype != "float32":
                opt._copy_main_params_to_model_params()  # main (edited) -> bf16/fp16 model params
                if self.sharded and not self.cfg.parallel.overlap_param_gather:
                    opt.start_param_sync_for_bucket_group_subset()  # every rank's share -> every rank
            elif hasattr(opt, "_copy_model_params_to_main_params"):
                opt._copy_model_params_to_main_params()  # fp32 model (edited) -> distributed shards

    @contextlib.contextmanager
    def unmasked(self):
        """Gradients keep their complement entries inside this block: a simulated KEYLESS fine-tune
        (``train/adversarial.py``) trains every entry. Nothing the optimizer steps is computed here."""
        self.masking = False
        try:
            yield
        finally:
            self.masking = True

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
            for (t, m, _, _), values in zip(self.targets, self.frozen_values, strict=True):
                t.data.masked_scatter_(~m, values)
            changed = True
        pmp = self.cfg.pmp
        if pmp.complement == "redraw" and step % pmp.redraw_interval == 0:
            stats["redrawn_entries"] = self.redraw(step)
            changed = True
        if pmp.projection and step % pmp.projection_interval == 0:
            norm = self.complement_norm()
            stats["complement_norm"] = norm
            stats["projection_radius"] = self.radius
            if norm > self.radius:
                scale = self.radius / norm
                for t, m, _, _ in self.targets:
                    t.data.copy_(torch.where(m, t.data, t.data * scale))
                changed = True
                stats["projected_norm"] = self.complement_norm()
        if changed:
            self._publish()
        return stats

    @torch.no_grad()
    def redraw(self, step: int) -> int:
        """Redraw every tensor's complement (``pmp/redraw.py``) for step ``step``; return the number of
        real complement entries redrawn in the whole model (each counted once)."""
        num = torch.zeros(1, dtype=torch.int64, device=mcore.device())
        for t, m, info, _ in self.targets:
            real = info.real(m.shape, device=m.device)
            gen = torch.Generator().manual_seed(
                redraw.draw_seed(self._secret_seed, step, info.name, info.dim, info.blocks))
            drawn = redraw.redraw_(t.data, m & real, ~m & real, gen)
            if info.counted:
                num += drawn
        if torch.distributed.is_initialized():
            mcore.all_reduce(num, group=mcore.model_parallel_group())
        _rank0_info("step %d: complement redrawn (%d entries)", step, num.item())
        return num.item()

    def _projection_radius(self) -> float:
        """The projection's R for ``pmp.projection_target`` (module docstring); logged on rank 0."""
        pmp = self.cfg.pmp
        if pmp.projection_target == "radius":
            radius = pmp.projection_radius
            _rank0_info("projection radius R = %.6g (pmp.projection_radius)", radius)
        elif pmp.projection_target == "rms":
            num = torch.zeros(1, dtype=torch.int64, device=mcore.device())
            for p, info in self.entries:
                if info.counted:
                    num += (~p.pmp_mask & info.real(p.shape, device=p.device)).sum()
            if torch.distributed.is_initialized():
                mcore.all_reduce(num, group=mcore.model_parallel_group())
            radius = pmp.projection_rms * math.sqrt(num.item())
            _rank0_info("projection radius R = %.6g = pmp.projection_rms %.6g * sqrt(%d complement entries)",
                        radius, pmp.projection_rms, num.item())
        else:
            norm = self.w0_complement_norm()
            radius = pmp.projection_shrink * norm
            _rank0_info("projection radius R = %.6g = pmp.projection_shrink %.6g * W0's complement norm %.6g",
                        radius, pmp.projection_shrink, norm)
        return radius

    @torch.no_grad()
    def w0_complement_norm(self) -> float:
        """Joint L2 norm of the complement at W0 (regenerated from ``model.seed``, in the parameters'
        dtype): the complement at the start of Stage II, whatever the current weights."""
        m_cfg = self.cfg.model
        w0 = []
        for p, info in self.entries:
            if info.counted:
                full = w0_tensor(info.name, info.global_shape, m_cfg.seed, m_cfg.init_method_std)
                w0.append((info.to_local(full, p.shape).to(p.dtype).to(p.device), p.pmp_mask, info, None))
        return _joint_complement_norm(w0)

    @torch.no_grad()
    def complement_norm(self) -> float:
        """Joint L2 norm of every complement entry of the whole model (each real entry counted once)."""
        shapes = [p.shape for p, _ in self.entries]
        return _joint_complement_norm([(t.data, m, info, (span, shape)) for (t, m, info, span), shape
                                       in zip(self.targets, shapes, strict=True)], self.sharded)


def _joint_complement_norm(tensors, sharded: bool = False) -> float:
    """Joint L2 norm of the complement of ``(tensor, mask, info, where)`` over the model-parallel group;
    ``where`` is None for a whole local tensor, or (flat span, parameter shape) for a distributed-optimizer
    share, and then (``sharded``) the data-parallel group's shares are summed too."""
    sq = torch.zeros(1, dtype=torch.float64, device=mcore.device())
    for t, m, info, where in tensors:
        if info.counted:
            span, shape = (None, m.shape) if where is None else where
            comp = ~m & _share(info.real(shape, device=m.device), span)
            sq += t.double().pow(2)[comp].sum()
    if torch.distributed.is_initialized():
        mcore.all_reduce(sq, group=mcore.model_parallel_group())
        if sharded:
            mcore.all_reduce(sq, group=mcore.dp_group())
    return math.sqrt(sq.item())


def _rank0_info(msg: str, *args) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        logger.info(msg, *args)
