"""The PMP gradient mask laid out like megatron's gradient buffers: one packed op per range.

Megatron's DDP keeps every gradient of a model chunk in flat buffers (``param.main_grad`` is a view into
one). ``BufferMasks`` packs the parameters' masks into one bit mask per buffer, in the buffer's own
layout (padding entries 0), and then points each parameter's ``pmp_mask_bits`` into it: the masks cost one
bit per buffer entry in all, not one per parameter plus one per buffer.

Masking (``apply``) multiplies one range of each buffer by the unpacked bits:

- the non-distributed optimizer reads every gradient: one range per buffer, the whole of it;
- the distributed optimizer reads only this rank's share of each bucket (the range megatron's
  ``DistributedOptimizer._build_model_gbuf_range`` gives it: ``bucket.offset + r * size / DP`` on), after
  the reduce-scatter: one range per bucket, 1/DP of the buffer. The other shares hold partial sums no one
  reads.

The product is the one ``param.main_grad.mul_(mask)`` gave per parameter, bit for bit (x * 1 and x * 0 in
the gradient's dtype). On CUDA each range is one compiled kernel (unpack and multiply fused by
``torch.compile``); on the CPU one pass of a small C kernel (``pmp/native.py``), or where it cannot be
built a few eager ops per cache-sized chunk of the range.
"""

from __future__ import annotations

import logging

import torch

from pmp_megatron.pmp import bitmask, native
from pmp_megatron.pmp.bitmask import BitMask

logger = logging.getLogger(__name__)

_WINDOW = 1 << 24  # buffer entries packed per pass when binding (multiple of 8)


_CPU_CHUNK = 1 << 18  # entries per unpack-and-multiply on the CPU: the unpacked bits stay in cache


def _masked_mul(grad: torch.Tensor, packed: torch.Tensor, start: int) -> None:
    """``grad *= bits [start, start + grad.numel())`` of ``packed``. On the CPU fp32 one pass of the native
    kernel (``pmp/native.py``); otherwise eager, in chunks: one pass over a buffer-sized uint8 temporary
    costs as much again as the multiply (measured 2x at 25M entries)."""
    if grad.is_cuda:
        grad.mul_(bitmask.unpack_bits(packed, start, grad.numel()))
        return
    if native.masked_mul_(grad, packed, start):
        return
    for lo in range(0, grad.numel(), _CPU_CHUNK):
        hi = min(grad.numel(), lo + _CPU_CHUNK)
        grad[lo:hi].mul_(bitmask.unpack_bits(packed, start + lo, hi - lo))


_FUSED = None


def _fused_masked_mul():
    global _FUSED
    if _FUSED is None:
        _FUSED = torch.compile(_masked_mul, dynamic=True)
    return _FUSED


def _buffer_of(param) -> tuple[torch.Tensor, int]:
    """(the flat gradient buffer ``param.main_grad`` is a view of, the view's first entry in it)."""
    grad = param.main_grad
    base = grad if grad._base is None else grad._base
    assert base.dim() == 1 and base.is_contiguous(), "main_grad is not a view of a flat gradient buffer"
    return base, grad.storage_offset() - base.storage_offset()


def bucket_shares(optimizer):
    """Under the distributed optimizer, for each bucket of each gradient buffer it steps: (the buffer, the
    bucket, this rank's (lo, hi) share of the bucket in the buffer's entries), as megatron's
    ``DistributedOptimizer._build_model_gbuf_range`` cuts it. Nothing without the distributed optimizer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for buf in getattr(opt, "buffers", []):
            rank, size = buf.data_parallel_group.rank(), buf.data_parallel_world_size
            for bucket in buf.buckets:
                share = bucket.grad_data.numel() // size
                yield buf, bucket, (bucket.offset + rank * share, bucket.offset + (rank + 1) * share)


def _shares(optimizer) -> dict[int, list[tuple[int, int]]]:
    """data_ptr of each gradient buffer -> this rank's (lo, hi) share of each of its buckets."""
    out: dict[int, list[tuple[int, int]]] = {}
    for buf, _, span in bucket_shares(optimizer):
        out.setdefault(buf.grad_data.data_ptr(), []).append(span)
    return out


class BufferMasks:
    """Packed masks of ``params`` (each carrying ``pmp_mask_bits``) in their gradient buffers' layout.

    ``optimizer``: the megatron optimizer stepping them; under the distributed optimizer only this rank's
    share of each bucket is masked. Afterwards each parameter's ``pmp_mask_bits`` is a view into the packed
    buffer mask (the parameter's own packed copy is dropped)."""

    def __init__(self, params, optimizer):
        buffers: dict[int, tuple[torch.Tensor, list]] = {}
        for p in params:
            base, start = _buffer_of(p)
            buffers.setdefault(base.data_ptr(), (base, []))[1].append((start, p))
        shares = _shares(optimizer)
        self.ranges = []  # (flat gradient buffer, its packed mask, lo, hi)
        for key, (base, members) in buffers.items():
            packed = self._pack(base, sorted(members, key=lambda m: m[0]))
            for lo, hi in shares.get(key, [(0, base.numel())]):
                if hi > lo:
                    self.ranges.append((base, packed, lo, hi))
        self.fused = torch.cuda.is_available() and any(b.is_cuda for b, *_ in self.ranges)

    @staticmethod
    @torch.no_grad()
    def _pack(base: torch.Tensor, members) -> torch.Tensor:
        """One bit per entry of ``base``: each parameter's mask at its place, 0 elsewhere; then each
        parameter's ``pmp_mask_bits`` becomes a view of it."""
        n = base.numel()
        packed = torch.empty((n + 7) // 8, dtype=torch.uint8, device=base.device)
        i = 0
        for lo in range(0, n, _WINDOW):
            hi = min(n, lo + _WINDOW)
            window = torch.zeros(hi - lo, dtype=torch.bool, device=base.device)
            while i < len(members) and members[i][0] < hi:
                start, p = members[i]
                end = start + p.numel()
                a, b = max(start, lo), min(end, hi)
                window[a - lo: b - lo] = p.pmp_mask_bits.flat(a - start, b - start)
                if end > hi:
                    break  # continues into the next window
                i += 1
            packed[lo // 8: (hi + 7) // 8] = bitmask.pack(window)
        for start, p in members:
            p.pmp_mask_bits = BitMask(packed, start, p.shape)
        return packed

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the complement's gradients in every range this rank's optimizer reads."""
        mul = _fused_masked_mul() if self.fused else _masked_mul
        for base, packed, lo, hi in self.ranges:
            mul(base[lo:hi], packed, lo)

    def nbytes(self) -> int:
        """Bytes of packed mask storage (each buffer's once)."""
        return sum({packed.data_ptr(): packed.numel() for _, packed, _, _ in self.ranges}.values())
