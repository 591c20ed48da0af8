"""The optimizer (megatron's AdamW: decoupled weight decay, optionally the distributed optimizer) and the
LR schedule (megatron-core's OptimizerParamScheduler: linear warmup, then cosine/linear/constant decay).

Norm weights and other 1-D parameters get no weight decay, as in Megatron-LM and the HF reference.

Without Transformer Engine or apex, megatron steps with ``torch.optim.AdamW`` and leaves torch to pick its
implementation, which on CPU is the single-tensor loop: ~3x slower when many second moments are exactly
zero (PMP's masked complement; ``aten::sqrt`` on zeros). On CPU we switch that optimizer to torch's fused
kernel: the same AdamW update to fp32 rounding (~2 ulp), elementwise, so any sharding of a tensor gives
the same values (layouts stay comparable bit for bit), and a resumed run keeps it.
"""

from __future__ import annotations

import torch

from pmp_megatron import mcore
from pmp_megatron.config import Config


def optimizer_config(cfg: Config, lr: float | None = None, weight_decay: float | None = None,
                     clip_grad: float | None = None, optimizer: str = "adam", sgd_momentum: float = 0.9):
    """megatron's OptimizerConfig from ``cfg.optim`` (and the overrides): ``adam`` is AdamW (decoupled
    weight decay); ``sgd`` is SGD with ``sgd_momentum`` and L2 weight decay."""
    o, m = cfg.optim, cfg.model
    return mcore.OptimizerConfig(
        optimizer=optimizer,
        sgd_momentum=sgd_momentum,
        lr=o.lr if lr is None else lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay if weight_decay is None else weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad if clip_grad is None else clip_grad,
        bf16=m.params_dtype == "bfloat16",
        fp16=m.params_dtype == "float16",
        loss_scale=o.loss_scale,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        decoupled_weight_decay=True,
    )


def build_optimizer(model: list, cfg: Config, decay_every_param: bool = False, **overrides):
    """megatron optimizer over the DDP-wrapped chunks (``overrides``: those of ``optimizer_config``); torch's
    fused AdamW where megatron falls back to torch's optimizer on CPU. ``decay_every_param``: no
    ``wd_mult=0`` group for the 1-D parameters (the attack grid's optimizers decay every parameter, as
    torch's do). Megatron applies ``wd_mult`` only through its OptimizerParamScheduler (``build_scheduler``);
    a caller that sets each step's lr itself gets ``weight_decay`` on every group either way."""
    optimizer = mcore.get_megatron_optimizer(optimizer_config(cfg, **overrides), model,
                                             config_overrides={} if decay_every_param else None)
    use_fused_cpu_adamw(optimizer)
    return optimizer


def torch_adams(optimizer) -> list[torch.optim.Optimizer]:
    """The ``torch.optim.Adam``/``AdamW`` instances a megatron optimizer steps (its torch fallback)."""
    leaves = getattr(optimizer, "chained_optimizers", [optimizer])
    inner = [getattr(leaf, "optimizer", None) for leaf in leaves]
    return [opt for opt in inner if type(opt) in (torch.optim.Adam, torch.optim.AdamW)]


def _fused(opt: torch.optim.Optimizer) -> None:
    for group in opt.param_groups:
        group["fused"], group["foreach"] = True, False


def use_fused_cpu_adamw(optimizer) -> None:
    """Step every torch Adam/AdamW of ``optimizer`` whose parameters are all contiguous CPU floating-point
    tensors with torch's fused kernel (it reads parameters as contiguous memory), also after a
    ``load_state_dict`` (which takes the param groups' flags from the state it loads)."""
    for opt in torch_adams(optimizer):
        params = [p for group in opt.param_groups for p in group["params"]]
        if params and all(p.device.type == "cpu" and p.is_floating_point() and p.is_contiguous()
                          for p in params):
            _fused(opt)
            opt.register_load_state_dict_post_hook(_fused)


def build_scheduler(optimizer, cfg: Config, train_steps: int | None = None):
    """Warmup + decay over optimizer steps, via megatron-core's OptimizerParamScheduler."""
    o = cfg.optim
    steps = train_steps or cfg.train.train_steps
    return mcore.OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=min(o.lr_warmup_steps, steps - 1),
        lr_decay_steps=steps,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
