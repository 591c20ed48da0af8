"""Token losses and predictions from vocab-parallel logits: the metrics of ``runner.evaluate`` (HF's, over
the full vocabulary of one process) computed on megatron's last pipeline stage, where each tensor-parallel
rank holds the logits of its slice of the (padded) vocabulary, ``[b, s, V_pad / TP]``.

The padded vocabulary rows (``model.make_vocab_size_divisible_by``) are not in the HF model: their logits
are set to -inf before any loss or argmax, so the softmax, the loss and its gradient are those of the real
vocabulary (the padded rows of the output layer get no gradient). Predictions are the FIRST index of the
maximum over the whole vocabulary, as ``torch.argmax`` gives it in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pmp_megatron import mcore


def _slice(logits: torch.Tensor, vocab_size: int) -> tuple[int, int]:
    """(global index of this rank's first column, number of its columns in the real vocabulary)."""
    n = logits.shape[-1]
    start = mcore.tp_rank() * n
    return start, max(0, min(vocab_size - start, n))


def real_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 ``logits`` ``[..., V_pad / TP]`` with the padded vocabulary's columns at -inf (a new tensor)."""
    logits = logits.float()
    _, num_real = _slice(logits, vocab_size)
    if num_real == logits.shape[-1]:
        return logits.clone()
    padded = torch.arange(logits.shape[-1], device=logits.device) >= num_real
    return logits.masked_fill(padded, float("-inf"))


def token_losses(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cross entropy of every position ``[b, s]`` over the real vocabulary (``labels``: global ids)."""
    return mcore.vocab_parallel_cross_entropy(real_logits(logits, vocab_size), labels)


@torch.no_grad()
def argmax(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The global id of each position's largest real logit ``[b, s]`` (the first one on ties)."""
    start, _ = _slice(logits, vocab_size)
    values, index = real_logits(logits, vocab_size).max(dim=-1)
    if mcore.tp_size() == 1:
        return index
    best = mcore.all_reduce(values.clone(), group=mcore.tp_group(), op=dist.ReduceOp.MAX)
    none = torch.iinfo(torch.int64).max
    candidate = torch.where(values == best, index + start, torch.full_like(index, none))
    return mcore.all_reduce(candidate, group=mcore.tp_group(), op=dist.ReduceOp.MIN)


@torch.no_grad()
def label_argmax(logits: torch.Tensor, label_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Among the global ids ``label_ids`` ``[L]``, the one with the largest logit at each position
    ``[b, s]`` (the first of ``label_ids`` on ties)."""
    start, num_real = _slice(logits, vocab_size)
    mine = (label_ids >= start) & (label_ids < start + num_real)
    chosen = torch.full((*logits.shape[:-1], label_ids.numel()), float("-inf"), device=logits.device)
    chosen[..., mine] = logits.float()[..., label_ids[mine] - start]
    if mcore.tp_size() > 1:
        mcore.all_reduce(chosen, group=mcore.tp_group(), op=dist.ReduceOp.MAX)
    return label_ids[chosen.argmax(dim=-1)]
