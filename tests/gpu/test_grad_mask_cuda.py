"""GPU tier: the gradient mask's fused CUDA kernel (``torch.compile`` of unpack + multiply,
``pmp/grad_mask.py``) gives the eager product bit for bit, at byte-unaligned ranges too. Skipped without
CUDA (conftest)."""

import pytest
import torch

from pmp_megatron.pmp import bitmask, grad_mask

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_masked_multiply_is_the_eager_one(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = (1 << 20) + 13
    mask = torch.rand(n, generator=gen, device="cuda") < 0.5
    packed = bitmask.pack(mask)
    fused = grad_mask._fused_masked_mul()
    for lo, hi in ((0, n), (5, n - 3), (4096 + 3, 3 * 4096 + 1)):
        grad = torch.randn(n, generator=gen, device="cuda").to(dtype)
        eager, compiled = grad.clone(), grad.clone()
        grad_mask._masked_mul(eager[lo:hi], packed, lo)
        fused(compiled[lo:hi], packed, lo)
        torch.cuda.synchronize()
        assert torch.equal(compiled.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           eager.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        assert torch.equal(eager[lo:hi], grad[lo:hi] * mask[lo:hi])
