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

Stage I is preemptible: each step ends with ``signals.stop_agreed()``, as in Stage II. Given a checkpoint
root (the Trainer's ``run_dir/stage1``), it saves its state there every ``pmp.discovery.save_interval``
steps and on a stop -- the Stage-I model and optimizer, the previous mask (attached to the Stage-I chunks,
so it goes through the masks' sharded state), the stable streak, the history and so the data position
(the step) -- and a stop returns a result marked ``preempted``. ``resume`` continues from such a
checkpoint, exactly as if Stage I had never stopped.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pmp_megatron.config import Config, config_to_dict
from pmp_megatron.model.gpt import build_model
from pmp_megatron.model.params import shard_infos
from pmp_megatron.pmp import masks as pmp_masks
from pmp_megatron.pmp.select import global_topk_masks, iou
from pmp_megatron.train import checkpoint, signals
from pmp_megatron.train.optimizer import build_optimizer
from pmp_megatron.train.resume import Start, load_with_fallback
from pmp_megatron.train.step import train_step, wrap_ddp

logger = logging.getLogger(__name__)


@dataclass
class DiscoveryResult:
    masks: dict[str, torch.Tensor] | None  # canonical name -> this rank's local mask shard (None: no step)
    steps: int  # Stage-I steps taken, a resumed run's earlier ones included
    stopped_early: bool  # the IoU rule stopped it before max_steps
    history: list[dict] = field(default_factory=list)  # per step: loss, iou, threshold, seconds
    preempted: bool = False  # stopped by a preemption signal (checkpointed when a root was given)


def stage1_config(cfg: Config) -> Config:
    out = copy.deepcopy(cfg)
    out.parallel.use_distributed_optimizer = False
    out.parallel.overlap_param_gather = False
    return out


def discover(cfg: Config, microbatches: Callable[[int], list[dict]], root: Path | None = None,
             resume: Start | None = None, common: dict | None = None,
             on_step: Callable[[dict], None] | None = None) -> DiscoveryResult:
    """Run Stage I on this rank's share of the model. ``microbatches(step)`` returns this DP rank's
    microbatches for Stage-I step ``step`` (0-based; called for consecutive steps from the first one run).
    Needs megatron's parallel groups initialised.

    ``root``: where Stage-I checkpoints go (None: none are saved); ``resume``: a Stage-I checkpoint to
    continue from (older valid ones of its root are the fallbacks); ``common``: added to each Stage-I
    checkpoint's common state (its config is this run's); ``on_step(record)``: called after each step with
    its history record.
    """
    d, rho = cfg.pmp.discovery, cfg.pmp.rho
    if d.max_steps < 1:
        raise ValueError("pmp.discovery.max_steps must be >= 1 to discover a mask in pmp mode")
    scfg = stage1_config(cfg)

    def make():
        chunks = build_model(scfg, init_w0=resume is None)
        model = wrap_ddp(chunks, scfg)
        return model, build_optimizer(model, scfg, lr=d.lr, weight_decay=0.0, clip_grad=d.clip_grad)

    prev, streak, history, first = None, 0, [], 0
    if resume is None:
        model, optimizer = make()
    else:
        resume, model, optimizer = load_with_fallback(cfg, resume, make, scfg)
        first, streak, history = resume.iteration, resume.common["streak"], list(resume.common["history"])
        if resume.common.get("has_masks"):
            prev = {n: p.pmp_mask for n, (p, _) in shard_infos(model, cfg.model.vocab_size).items()}
        logger.info("stage I resumed from %s at step %d", checkpoint.iter_dir(resume.root, first), first)
    entries = shard_infos(model, cfg.model.vocab_size)
    infos = {name: info for name, (_, info) in entries.items()}
    ranked = {}

    def rank_grads():
        """After the backward, before the optimizer step: the mask of this step's reduced gradients."""
        ranked["masks"], ranked["stats"] = global_topk_masks(
            {n: (p.main_grad, i) for n, (p, i) in entries.items()}, rho)

    def save(step):
        pmp_masks.attach(model, cfg.model.vocab_size, prev)  # the previous mask rides in the masks' state
        state = dict(common or {}, config=config_to_dict(cfg), stage="discovery", streak=streak,
                     history=history)
        checkpoint.save(root, step, model, optimizer, scfg, state, keep_last=2)

    step, preempted = first, False
    while step < d.max_steps and streak < d.patience:
        t0 = time.perf_counter()
        loss = train_step(model, optimizer, microbatches(step), scfg, after_backward=rank_grads).loss
        masks, stats = ranked["masks"], ranked["stats"]
        overlap = iou(prev, masks, infos) if prev is not None else float("nan")
        streak = streak + 1 if prev is not None and overlap >= d.iou_threshold else 0
        prev = masks
        step += 1
        record = dict(step=step, loss=loss, iou=overlap, threshold=stats.threshold,
                      seconds=time.perf_counter() - t0)
        history.append(record)
        logger.info("stage I step %d/%d | loss %.4f | mask IoU %.4f | stable %d/%d", step, d.max_steps,
                    loss, overlap, streak, d.patience)
        if on_step is not None:
            on_step(record)
        done = step >= d.max_steps or streak >= d.patience
        preempted = signals.stop_agreed() and not done  # a finished Stage I goes on to save iteration 0
        if root is not None and not done and (preempted or (d.save_interval and step % d.save_interval == 0)):
            save(step)
        if preempted:
            logger.warning("preempted at stage I step %d%s", step,
                           ": stage I checkpoint saved" if root is not None else "")
            break
    return DiscoveryResult(masks=prev, steps=step, stopped_early=streak >= d.patience, history=history,
                           preempted=preempted)
