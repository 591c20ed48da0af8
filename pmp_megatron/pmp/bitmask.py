"""Masks at one bit per entry: bool tensors packed 8 entries per byte, and views into a packed range.

Entry ``i`` of a packed range is bit ``i % 8`` (least significant first) of byte ``i // 8``. A ``BitMask`` is
a view: a packed ``uint8`` storage, the bit where the mask starts in it, and the mask's shape, so the masks of
many parameters can share one storage (``pmp/grad_mask.py`` packs a whole gradient buffer and points every
parameter's mask into it). Unpacking reads only the bytes that cover the view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_CHUNK = 1 << 24  # entries packed or unpacked per pass: bounds the transient (1 byte per entry)


def _shifts(device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (any shape, bool) flattened and packed: uint8 of ``ceil(numel / 8)`` bytes."""
    flat = mask.reshape(-1)
    out = torch.empty(math.ceil(flat.numel() / 8), dtype=torch.uint8, device=flat.device)
    shifts = _shifts(flat.device)
    for lo in range(0, flat.numel(), _CHUNK):
        part = flat[lo: lo + _CHUNK].to(torch.uint8)
        if part.numel() % 8:
            part = torch.cat([part, part.new_zeros(8 - part.numel() % 8)])
        out[lo // 8: lo // 8 + part.numel() // 8] = (part.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)
    return out


def unpack_bits(packed: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    """Entries ``[start, start + numel)`` of a packed range, as uint8 0/1 (multiply by it to mask)."""
    first, last = start // 8, math.ceil((start + numel) / 8)
    bits = (packed[first:last].unsqueeze(1) >> _shifts(packed.device)) & 1  # [bytes, 8]
    return bits.view(-1)[start - 8 * first: start - 8 * first + numel]


@dataclass
class BitMask:
    """A mask of ``shape`` stored at one bit per entry from bit ``offset`` of ``packed`` (see module)."""

    packed: torch.Tensor  # uint8, 1-D
    offset: int
    shape: torch.Size

    @classmethod
    def of(cls, mask: torch.Tensor) -> BitMask:
        """A packed copy of the bool tensor ``mask`` in a storage of its own."""
        return cls(pack(mask), 0, mask.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def bool(self) -> torch.Tensor:
        """The mask unpacked (a new bool tensor of ``shape``)."""
        return self.flat(0, self.numel).view(self.shape)

    def flat(self, lo: int, hi: int) -> torch.Tensor:
        """Flat entries ``[lo, hi)`` of the mask, unpacked to bool."""
        assert 0 <= lo <= hi <= self.numel, (lo, hi, self.numel)
        out = torch.empty(hi - lo, dtype=torch.bool, device=self.device)
        for a in range(lo, hi, _CHUNK):
            b = min(hi, a + _CHUNK)
            out[a - lo: b - lo] = unpack_bits(self.packed, self.offset + a, b - a).bool()
        return out

    def count(self) -> int:
        """Entries set (a host sync)."""
        return sum(int(self.flat(a, min(self.numel, a + _CHUNK)).sum())
                   for a in range(0, self.numel, _CHUNK))
