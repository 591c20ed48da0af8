"""Optimizers and learning-rate schedules of the attack grid.

``adamw`` (torch, betas 0.9/0.999), ``sgd`` (torch, momentum 0.9, L2 weight decay), ``adafactor``
(transformers' Adafactor with a fixed lr: ``relative_step=False, scale_parameter=False,
warmup_init=False``, as the HF Trainer uses it) and ``lion`` (Chen et al. 2023, implemented here
because torch has none; used by ``torch.optim.Lion`` when a later torch ships one).

Schedules: ``constant``, ``cosine`` and ``linear`` decay to zero, each after ``warmup_steps`` of linear
warmup.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


class Lion(torch.optim.Optimizer):
    """Lion: ``c = b1 m + (1 - b1) g``; ``p -= lr (sign(c) + wd p)``; ``m = b2 m + (1 - b2) g``.

    Weight decay is decoupled (multiplies ``p`` by ``1 - lr wd``). A zero gradient with zero momentum
    gives a zero update (``sign(0) = 0``).
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                update = m.mul(beta1).add_(p.grad, alpha=1.0 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1.0 - beta2)
        return loss


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """The named optimizer over ``params``."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=weight_decay)
    if name == "lion":
        lion_cls = getattr(torch.optim, "Lion", Lion)
        return lion_cls(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: adamw, sgd, adafactor, lion")


def lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The LR multiplier of optimizer step ``step`` (0-based): linear warmup, then constant / cosine /
    linear decay to 0. Both engines read it (``build_schedule``; the megatron engine sets each step's lr)."""
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"unknown schedule {schedule!r}; known: constant, cosine, linear")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def build_schedule(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LR multiplier per step (``lr_factor``) as a torch scheduler."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, warmup_steps, total_steps))
