"""The CPU gradient-mask kernel (``pmp/native.py``, ``pmp/csrc/masked_mul.c``) gives eager torch's
``grad.mul_(unpacked bits)`` bit for bit, on both of its paths (AVX2 and the table), from any bit offset
and for any length, in one piece or cut across threads; and without a compiler the mask still works,
eagerly, with one warning."""

from __future__ import annotations

import logging

import pytest
import torch

from pmp_megatron.pmp import bitmask, grad_mask, native


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """``native.library()`` built anew into an empty cache directory (and forgotten afterwards)."""
    monkeypatch.setenv("PMP_NATIVE_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    yield tmp_path / "cache"
    native.library.cache_clear()


def _special_grad(n: int, gen: torch.Generator) -> torch.Tensor:
    grad = torch.randn(n, generator=gen)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.5, 1e-40])
    grad[: min(n, 7)] = specials[: min(n, 7)]  # a NaN times 0 stays NaN; -x times 0 is -0.0
    return grad[torch.randperm(n, generator=gen)]


def _eager(grad, packed, start):
    return grad.clone().mul_(bitmask.unpack_bits(packed, start, grad.numel()))


@pytest.mark.parametrize("table", [False, True], ids=["dispatch", "table"])
def test_the_kernel_is_the_eager_product_bit_for_bit(fresh_library, table):
    assert native.library() is not None, "no C compiler on this machine: the kernel is untested"
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(4096 + 64, generator=gen) < 0.5
    packed = bitmask.pack(mask)
    for start in range(0, 17):
        for n in (0, 1, 5, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 4096):
            grad = _special_grad(n, gen)
            out = grad.clone()
            assert native.masked_mul_(out, packed, start, table=table)
            bits = out.view(torch.int32)
            assert torch.equal(bits, _eager(grad, packed, start).view(torch.int32)), (start, n)
            assert torch.equal(bits, grad.mul(mask[start:start + n]).view(torch.int32)), (start, n)


def test_the_kernel_takes_a_view_into_a_buffer_and_leaves_the_rest_alone(fresh_library):
    gen = torch.Generator().manual_seed(1)
    buffer = torch.randn(10_000, generator=gen)
    mask = torch.rand(10_000, generator=gen) < 0.3
    packed = bitmask.pack(mask)
    out = buffer.clone()
    grad_mask._masked_mul(out[1234:8765], packed, 1234)  # a bucket share, as BufferMasks.apply passes it
    ref = buffer.clone()
    ref[1234:8765].mul_(mask[1234:8765])
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


def test_other_dtypes_and_layouts_are_left_to_eager_torch(fresh_library):
    packed = bitmask.pack(torch.ones(64, dtype=torch.bool))
    assert not native.masked_mul_(torch.ones(64, dtype=torch.bfloat16), packed, 0)
    assert not native.masked_mul_(torch.ones(8, 16)[:, :8], packed, 0)  # not contiguous
    with pytest.raises(AssertionError):
        native.masked_mul_(torch.ones(64), packed, 1)  # past the mask's end


def test_the_build_is_cached_and_a_failed_build_falls_back_with_one_warning(fresh_library, monkeypatch,
                                                                               caplog):
    assert native.library() is not None
    [built] = fresh_library.iterdir()
    stamp = built.stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None and built.stat().st_mtime_ns == stamp  # loaded, not rebuilt

    monkeypatch.setenv("CC", "false")  # a compiler that fails: another key, nothing built
    native.library.cache_clear()
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.library() is None
        assert native.library() is None
    assert [r.getMessage() for r in caplog.records if "not available" in r.getMessage()] == [
        "the CPU gradient-mask kernel is not available (false failed on masked_mul.c: exit 1): eager torch "
        "masks instead (the same result, slower)"]
    assert list(fresh_library.iterdir()) == [built]  # no temporary left behind

    gen = torch.Generator().manual_seed(2)
    grad, mask = torch.randn(1000, generator=gen), torch.rand(1003, generator=gen) < 0.5
    out = grad.clone()
    grad_mask._masked_mul(out, bitmask.pack(mask), 3)  # the eager path
    assert torch.equal(out.view(torch.int32), grad.mul(mask[3:]).view(torch.int32))


def test_pmp_native_0_turns_the_kernel_off(fresh_library, monkeypatch):
    monkeypatch.setenv("PMP_NATIVE", "0")
    assert native.library() is None
    assert not native.masked_mul_(torch.ones(8), bitmask.pack(torch.ones(8, dtype=torch.bool)), 0)
    assert not fresh_library.exists()


def test_several_torch_threads_cut_a_large_range_into_pieces(fresh_library, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    n = native._PARALLEL_MIN + 12345
    grad, mask = torch.randn(n, generator=gen), torch.rand(n + 5, generator=gen) < 0.5
    packed = bitmask.pack(mask)
    calls = []
    lib = native.library()
    kernel = lib.pmp_masked_mul_f32
    monkeypatch.setattr(lib, "pmp_masked_mul_f32", lambda *args: calls.append(args[2:]) or kernel(*args))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    out = grad.clone()
    assert native.masked_mul_(out, packed, 5)
    assert torch.equal(out.view(torch.int32), grad.mul(mask[5:]).view(torch.int32))
    size = -(-n // 3)
    assert sorted(calls) == [(5, size), (5 + size, size), (5 + 2 * size, n - 2 * size)]

