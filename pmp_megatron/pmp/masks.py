"""Per-shard PMP masks, owned by the parameters they mask.

Each parameter of every model chunk (TP-sharded or replicated, every PP and virtual stage, embeddings and
output layer included) carries ``param.pmp_mask_bits``: a ``BitMask`` (``pmp/bitmask.py``, one bit per
entry) of the parameter's LOCAL shape, True = trainable (kept); ``mask_of(param)`` unpacks it. Padded
vocabulary rows are always False. Stage II points these views into one packed mask per gradient buffer
(``pmp/grad_mask.py``).

For checkpoints the masks' sharded state MIRRORS each weight's own sharded state: the same global shape,
offsets, replica id and -- for SwiGLU ``linear_fc1``, whose TP shard is ``[gate_r; up_r]`` -- the same
ShardedTensorFactory, only with the key prefixed and the data swapped for the mask. dist_checkpointing
therefore reshards masks on load exactly as it reshards weights (a mask kept as a plain buffer would be
resharded wrongly at a TP change, or dropped by VocabParallelEmbedding).

Stage I's running score (``param.pmp_score``: fp32, the parameter's local shape; only with
``pmp.discovery.score`` accumulated / ema) rides along the same way, under ``pmp_score.`` keys, whenever
the parameters carry one -- on load too: give the fresh parameters zero scores first to load into.
"""

from __future__ import annotations

import dataclasses

import torch

from pmp_megatron import mcore
from pmp_megatron.model.params import shard_infos
from pmp_megatron.pmp.bitmask import BitMask

MASK_PREFIX = "pmp_mask."
SCORE_PREFIX = "pmp_score."


def attach(chunks, vocab_size: int, masks: dict[str, torch.Tensor]) -> None:
    """Give every parameter its mask (``masks``: canonical name -> local bool tensor)."""
    infos = shard_infos(chunks, vocab_size)
    missing = sorted(set(infos) - set(masks))
    if missing:
        raise ValueError(f"no PMP mask for parameter(s) {missing[:3]}")
    for name, (param, info) in infos.items():
        mask = masks[name].to(device=param.device, dtype=torch.bool)
        if mask.shape != param.shape:
            raise ValueError(
                f"PMP mask for {name} has shape {tuple(mask.shape)}, parameter {tuple(param.shape)}"
            )
        param.pmp_mask_bits = BitMask.of(mask & info.real(param.shape, device=param.device))


def mask_of(param) -> torch.Tensor:
    """The parameter's mask unpacked: a new bool tensor of its local shape."""
    return param.pmp_mask_bits.bool()


def has_mask(param) -> bool:
    return hasattr(param, "pmp_mask_bits")


def detach(chunks) -> None:
    """Remove every parameter's mask (a model that goes on dense)."""
    for chunk in chunks:
        for param in chunk.parameters():
            if has_mask(param):
                del param.pmp_mask_bits


def has_masks(chunks) -> bool:
    return all(has_mask(p) for chunk in chunks for p in chunk.parameters())


def sharded_state_dict(chunks, empty: bool = False) -> dict:
    """Sharded state of the masks, mirroring each weight's own sharded state (see module docstring).

    ``empty=True`` gives fresh tensors to load into (then call ``attach_loaded``); otherwise the data are
    the parameters' current masks, unpacked for the save (a byte per entry while the state is alive).
    Keys are the weights' checkpoint keys with ``pmp_mask.`` in front; a
    parameter's ``pmp_score`` (when it has one) is mirrored likewise under ``pmp_score.``.
    """
    out = {}
    for i, chunk in enumerate(chunks):
        by_ptr = {p.data_ptr(): p for p in mcore.unwrap(chunk).parameters()}
        for key, sh in mcore.unwrap(chunk).sharded_state_dict().items():
            data = getattr(sh, "data", None)
            if not isinstance(data, torch.Tensor) or data.data_ptr() not in by_ptr:
                continue
            param = by_ptr[data.data_ptr()]
            if data.shape != param.shape:  # a view of a fused buffer, not the parameter itself
                continue
            if empty:
                mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
            else:
                mask = mask_of(param)
            out[f"chunk{i}.{key}"] = _mirror(sh, MASK_PREFIX, mask, param, "pmp_mask")
            score = getattr(param, "pmp_score", None)
            if score is not None:
                data = torch.zeros_like(score) if empty else score
                out[f"chunk{i}.score.{key}"] = _mirror(sh, SCORE_PREFIX, data, param, "pmp_score")
    return out


def _mirror(sh, prefix: str, data: torch.Tensor, param, attr: str):
    """``sh`` with the key prefixed and ``data`` in place of the weight. ShardedTensor and
    ShardedTensorFactory (SwiGLU fc1) alike: same placement, other key/data."""
    fields = dict(key=prefix + sh.key, data=data)
    if hasattr(sh, "dtype"):
        fields["dtype"] = data.dtype
    mirrored = dataclasses.replace(sh, **fields)
    mirrored.pmp_param, mirrored.pmp_attr = param, attr
    return mirrored


def attach_loaded(loaded: dict, template: dict) -> None:
    """Put masks loaded by dist_checkpointing (into ``template`` from ``sharded_state_dict(empty=True)``)
    onto their parameters."""
    for key, sh in template.items():
        value = loaded[key]
        value = value if isinstance(value, torch.Tensor) else value.data
        if sh.pmp_attr == "pmp_mask":
            sh.pmp_param.pmp_mask_bits = BitMask.of(value.to(torch.bool))
        else:
            sh.pmp_param.pmp_score = value.to(torch.float32)


def density(chunks, vocab_size: int) -> float:
    """Fraction of real parameters masked in (counted once over the model-parallel group)."""
    kept = torch.zeros(2, dtype=torch.float64)
    for param, info in shard_infos(chunks, vocab_size).values():
        if info.counted:
            kept[0] += param.pmp_mask_bits.count()
            kept[1] += info.numel()
    if torch.distributed.is_initialized():
        mcore.all_reduce(kept, group=mcore.model_parallel_group())
    return (kept[0] / kept[1]).item()
