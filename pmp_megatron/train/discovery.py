"""Stage I of PMP: the early-bird mask-discovery training loop, and the rewind to W0.

It is a training loop (a model, an optimizer, ``train.step.train_step`` each step), so it lives in
``train/``; the algorithm's piece it runs every step, the global exact top-k, is ``pmp.select``.

From W0, train densely (AdamW, ``pmp.discovery.lr``, no weight decay, clipping at
``pmp.discovery.clip_grad``). After each backward (gradients reduced over DP), before the optimizer step,
the mask (by default; see Options) is the global exact top-k of |grad| over every parameter (``pmp.select``),
k = floor(rho * #params); ranking before clipping gives the mask of the unclipped gradients exactly.
Stop when IoU(mask_t, mask_t-1) >= ``iou_threshold`` for ``patience`` consecutive steps, or after
``max_steps``; the last mask is the result.

The ranking needs every rank's full reduced gradients: with the distributed optimizer (its sharded state
saves Stage I's optimizer memory too) the reduce-scattered buffers are completed by an all-gather of each
bucket's shares before the ranking (``train.step.gather_reduced_grads``: the two halves of an all-reduce;
the same gradients, so the same masks and weights as without it). The data-parallel replicas share the
selection's counting (each counts a 1/DP part of every score tensor; ``pmp.select``'s ``split_group``)
and compute the same masks. Stage II then REWINDS: the model is rebuilt from W0 (bit for bit,
see ``model.init``) with a fresh optimizer, and the masks are attached to it.

Stage I is preemptible: each step ends with ``signals.stop_agreed()``, as in Stage II. Given a checkpoint
root (the Trainer's ``run_dir/stage1``), it saves its state there every ``pmp.discovery.save_interval``
steps and on a stop -- the Stage-I model and optimizer, the previous mask (attached to the Stage-I chunks,
so it goes through the masks' sharded state), the stable streak, the history and so the data position
(the step) -- and a stop returns a result marked ``preempted``. ``resume`` continues from such a
checkpoint, exactly as if Stage I had never stopped.

Options (``pmp.discovery``; the defaults are the reference's, and give today's masks bit for bit):

- ``warmup_steps``: the Stage-I learning rate rises linearly, ``lr * min(1, (t + 1) / warmup_steps)`` at
  Stage-I step ``t`` (0-based), from ``lr / warmup_steps`` to ``lr``. It is set on every optimizer param
  group before each step from the step number alone, so a resumed Stage I gets the same rates.
- ``adam_beta1`` / ``adam_beta2``: the betas of Stage I's AdamW (None: ``optim.adam_beta1/2``).
  ``stage1_config`` writes them into the Stage-I config the optimizer is built from; Stage II never
  sees them.
- ``score``: what is ranked. ``grad``: this step's ``|g|`` (the DP-reduced ``main_grad``, before
  clipping). ``accumulated``: ``S_t = sum_{i<=t} |g_i|``. ``ema``: ``E_t = ema_beta * E_{t-1} +
  (1 - ema_beta) * g_t^2`` (``E_0 = 0``). Both are fp32 tensors of each parameter's local shape, kept on
  the parameter as ``param.pmp_score`` and updated in place after each backward; the IoU rule compares
  consecutive masks of the ranked score. They ride in Stage-I checkpoints through the masks' sharded
  state (``pmp.masks``: mirrored like the weight, so they reshard like it) and are loaded back exactly.
- ``batch``: ``global`` trains on and ranks the step's whole batch (``microbatches(step)``).
  ``micro`` uses only the FIRST micro-batch of this DP rank's share: the step runs one micro-batch per DP
  rank (``micro_batch_size x DP`` sequences; megatron then divides the loss by 1 micro-batch, so the
  gradient is the mean token gradient of those micro-batches). The rest of the step's share is skipped,
  so the data position per step is the same as in ``global`` mode. Not with a virtual pipeline
  (megatron's interleaved schedule needs at least PP micro-batches per step): refused by Config.validate.
- ``quota``: ``global`` is one ranking over the whole model (``pmp.select.global_topk_masks``);
  ``per_tensor`` keeps exactly ``floor(rho * n)`` entries of every tensor (``per_tensor_topk_masks``).
- ``embedding``: ``masked`` ranks the input embedding like any tensor; ``trainable`` sets its mask to
  True on every real row (padded rows stay False) and ranks the other tensors only, with
  ``k = floor(rho * their count)`` (or per tensor). With tied embeddings this also makes the output
  layer trainable (one tensor). The IoU then runs over the ranked tensors only.

Each step's history record (not its log line) also holds mask statistics: ``embedding_row_coverage``, the
fraction of the real input-embedding rows with at least one masked-in entry, and ``density_<type>``,
the kept fraction per tensor type (``TENSOR_TYPES``). They describe the private mask, so they belong to
the owner: the history goes to the run's metrics and Stage-I checkpoints, never to a release.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pmp_megatron import mcore
from pmp_megatron.config import Config, DiscoveryConfig, config_to_dict
from pmp_megatron.model.gpt import build_model
from pmp_megatron.model.params import EMBEDDING, OUTPUT, ShardInfo, shard_infos
from pmp_megatron.pmp import masks as pmp_masks
from pmp_megatron.pmp.select import global_topk_masks, iou, per_tensor_topk_masks
from pmp_megatron.train import checkpoint, signals
from pmp_megatron.train.optimizer import build_optimizer
from pmp_megatron.train.resume import Start, load_with_fallback
from pmp_megatron.train.step import gather_reduced_grads, train_step, wrap_ddp

logger = logging.getLogger(__name__)

# Tensor types of the per-type density statistics, in log order (see ``tensor_type``).
TENSOR_TYPES = ("embedding", "attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "norm", "output_layer", "other")


@dataclass
class DiscoveryResult:
    masks: dict[str, torch.Tensor] | None  # canonical name -> this rank's local mask shard (None: no step)
    steps: int  # Stage-I steps taken, a resumed run's earlier ones included
    stopped_early: bool  # the IoU rule stopped it before max_steps
    history: list[dict] = field(default_factory=list)  # per step: loss, lr, iou, threshold, mask stats, time
    preempted: bool = False  # stopped by a preemption signal (checkpointed when a root was given)
    scores: dict[str, torch.Tensor] | None = None  # name -> running score (``return_scores``), else None


def tensor_type(name: str) -> str:
    """The type of a canonical parameter name (``model.params``), for the per-type mask statistics."""
    if name == EMBEDDING:
        return "embedding"
    if name == OUTPUT:
        return "output_layer"
    if any("norm" in part for part in name.split(".")[-2:]):  # layer_norm_weight, final_layernorm
        return "norm"
    for part, kind in (("linear_qkv", "attn_qkv"), ("linear_proj", "attn_proj"), ("linear_fc1", "mlp_fc1"),
                       ("linear_fc2", "mlp_fc2")):
        if f".{part}." in name:
            return kind
    return "other"


def stage1_config(cfg: Config) -> Config:
    """The config Stage I builds its model and optimizer from: the parameter all-gather not overlapped
    with the next forward (the ranking reads the gradients in between) and the Stage-I AdamW betas."""
    out = copy.deepcopy(cfg)
    out.parallel.overlap_param_gather = False
    d = cfg.pmp.discovery
    if d.adam_beta1 is not None:
        out.optim.adam_beta1 = d.adam_beta1
    if d.adam_beta2 is not None:
        out.optim.adam_beta2 = d.adam_beta2
    return out


def stage1_lr(d: DiscoveryConfig, step: int) -> float:
    """The learning rate of Stage-I step ``step`` (0-based): linear warm-up to ``d.lr``."""
    if d.warmup_steps <= 0:
        return d.lr
    return d.lr * min(1.0, (step + 1) / d.warmup_steps)


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def _update_score(score: torch.Tensor, grad: torch.Tensor, d: DiscoveryConfig) -> None:
    """One step of the running score, in place (fp32)."""
    g = grad.detach().float()
    if d.score == "accumulated":
        score.add_(g.abs())
    else:  # ema
        score.mul_(d.ema_beta).addcmul_(g, g, value=1.0 - d.ema_beta)


def select_masks(scores: dict[str, tuple[torch.Tensor, ShardInfo]], rho: float, d: DiscoveryConfig):
    """The Stage-I masks of one step's scores under ``d.quota`` and ``d.embedding`` (collective over
    the model-parallel and the data-parallel group); returns (masks, threshold: the smallest kept score
    of any ranked tensor)."""
    ranked = {n: e for n, e in scores.items() if not (d.embedding == "trainable" and n == EMBEDDING)}
    # the data-parallel replicas hold the same scores: they share the counting (pmp/select.py)
    split = mcore.dp_group() if mcore.model_parallel_is_initialized() and mcore.dp_size() > 1 else None
    if d.quota == "per_tensor":
        masks, stats = per_tensor_topk_masks(ranked, rho, split_group=split)
        threshold = min((s.threshold for s in stats.values()), default=float("inf"))
    else:
        masks, stats = global_topk_masks(ranked, rho, split_group=split)
        threshold = stats.threshold
    for name in scores.keys() - ranked.keys():
        t, info = scores[name]
        masks[name] = info.real(t.shape, device=t.device)
    return masks, threshold


def mask_statistics(masks: dict, infos: dict[str, ShardInfo], vocab_size: int) -> dict:
    """The input embedding's row coverage and the density per tensor type of ``masks``, over the whole
    model (one all-reduce over the model-parallel group)."""
    num_types = len(TENSOR_TYPES)
    device = next(iter(masks.values())).device
    counts = torch.zeros(1 + 2 * num_types, dtype=torch.int64, device=device)
    for name, info in infos.items():
        if not info.counted:
            continue
        mask, kind = masks[name], TENSOR_TYPES.index(tensor_type(name))
        for lo, _ in info.local_slices():
            m = mask[lo]
            counts[1 + kind] += torch.count_nonzero(m)
            counts[1 + num_types + kind] += m.numel()
            if name == EMBEDDING:
                counts[0] += torch.count_nonzero(m.reshape(m.shape[0], -1).any(dim=1))
    counts = mcore.all_reduce(counts, group=mcore.model_parallel_group()).cpu()
    out = dict(embedding_row_coverage=int(counts[0]) / vocab_size)
    for i, kind in enumerate(TENSOR_TYPES):
        total = int(counts[1 + num_types + i])
        if total:
            out[f"density_{kind}"] = int(counts[1 + i]) / total
    return out


def discover(cfg: Config, microbatches: Callable[[int], list[dict]], root: Path | None = None,
             resume: Start | None = None, common: dict | None = None,
             on_step: Callable[[dict], None] | None = None, return_scores: bool = False) -> DiscoveryResult:
    """Run Stage I on this rank's share of the model. ``microbatches(step)`` returns this DP rank's
    microbatches for Stage-I step ``step`` (0-based; called for consecutive steps from the first one run).
    Needs megatron's parallel groups initialised.

    ``root``: where Stage-I checkpoints go (None: none are saved); ``resume``: a Stage-I checkpoint to
    continue from (older valid ones of its root are the fallbacks); ``common``: added to each Stage-I
    checkpoint's common state (its config is this run's); ``on_step(record)``: called after each step with
    its history record; ``return_scores``: keep the running scores (score accumulated / ema) in the result
    (4 bytes per parameter held after Stage I; for tests and analysis).
    """
    d, rho = cfg.pmp.discovery, cfg.pmp.rho
    if d.max_steps < 1:
        raise ValueError("pmp.discovery.max_steps must be >= 1 to discover a mask in pmp mode")
    scfg = stage1_config(cfg)
    running = d.score != "grad"

    def make():
        chunks = build_model(scfg, init_w0=resume is None)
        model = wrap_ddp(chunks, scfg)
        if running:  # zeros to start from or to load a checkpoint's scores into (they ride with the masks)
            for param, _ in shard_infos(model, cfg.model.vocab_size).values():
                param.pmp_score = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        return model, build_optimizer(model, scfg, lr=d.lr, weight_decay=0.0, clip_grad=d.clip_grad)

    prev, streak, history, first = None, 0, [], 0
    if resume is None:
        model, optimizer = make()
    else:
        resume, model, optimizer = load_with_fallback(cfg, resume, make, scfg)
        first, streak, history = resume.iteration, resume.common["streak"], list(resume.common["history"])
        if resume.common.get("has_masks"):
            prev = {n: pmp_masks.mask_of(p) for n, (p, _) in shard_infos(model, cfg.model.vocab_size).items()}
        logger.info("stage I resumed from %s at step %d", checkpoint.iter_dir(resume.root, first), first)
    entries = shard_infos(model, cfg.model.vocab_size)
    infos = {name: info for name, (_, info) in entries.items()}
    # the IoU stop rule compares the ranked tensors (an always-trainable embedding is not ranked)
    ranked_infos = {n: i for n, i in infos.items() if not (d.embedding == "trainable" and n == EMBEDDING)}
    ranked = {}

    def rank_grads():
        """After the backward, before the optimizer step: the mask of this step's score."""
        gather_reduced_grads(optimizer)
        if running:
            for param, _ in entries.values():
                _update_score(param.pmp_score, param.main_grad, d)
        scores = {n: (p.pmp_score if running else p.main_grad, i) for n, (p, i) in entries.items()}
        ranked["masks"], ranked["threshold"] = select_masks(scores, rho, d)

    def save(step):
        pmp_masks.attach(model, cfg.model.vocab_size, prev)  # the previous mask rides in the masks' state
        state = dict(common or {}, config=config_to_dict(cfg), stage="discovery", streak=streak,
                     history=history)
        checkpoint.save(root, step, model, optimizer, scfg, state, keep_last=2)

    step, preempted = first, False
    while step < d.max_steps and streak < d.patience:
        t0 = time.perf_counter()
        lr = stage1_lr(d, step)
        if d.warmup_steps > 0:
            _set_lr(optimizer, lr)
        batch = microbatches(step)
        if d.batch == "micro":
            batch = batch[:1]
        loss = train_step(model, optimizer, batch, scfg, after_backward=rank_grads).loss
        masks = ranked["masks"]
        overlap = iou(prev, masks, ranked_infos) if prev is not None else float("nan")
        stats = mask_statistics(masks, infos, cfg.model.vocab_size)
        streak = streak + 1 if prev is not None and overlap >= d.iou_threshold else 0
        prev = masks
        step += 1
        record = dict(step=step, loss=loss, lr=lr, iou=overlap, threshold=ranked["threshold"], **stats,
                      seconds=time.perf_counter() - t0)
        history.append(record)
        # the key's structure (row coverage, density per tensor type) stays out of log lines, which travel
        # (Slurm output, log collectors); it is in the record, i.e. the owner-side metrics and checkpoints
        logger.info("stage I step %d/%d | loss %.4f | lr %.3g | mask IoU %.4f | stable %d/%d", step,
                    d.max_steps, loss, lr, overlap, streak, d.patience)
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
    scores = {n: p.pmp_score for n, (p, _) in entries.items()} if running and return_scores else None
    return DiscoveryResult(masks=prev, steps=step, stopped_early=streak >= d.patience, history=history,
                           preempted=preempted, scores=scores)
