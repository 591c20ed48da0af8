"""Masks at one bit per entry (``pmp/bitmask.py``): packing round-trips at any length and offset, views
into a shared storage read only their own bits, and the packed size is one bit per entry."""

import math

import pytest
import torch

from pmp_megatron.pmp import bitmask
from pmp_megatron.pmp.bitmask import BitMask


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 63, 64, 1000, 4097])
def test_pack_round_trips_and_takes_one_bit_per_entry(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.5
    packed = bitmask.pack(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 8)
    assert torch.equal(bitmask.unpack_bits(packed, 0, numel).bool(), mask)
    assert torch.equal(BitMask.of(mask.view(-1, 1)).bool(), mask.view(-1, 1))
    assert BitMask.of(mask).count() == int(mask.sum())


def test_bit_order_is_least_significant_first():
    packed = bitmask.pack(torch.tensor([True, False, False, False, False, False, False, False, False, True]))
    assert packed.tolist() == [1, 2]


def test_views_into_one_storage_read_their_own_bits_at_any_offset():
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2, 3), (1,), (11, 3)]
    masks = [torch.rand(s, generator=gen) < 0.3 for s in shapes]
    flat = torch.cat([m.reshape(-1) for m in masks])
    packed = bitmask.pack(flat)
    start = 0
    for m in masks:
        view = BitMask(packed, start, m.shape)
        assert torch.equal(view.bool(), m)
        for lo, hi in ((0, m.numel()), (1, m.numel()), (m.numel() // 2, m.numel())):
            assert torch.equal(view.flat(lo, hi), m.reshape(-1)[lo:hi])
        start += m.numel()


def test_masking_by_the_unpacked_bits_is_the_bool_product_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(1001, generator=gen)
    mask = torch.rand(1001, generator=gen) < 0.5
    packed = bitmask.pack(torch.cat([torch.zeros(5, dtype=torch.bool), mask]))
    out = grad.clone().mul_(bitmask.unpack_bits(packed, 5, 1001))
    ref = grad.clone().mul_(mask)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))  # signs of zeros included


def test_the_eager_gradient_mask_multiplies_across_cpu_chunks_from_an_unaligned_start(monkeypatch):
    from pmp_megatron.pmp import grad_mask, native

    monkeypatch.setattr(native, "masked_mul_", lambda *_: False)  # as without a C compiler

    gen = torch.Generator().manual_seed(2)
    n = 2 * grad_mask._CPU_CHUNK + 12345  # three chunks, the last partial
    mask = torch.rand(n + 3, generator=gen) < 0.5
    grad = torch.randn(n, generator=gen)
    out = grad.clone()
    grad_mask._masked_mul(out, bitmask.pack(mask), 3)
    assert torch.equal(out.view(torch.int32), grad.mul(mask[3:]).view(torch.int32))
