"""One training step on megatron-core: DDP wrapping, the forward step / loss, forward-backward through
megatron's pipeline schedules (no pipelining, 1F1B, or interleaved), and ``train_step`` (zero the
gradients, forward-backward, optimizer step), shared by the Trainer, Stage I discovery, the benchmarks
and the parity tests.

A batch is a dict of ``tokens``, ``labels``, ``loss_mask`` and ``position_ids``, each ``[b, s]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from pmp_megatron import mcore
from pmp_megatron.config import Config
from pmp_megatron.pmp.grad_mask import bucket_shares


def wrap_ddp(chunks, cfg: Config) -> list:
    """megatron DDP around each chunk; grads then accumulate in ``param.main_grad``.

    ``finalize_model_grads`` (DP reduction, TP all-reduce of SP norms, tied-embedding sync) runs at the
    end of each forward-backward; PMP wraps it to mask gradients after the reduction.
    """
    p = cfg.parallel
    ddp_config = mcore.DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        bucket_size=None if p.overlap_grad_reduce else 10**12,
    )
    model = [
        mcore.DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                      disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    tcfg = chunks[0].config
    tcfg.finalize_model_grads_func = mcore.finalize_model_grads
    tcfg.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    tcfg.grad_sync_func = None
    if p.overlap_param_gather and p.use_distributed_optimizer:
        tcfg.param_sync_func = [m.start_param_sync for m in model]
    return model


@torch.no_grad()
def gather_reduced_grads(optimizer) -> None:
    """Under the distributed optimizer: complete every gradient buffer after the reduce-scatter, so each
    rank holds all of the DP-reduced ``main_grad`` (as a plain all-reduce leaves it): each bucket's shares
    all-gathered over its data-parallel group. Nothing without the distributed optimizer. Stage I ranks
    the full gradients; the optimizer still reads only this rank's share."""
    for buf, bucket, (lo, hi) in bucket_shares(optimizer):
        if buf.data_parallel_world_size > 1:
            mine = buf.grad_data[lo:hi].clone()
            mcore.all_gather_into(bucket.grad_data, mine, group=buf.data_parallel_group)

def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Sum of token losses over the microbatch; the schedule divides by the token count."""
    losses = output.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(data_iterator, model):
    """megatron's forward_step_func: one microbatch through one model chunk."""
    batch = next(data_iterator)
    dev = mcore.device()
    output = model(
        batch["tokens"].to(dev),
        batch["position_ids"].to(dev),
        None,
        labels=batch["labels"].to(dev),
    )
    return output, partial(_loss_func, batch["loss_mask"].to(dev))


def forward_backward(model: list, microbatches: list[dict], cfg: Config, forward_only: bool = False,
                     forward_step_func: Callable = forward_step) -> float:
    """Run all ``microbatches`` through the pipeline schedule; return the mean token loss on every rank.

    ``model`` is the list of (DDP-wrapped) chunks. Each chunk gets its own iterator over the same
    microbatches: every chunk sees every microbatch once, in order, under every schedule.
    ``forward_step_func`` (default ``forward_step``) may compute its own loss; its loss function must
    return ``(loss sum, token count, {"lm loss": [loss sum, token count]})`` like ``_loss_func``.
    """
    iters = [iter(microbatches) for _ in model]
    seq_len = microbatches[0]["tokens"].shape[1]
    reduced = mcore.get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iters if len(model) > 1 else iters[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=seq_len,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    # Loss lives on the last pipeline stage: sum (loss, tokens) there, then share over PP and DP.
    total = torch.zeros(2, dtype=torch.float64)
    for item in reduced or []:
        total += item["lm loss"].double().cpu()
    mcore.all_reduce(total, group=mcore.pp_group())
    mcore.all_reduce(total, group=mcore.dp_group())
    return (total[0] / total[1]).item()


@dataclass(frozen=True)
class StepResult:
    """What one ``train_step`` did (identical on every rank)."""

    loss: float  # mean token loss over the global batch
    ok: bool  # False when the optimizer skipped the step (fp16 loss-scale overflow)
    grad_norm: float | None  # gradient norm before clipping (None or 0.0 without clipping or when skipped)


def zero_grads(model: list, optimizer) -> None:
    """Zero the DDP gradient buffers (``main_grad``) of every chunk and the optimizer's gradients."""
    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()


def train_step(model: list, optimizer, microbatches: list[dict], cfg: Config,
               after_backward: Callable[[], None] | None = None,
               forward_step_func: Callable = forward_step) -> StepResult:
    """One optimizer step over ``microbatches`` (this DP rank's share of the global batch): zero the
    gradients, forward-backward (gradients reduced into ``main_grad``), then ``optimizer.step`` (clipping
    inside). ``after_backward`` runs between the two, when the reduced gradients are complete (Stage I
    ranks them there). The LR schedule and the PMP complement policy are the caller's. ``forward_step_func``:
    as in ``forward_backward``."""
    zero_grads(model, optimizer)
    loss = forward_backward(model, microbatches, cfg, forward_step_func=forward_step_func)
    if after_backward is not None:
        after_backward()
    ok, grad_norm, _ = optimizer.step()
    return StepResult(loss=loss, ok=ok, grad_norm=grad_norm)
