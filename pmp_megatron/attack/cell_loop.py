"""The part of an attack cell both engines share: the training loop over the task's batches with its eval
schedule, and the result record (one JSON line; ``attack.report``, ``stats`` and ``decision`` read it).

An engine (``runner``: one Hugging Face model in one process; ``megatron_engine``: megatron-core chunks at a
TP/PP/DP layout) supplies a *trainee* with three methods:

- ``step(x, y, step)``: one optimizer step on tokens ``x`` ``[b, s]`` with HF labels ``y`` ``[b, s]``
  (-100 = not trained), ``step`` 1-based; returns the batch's mean token loss (a tensor may stay on the
  device: it is read at the next eval and once at the end);
- ``evaluate(data)``: ``(mean token loss, score)`` over ``data.eval`` (``runner.evaluate``'s metrics);
- ``lm_eval_score()``: the lm-eval metric of the cell's ``lm_eval`` task (the HF engine only).

So the data order, the eval points, divergence and every record key are one code path whichever engine
fine-tunes. ``Progress`` is what a cell has done so far; the megatron engine saves and restores it when a
cell is interrupted (``train`` skips the steps already in it, drawing their batches so the order holds).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pmp_megatron.attack import tasks
from pmp_megatron.attack.suite import Cell

logger = logging.getLogger(__name__)


class Preempted(Exception):
    """A preemption signal stopped a grid, a cell's state saved; ``exit_code`` is the job's (a requeue)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Progress:
    """A cell's training so far."""

    losses: torch.Tensor  # [steps] training loss per step (NaN where not run)
    curve: list  # [[step, task eval loss], ...] from step 0
    score_curve: list  # [[step, score], ...]
    ran: int = 0  # steps run

    @classmethod
    def start(cls, steps: int, before: float, score_before: float, device=None) -> Progress:
        return cls(torch.full((steps,), math.nan, device=device), [[0, before]], [[0, score_before]])


def train(cell: Cell, suite, data: tasks.TaskData, trainee, progress: Progress,
          after_step: Callable[[Progress], None] | None = None) -> Progress:
    """Run the cell's remaining steps on ``trainee``, evaluating every ``suite.eval_every`` steps (not at
    the last: ``finish`` does). A non-finite loss seen at an eval stops training. ``after_step(progress)``
    runs after each step and its eval."""
    adv = cell.adversary
    lm_eval_task = cell.task.kind == "lm_eval"
    for step, (x, y) in enumerate(tasks.train_batches(data, adv.batch_size, adv.steps, cell.seed), start=1):
        if step <= progress.ran:  # done before an interruption
            continue
        progress.losses[step - 1] = trainee.step(x, y, step)
        progress.ran = step
        if suite.eval_every and step % suite.eval_every == 0 and step < adv.steps:
            if not bool(torch.isfinite(progress.losses[:step]).all()):  # one read per eval, not per step
                break
            loss_now, score_now = trainee.evaluate(data)
            progress.curve.append([step, loss_now])
            if not lm_eval_task:
                progress.score_curve.append([step, score_now])
        if after_step is not None:
            after_step(progress)
    return progress


def finish(cell: Cell, ctx, data: tasks.TaskData, pre: tasks.TaskData | None, trainee, progress: Progress,
           before: tuple, mask_info: dict, trainable_fraction: float) -> dict:
    """The after-training evals and the cell's record. ``before``: the un-attacked (task loss, score,
    pretraining loss); ``ctx``: the ``runner.AttackContext``."""
    suite, adv = ctx.suite, cell.adversary
    loss_before, score_before, pre_before = before
    model_dir = ctx.models[cell.role]
    lm_eval_task = cell.task.kind == "lm_eval"
    curve, score_curve = progress.curve, progress.score_curve
    losses = progress.losses[:progress.ran].cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    diverged = bad.numel() > 0
    steps_done = int(bad[0]) + 1 if diverged else progress.ran  # the cell counts up to its first bad loss
    train_losses = losses[: steps_done - 1 if diverged else progress.ran].tolist()
    if diverged:
        logger.warning("cell %s diverged at step %d (loss %s)", cell.id, steps_done, losses[steps_done - 1])
    after = pre_after = score_after = None
    if not diverged:
        after, score_after = trainee.evaluate(data)
        if not math.isfinite(after):
            diverged, after, score_after = True, None, None
        else:
            if lm_eval_task:
                score_after = trainee.lm_eval_score()
            curve.append([adv.steps, after])
            score_curve.append([adv.steps, score_after])
            pre_after = None if pre is None else trainee.evaluate(pre)[0]
    finite = [v for _, v in curve if math.isfinite(v)]
    metric = f"lm_eval:{cell.task.metric or 'acc'}" if lm_eval_task else data.metric
    return {
        "id": cell.id, "status": "diverged" if diverged else "ok",
        "role": cell.role, "model": str(model_dir), "model_id": ctx.model_ids[cell.role],
        "rho": ctx.rho if cell.role == "pmp" else None, "suite": suite.name,
        "task": cell.task.name, "kind": cell.task.kind, "metric": metric,
        "attacker": cell.attacker, "adversary": adv.label,
        **{f"adv_{k}": (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(adv).items()},
        "seed": cell.seed, "tokens": steps_done * adv.batch_size * suite.seq_length,
        "task_loss_before": loss_before, "task_loss_after": after,
        "gain": None if after is None else loss_before - after,
        "gain_best_checkpoint": None if diverged else loss_before - min(finite),
        "score_before": score_before, "score_after": score_after,
        "score_gain": None if score_after is None else score_after - score_before,
        "curve": curve, "score_curve": score_curve,
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "pretrain_loss_before": pre_before, "pretrain_loss_after": pre_after,
        "forgetting": None if pre_after is None else pre_after - pre_before,
        "trainable_fraction": trainable_fraction,
        "iou": mask_info.get("iou"), "mask_density": mask_info.get("mask_density"),
        "true_density": mask_info.get("true_density"), "density_estimate": mask_info.get("density_estimate"),
        "recovery_s": mask_info.get("recovery_s"),
    }
