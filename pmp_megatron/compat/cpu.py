"""CPU/gloo compatibility shim for megatron-core: lets the real layers, schedules, DDP, optimizers and
dist_checkpointing run on a machine without CUDA. It is inert when CUDA is available: ``activate()``
returns False and patches nothing, and ``ACTIVE`` stays False.

megatron-core assumes a GPU in a handful of places. Each patch below names the upstream call site it
exists for (megatron-core 0.19). Nothing here changes numerics: on CPU every op runs as written, only
device placement, stream bookkeeping and the "CUDA" RNG state are routed to their CPU equivalents.

1. RNG tracker -- ``tensor_parallel/random.py``: ``model_parallel_cuda_manual_seed`` and
   ``CudaRNGStatesTracker.add/fork`` call ``torch.cuda.manual_seed/get_rng_state`` and the module's
   ``_get_cuda_rng_state/_set_cuda_rng_state`` (which queue a lazy CUDA call that never runs on CPU).
   They are routed to the CPU default generator, so forks swap CPU RNG state as they would swap CUDA's.
   ``torch.cuda.manual_seed_all`` is left alone: ``torch.manual_seed`` calls it (patching it recursed).
2. Device and streams -- ``torch.cuda.current_device()`` is used as a device in ~100 places (RoPE
   ``inv_freq``, TP gathers, p2p shapes, DDP buffers): it returns the CPU device; ``synchronize`` and
   ``set_device`` are no-ops; ``current_stream``/``Stream``/``Event``/``stream`` are inert stand-ins
   (``distributed/param_and_grad_buffer.py`` calls ``current_stream`` unconditionally in 0.19).
3. ``device="cuda"`` and ``.cuda()`` -- ``transformer/utils.py::get_default_causal_mask``,
   ``pipeline_parallel/schedules.py`` (``total_num_tokens``), ``optimizer/clip_grads.py``,
   ``optimizer/optimizer.py`` and ``grad_scaler.py`` create tensors on "cuda"; tied embeddings with
   PP>1 call ``.cuda()``. A TorchFunctionMode maps those to CPU. ``clip_grads.py`` and
   ``optimizer.py`` assert ``tensor.type() == 'torch.cuda.FloatTensor'``: ``Tensor.type()`` reports
   the CUDA type name. The mode costs ~1.4-2x on tiny models and nothing on GPUs (never entered).
4. Memory statistics -- ``torch.cuda.max_memory_allocated`` & co. report 0 instead of raising.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

ACTIVE = False
"""True once ``activate()`` patched this process (never on a machine with CUDA)."""

_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int as a device means "cuda:<int>" to torch factories.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Maps ``device='cuda'`` / ``.cuda()`` / ``.to('cuda')`` to CPU (patch 3)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _InertStream:
    """Stands in for ``torch.cuda.Stream``/``Event`` (patch 2): every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def query(self) -> bool:
        return True


def _patch_rng() -> None:
    """Patch 1: the "CUDA" RNG is the CPU default generator."""
    from megatron.core.tensor_parallel import random as mcore_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    mcore_random._get_cuda_rng_state = get_state
    mcore_random._set_cuda_rng_state = set_state


def _patch_device_and_streams() -> None:
    """Patches 2 and 4."""
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.set_device = lambda device: None
    torch.cuda.current_stream = lambda device=None: _InertStream()
    torch.cuda.default_stream = lambda device=None: _InertStream()
    torch.cuda.Stream = _InertStream
    torch.cuda.Event = _InertStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    for name in ("max_memory_allocated", "memory_allocated", "max_memory_reserved", "memory_reserved"):
        setattr(torch.cuda, name, lambda device=None: 0)
    torch.cuda.reset_peak_memory_stats = lambda device=None: None


_MODE: CudaToCpuMode | None = None


def activate() -> bool:
    """Patch this process for CPU if CUDA is unavailable; return whether the shim is active.

    Idempotent. Call it before building megatron-core objects (``pmp_megatron.mcore`` does).
    """
    global ACTIVE, _MODE
    if ACTIVE:
        return True
    if torch.cuda.is_available():
        return False
    _patch_rng()
    _patch_device_and_streams()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    ACTIVE = True
    logger.debug("CPU shim active: megatron-core CUDA calls are routed to CPU")
    return True
