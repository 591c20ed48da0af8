"""The optimizer (megatron's AdamW: decoupled weight decay, optionally the distributed optimizer) and the
LR schedule (megatron-core's OptimizerParamScheduler: linear warmup, then cosine/linear/constant decay).

Norm weights and other 1-D parameters get no weight decay, as in Megatron-LM and the HF reference.
"""

from __future__ import annotations

from pmp_megatron import mcore
from pmp_megatron.config import Config


def optimizer_config(cfg: Config, lr: float | None = None, weight_decay: float | None = None,
                     clip_grad: float | None = None):
    o, m = cfg.optim, cfg.model
    return mcore.OptimizerConfig(
        optimizer="adam",
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


def build_optimizer(model: list, cfg: Config, **overrides):
    """megatron optimizer over the DDP-wrapped chunks (``overrides``: lr, weight_decay, clip_grad)."""
    return mcore.get_megatron_optimizer(optimizer_config(cfg, **overrides), model)


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
