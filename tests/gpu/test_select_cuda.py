"""GPU tier: the Stage-I selection on CUDA reads back to the host once per radix pass, not once per tensor
(``torch.bincount`` and boolean indexing each sync; ``pmp/select.py`` avoids both), and selects exactly the
CPU selection's masks. Skipped without CUDA (conftest)."""

import warnings

import pytest
import torch

from pmp_megatron.model.params import ShardInfo
from pmp_megatron.pmp import select

pytestmark = pytest.mark.gpu


def _entries(device):
    gen = torch.Generator().manual_seed(0)
    shapes = {f"layer{i}.weight": (64 + i, 96) for i in range(40)}
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen).to(device)
        out[name] = (t, ShardInfo(name=name, global_shape=shape, dim=0, blocks=((0, 0, shape[0]),),
                                  counted=True))
    return out


@pytest.mark.parametrize("selector", ["global", "per_tensor"])
def test_selection_syncs_once_per_pass_and_matches_the_cpu(selector):
    fn = select.global_topk_masks if selector == "global" else select.per_tensor_topk_masks
    cpu_masks, _ = fn(_entries("cpu"), 0.3)
    entries = _entries("cuda")
    fn(entries, 0.3)  # warm-up (kernels, caches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            masks, _ = fn(entries, 0.3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    passes = len(select._VALUE_DIGITS if selector == "global" else select._TENSOR_VALUE_DIGITS)
    print(f"select_cuda_{selector}: {len(syncs)} host syncs for {len(entries)} tensors, {passes} passes")
    assert len(syncs) <= passes + 1, [str(w.message) for w in syncs]
    assert all(torch.equal(masks[n].cpu(), m) for n, m in cpu_masks.items())
