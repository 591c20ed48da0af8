"""One test per patch of pmp_megatron.compat.cpu, each in a fresh process (the shim patches globally),
plus the inertness check on machines with CUDA."""

import pytest
import torch

from pmp_megatron.testing import spawn


def _rng_patch():
    from pmp_megatron.compat import cpu

    assert cpu.activate()
    from megatron.core import tensor_parallel

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    after_state = torch.get_rng_state()
    outside = torch.rand(4)
    # The fork swapped in the tracker's (seed 123 + 2718) stream and restored the default one.
    torch.manual_seed(123 + 2718)
    expected_inside = torch.rand(4)
    return (torch.equal(before, after_state), torch.equal(inside, expected_inside),
            torch.equal(inside, outside))


def _device_patch():
    from pmp_megatron.compat import cpu

    cpu.activate()
    s = torch.cuda.current_stream()
    s.wait_stream(torch.cuda.Stream())
    torch.cuda.synchronize()
    torch.cuda.set_device(0)
    return str(torch.cuda.current_device()), torch.cuda.max_memory_allocated()


def _cuda_tensor_patch():
    from pmp_megatron.compat import cpu

    cpu.activate()
    from megatron.core.transformer.utils import get_default_causal_mask

    t = torch.ones(3)
    mask = get_default_causal_mask(4)
    return (torch.zeros(2, device="cuda").device.type, t.cuda() is t, t.to("cuda").device.type,
            t.type(), mask.device.type, mask.tolist())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is inert with CUDA")
def test_rng_is_routed_to_the_cpu_generator():
    restored, forked_stream, differs = spawn(_rng_patch, 1)[0]
    assert restored and forked_stream and not differs


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is inert with CUDA")
def test_current_device_streams_and_memory_stats():
    device, mem = spawn(_device_patch, 1)[0]
    assert device == "cpu" and mem == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is inert with CUDA")
def test_cuda_tensors_cuda_calls_and_type_names_map_to_cpu():
    zeros_dev, cuda_is_self, to_dev, type_name, mask_dev, mask = spawn(_cuda_tensor_patch, 1)[0]
    assert (zeros_dev, cuda_is_self, to_dev, mask_dev) == ("cpu", True, "cpu", "cpu")
    assert type_name == "torch.cuda.FloatTensor"
    assert mask == [[False, True, True, True], [False, False, True, True],
                    [False, False, False, True], [False, False, False, False]]


def _activate_flag():
    from pmp_megatron.compat import cpu

    return cpu.activate(), cpu.ACTIVE, torch.cuda.is_available()


def test_shim_active_exactly_when_cuda_is_missing():
    returned, flag, has_cuda = spawn(_activate_flag, 1)[0]
    assert returned is flag
    assert flag is (not has_cuda)


@pytest.mark.gpu
def test_shim_is_inert_with_cuda():
    from pmp_megatron.compat import cpu

    assert cpu.activate() is False and cpu.ACTIVE is False
    assert isinstance(torch.cuda.current_device(), int)
