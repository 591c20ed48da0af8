"""Stage I of PMP: the early-bird mask-discovery training loop, and the rewind to W0.

It is a training loop (a model, an optimizer, ``train.step.train_step`` each step), so it lives in
``train/``; the algorithm's piece it runs every step, the global exact top-k, is ``pmp.select``.

From W0, train densely (AdamW, ``pmp.discovery.lr``, no weight decay, clipping at
``pmp.discovery.clip_grad``). After each backward (gradients reduced over DP), before the optimizer step,
the mask is the global exact top-k of |grad| over every parameter of the model (``pmp.select``),
k = floor(rho * #params); ranking before clipping gives the mask of the unclipped gradients exactly.
Stop when IoU(mask_t, mask_t-1) >= ``iou_threshold`` for ``patience`` consecutive steps, or after
``max_steps``; the last mask is the result.

Stage I always reduces gradients with a plain all-reduce (no distributed optimizer): the ranking needs
every rank's full reduced gradients. Stage II then REWINDS: the model is rebuilt from W0 (bit for bit,
see ``model.init``) with a fresh optimizer, and the masks are attached to it.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pmp_megatron.config import Config
from pmp_megatron.model.gpt import build_model
from pmp_megatron.model.params import shard_infos
from pmp_megatron.pmp.select import global_topk_masks, iou
from pmp_megatron.train.optimizer import build_optimizer
from pmp_megatron.train.step import train_step, wrap_ddp

logger = logging.getLogger(__name__)


@dataclass
class DiscoveryResult:
    masks: dict[str, torch.Tensor]  # canonical name -> this rank's local mask shard
    steps: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)  # per step: loss, iou, threshold, seconds


def stage1_config(cfg: Config) -> Config:
    out = copy.deepcopy(cfg)
    out.parallel.use_distributed_optimizer = False
    out.parallel.overlap_param_gather = False
    return out


def discover(cfg: Config, microbatches: Callable[[int], list[dict]]) -> DiscoveryResult:
    """Run Stage I on this rank's share of the model. ``microbatches(step)`` returns this DP rank's
    microbatches for Stage-I step ``step`` (0-based). Needs megatron's parallel groups initialised."""
    d, rho = cfg.pmp.discovery, cfg.pmp.rho
    if d.max_steps < 1:
        raise ValueError("pmp.discovery.max_steps must be >= 1 to discover a mask in pmp mode")
    scfg = stage1_config(cfg)
    chunks = build_model(scfg)
    model = wrap_ddp(chunks, scfg)
    optimizer = build_optimizer(model, scfg, lr=d.lr, weight_decay=0.0, clip_grad=d.clip_grad)
    entries = shard_infos(chunks, cfg.model.vocab_size)
    infos = {name: info for name, (_, info) in entries.items()}
    ranked = {}

    def rank_grads():
        """After the backward, before the optimizer step: the mask of this step's reduced gradients."""
        ranked["masks"], ranked["stats"] = global_topk_masks(
            {n: (p.main_grad, i) for n, (p, i) in entries.items()}, rho)

    prev, streak, history = None, 0, []
    step = 0
    for step in range(d.max_steps):
        t0 = time.perf_counter()
        loss = train_step(model, optimizer, microbatches(step), scfg, after_backward=rank_grads).loss
        masks, stats = ranked["masks"], ranked["stats"]
        overlap = iou(prev, masks, infos) if prev is not None else float("nan")
        streak = streak + 1 if prev is not None and overlap >= d.iou_threshold else 0
        prev = masks
        history.append(dict(step=step + 1, loss=loss, iou=overlap, threshold=stats.threshold,
                            seconds=time.perf_counter() - t0))
        logger.info("stage I step %d/%d | loss %.4f | mask IoU %.4f | stable %d/%d", step + 1, d.max_steps,
                    loss, overlap, streak, d.patience)
        if streak >= d.patience:
            break
    del model, optimizer, chunks
    return DiscoveryResult(masks=prev, steps=step + 1, stopped_early=streak >= d.patience, history=history)
