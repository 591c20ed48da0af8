"""Stage II update rule: only masked-in entries learn.

Each step: backward -> megatron's ``finalize_model_grads`` (DP reduction, SP norm and embedding syncs)
-> **zero the complement's gradients** -> clip -> optimizer step, and inside it, right after the inner
(torch) step, the complement policy.

The gradient mask is applied to megatron's gradient buffers right after ``finalize_model_grads`` (we wrap
``config.finalize_model_grads_func``), i.e. after the data-parallel reduction and before clipping. That
hook point sees every layer type: a tensor hook on the weight would be bypassed when Transformer
Engine's gradient-accumulation fusion writes straight into ``main_grad``. The masks are packed one bit per
buffer entry and applied one range at a time: the whole buffer, or under the distributed optimizer only
this rank's share of each bucket, the part its optimizer reads (``pmp/grad_mask.py``).

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

What is edited, and when: the tensors the optimizer steps, in a post-hook of the inner (torch) optimizer's
step, before megatron copies them into the model and all-gathers them. In fp32 these are the parameters,
under bf16/fp16 the fp32 main copies; under the distributed optimizer each data-parallel rank holds its
share of each parameter only (a 1-D slice: the fp32 main share, or for fp32 parameters a view of the
parameter), and the policies edit that share. Megatron's own copy (main -> model params) and parameter
all-gather then publish the edits: no second copy, no second all-gather. The projection's squared norm is
summed on the device and all-reduced once (over the model-parallel group, or over every rank when the
shares are data-parallel), and the scale is applied on the device without a host sync; ``after_step``
reads the norm for the log. A step megatron skips (a non-finite gradient) runs no inner step and no policy.
The redraw needs whole tensors: it runs in ``after_step`` and publishes its edit itself; with bf16/fp16
under the distributed optimizer it is refused.
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
from pmp_megatron.pmp.grad_mask import BufferMasks
from pmp_megatron.pmp.masks import has_mask

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
    """Applies the PMP update rule to a model whose parameters carry masks (``pmp.masks.attach``; see the
    module docstring).

    The complement policies edit the tensors the optimizer actually steps: the fp32 main copies under
    bf16/fp16 (then copied down to the model), the parameters themselves in fp32. ``secret_seed``: the
    secret W0 seed, needed by ``pmp.complement=redraw`` only (None when the seed is public); never logged.
    ``iteration``: the optimizer steps already done (a resumed run's), so the projection runs at the
    multiples of its interval. Building it points the parameters' masks into the gradient buffers' packed
    masks (``pmp/grad_mask.py``) and hooks the optimizer's inner step (``close`` removes the hook).
    """

    def __init__(self, chunks, optimizer, cfg, secret_seed: int | None = None, iteration: int = 0):
        self.cfg = cfg
        self.optimizer = optimizer
        infos = shard_infos(chunks, cfg.model.vocab_size)
        unmasked = [name for name, (p, _) in infos.items() if not has_mask(p)]
        if unmasked:
            raise ValueError(f"MaskedUpdate needs a PMP mask on every parameter (pmp.masks.attach); "
                             f"{len(unmasked)} of {len(infos)} have none, e.g. {unmasked[0]}")
        self.entries = list(infos.values())
        mixed = cfg.model.params_dtype != "float32"
        distopt = cfg.parallel.use_distributed_optimizer
        if cfg.pmp.complement == "redraw" and mixed and distopt:
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
        tcfg = mcore.unwrap(chunks[0]).config
        inner = tcfg.finalize_model_grads_func
        assert inner is not None, "wrap the model in DDP (train.step.wrap_ddp) before MaskedUpdate"
        self.grad_masks = BufferMasks([p for p, _ in self.entries], optimizer)
        main = _main_params(optimizer) if (mixed or distopt) else {}
        # (tensor the optimizer steps, its parameter, info, the flat span of the parameter it covers or None)
        self.targets = []
        for p, info in self.entries:
            # a parameter with no share on this rank under the distributed optimizer: nothing to edit here
            t, span = main.get(id(p), (p.detach().view(-1)[:0], (0, 0)) if distopt else (p, None))
            self.targets.append((t, p, info, span))
        self.sharded = any(span is not None for *_, span in self.targets)
        if self.sharded and torch.distributed.is_initialized():
            assert torch.distributed.get_world_size() == (
                mcore.tp_size() * mcore.pp_size() * mcore.dp_size()), "a layout beyond TP x PP x DP"
        self.frozen_values = None
        if cfg.pmp.complement == "frozen":
            self.frozen_values = [t.detach()[~_mask(p, span)].clone() for t, p, _, span in self.targets]
        self.radius = self._projection_radius() if cfg.pmp.projection else None
        self.iteration = iteration  # the last optimizer step done (``after_step``)
        self._stats: dict[str, torch.Tensor] = {}
        leaves = [opt for opt in _leaf_optimizers(optimizer) if opt.param_groups]
        assert len(leaves) == 1, f"one megatron optimizer steps the parameters, not {len(leaves)}"
        stepper = leaves[0].optimizer  # the torch optimizer megatron steps the main params with
        if getattr(stepper, "_pmp_policy_hook", None) is not None:  # a rule built before on it
            stepper._pmp_policy_hook.remove()  # only the newest rule applies its policy
        self._hook = stepper._pmp_policy_hook = stepper.register_step_post_hook(lambda *_: self._in_step())

        def finalize_then_mask(*args, **kwargs):
            out = inner(*args, **kwargs)
            if self.masking:
                self.mask_grads()
            return out

        tcfg.finalize_model_grads_func = finalize_then_mask

    def close(self) -> None:
        """Stop applying the policies in the optimizer's step (the rule is dropped, the optimizer kept)."""
        self._hook.remove()

    def _publish(self) -> None:
        """Make model params and optimizer copies agree after the redraw's edit (whole tensors)."""
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
        self.grad_masks.apply()

    @torch.no_grad()
    def _in_step(self) -> None:
        """The complement policy of optimizer step ``iteration + 1``, right after the inner step (module
        docstring): frozen, then the projection when due. Its statistics stay on the device."""
        step = self.iteration + 1
        if self.frozen_values is not None:
            for (t, p, _, span), values in zip(self.targets, self.frozen_values, strict=True):
                t.data.masked_scatter_(~_mask(p, span), values)
        pmp = self.cfg.pmp
        if pmp.projection and step % pmp.projection_interval == 0:
            norm = self._complement_norm_tensor()
            scale = torch.where(norm > self.radius, self.radius / norm, torch.ones_like(norm))
            for t, p, _, span in self.targets:
                m = _mask(p, span)
                t.data.copy_(torch.where(m, t.data, t.data * scale.to(t.dtype)))
            self._stats = dict(complement_norm=norm, projected_norm=norm * scale)

    @torch.no_grad()
    def after_step(self, step: int) -> dict:
        """After optimizer step number ``step`` (1-based): the redraw when due, and the logged stats of
        this step's policies (a host read of the projection's norm on the steps it ran)."""
        self.iteration = step
        stats = {}
        computed, self._stats = self._stats, {}
        if computed:
            norm, projected = computed["complement_norm"].item(), computed["projected_norm"].item()
            stats.update(complement_norm=norm, projection_radius=self.radius)
            if norm > self.radius:
                stats["projected_norm"] = projected
        pmp = self.cfg.pmp
        if pmp.complement == "redraw" and step % pmp.redraw_interval == 0:
            stats["redrawn_entries"] = self.redraw(step)
            self._publish()
        return stats

    @torch.no_grad()
    def redraw(self, step: int) -> int:
        """Redraw every tensor's complement (``pmp/redraw.py``) for step ``step``; return the number of
        real complement entries redrawn in the whole model (each counted once). Whole tensors: the
        parameters (fp32 ones), or the fp32 main copies (of bf16/fp16 ones, non-distributed optimizer)."""
        main = _main_params(self.optimizer)
        num = torch.zeros(1, dtype=torch.int64, device=mcore.device())
        for p, info in self.entries:
            t = main.get(id(p), (p, None))[0] if self.cfg.model.params_dtype != "float32" else p
            m = _mask(p, None)
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
                    num += (~_mask(p, None) & info.real(p.shape, device=p.device)).sum()
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
        sq = torch.zeros(1, dtype=torch.float64, device=mcore.device())
        for p, info in self.entries:
            if info.counted:
                full = w0_tensor(info.name, info.global_shape, m_cfg.seed, m_cfg.init_method_std)
                local = info.to_local(full, p.shape).to(p.dtype).to(p.device)
                sq += _complement_sq(local, _mask(p, None), info, None, p.shape)
        if torch.distributed.is_initialized():
            mcore.all_reduce(sq, group=mcore.model_parallel_group())
        return math.sqrt(sq.item())

    @torch.no_grad()
    def _complement_norm_tensor(self) -> torch.Tensor:
        """The joint L2 norm of every complement entry of the whole model (each real entry counted once),
        on the device: this rank's squares, one all-reduce (module docstring)."""
        sq = torch.zeros(1, dtype=torch.float64, device=mcore.device())
        for t, p, info, span in self.targets:
            if info.counted:
                sq += _complement_sq(t.data, _mask(p, span), info, span, p.shape)
        if torch.distributed.is_initialized():
            mcore.all_reduce(sq, group=None if self.sharded else mcore.model_parallel_group())
        return sq.sqrt()

    def complement_norm(self) -> float:
        """Joint L2 norm of every complement entry of the whole model (each real entry counted once)."""
        return self._complement_norm_tensor().item()


def _mask(p, span: tuple[int, int] | None) -> torch.Tensor:
    """The (unpacked) mask of what a target covers: the whole parameter, or a flat span of it."""
    return p.pmp_mask_bits.bool() if span is None else p.pmp_mask_bits.flat(*span)


def _complement_sq(t: torch.Tensor, m: torch.Tensor, info, span, shape) -> torch.Tensor:
    """Sum of squares (float64) of the real complement entries of ``t`` (the parameter of ``shape``, or
    its flat ``span``) whose mask is ``m``."""
    comp = ~m & _share(info.real(shape, device=m.device), span)
    return torch.where(comp, t.double().pow(2), 0.0).sum()  # no boolean indexing: no host sync


def _rank0_info(msg: str, *args) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        logger.info(msg, *args)
