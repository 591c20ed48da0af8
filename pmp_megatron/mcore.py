"""The one adapter through which pmp_megatron reaches megatron-core.

Every megatron-core import of the package lives here, so an upstream move (GPTModel -> HybridModel,
a renamed optimizer builder) touches this file only. It also owns process-group setup: torch.distributed
from the launcher's environment (torchrun, srun, or our test harness), then megatron's model-parallel
groups, with the CPU shim activated first when there is no CUDA.
"""

from __future__ import annotations

import logging
import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from pmp_megatron.compat import cpu as cpu_shim

# megatron-core warns at import that TE/apex are absent; we know (they are the optional `gpu` extra).
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

import megatron.core  # noqa: E402
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402,F401
from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: E402,F401
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402,F401
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset  # noqa: E402,F401
from megatron.core.dist_checkpointing.mapping import ShardedTensor  # noqa: E402,F401
from megatron.core.dist_checkpointing.strategies.filesystem_async import (  # noqa: E402,F401
    get_write_results_queue,
)
from megatron.core.distributed import (  # noqa: E402,F401
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel  # noqa: E402,F401
from megatron.core.models.gpt.gpt_layer_specs import (  # noqa: E402,F401
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402,F401
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402,F401
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402,F401
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy  # noqa: E402,F401
from megatron.core.tokenizers import MegatronTokenizer  # noqa: E402,F401
from megatron.core.transformer.transformer_block import (  # noqa: E402,F401
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402,F401
from megatron.core.transformer.transformer_layer import TransformerLayer  # noqa: E402,F401

logger = logging.getLogger(__name__)

MCORE_VERSION = megatron.core.__version__
_SUPPORTED = ("0.19",)
if not MCORE_VERSION.startswith(_SUPPORTED):
    warnings.warn(f"pmp_megatron is tested with megatron-core {_SUPPORTED}, found {MCORE_VERSION}",
                  stacklevel=2)

try:  # Transformer Engine is the optional `gpu` extra; it needs CUDA to import.
    import transformer_engine  # noqa: F401

    HAVE_TE = torch.cuda.is_available()
except Exception:  # noqa: BLE001 - any import failure means "no TE"
    HAVE_TE = False


def te_norm():
    """Transformer Engine's norm module class (only with ``HAVE_TE``: it needs CUDA to import)."""
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm


def device() -> torch.device:
    """The device this process computes on: its local GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun or srun).

    NCCL when CUDA is available, gloo otherwise (with the CPU shim). A single process without those
    variables gets a world of one on an in-memory store: no port, and nothing written into ``os.environ``
    (a child process -- a ``pmp-release`` run by a script -- would otherwise inherit RANK and a
    MASTER_PORT this process holds, and fail to bind it).
    """
    cpu_shim.activate()
    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
        return
    dist.init_process_group(backend=backend, timeout=timeout)


def setup_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, rng_seed: int = 0) -> None:
    """The one distributed-init sequence: torch.distributed from the environment, then megatron's
    TP/PP/DP groups with its RNG tracker seeded by ``rng_seed`` (not the W0 seed: W0 has its own generators,
    see ``model.init``)."""
    init_distributed()
    init_model_parallel(tp, pp, vpp, rng_seed)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for a rendezvous; torchrun's --master_port=0 hangs)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_model_parallel(tp: int, pp: int, vpp: int | None = None, seed: int = 42) -> None:
    """Create megatron's TP/PP/DP groups (order tp-cp-ep-dp-pp) and seed its RNG tracker."""
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def model_parallel_is_initialized() -> bool:
    return parallel_state.model_parallel_is_initialized()


def destroy_model_parallel() -> None:
    parallel_state.destroy_model_parallel()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def pp_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank()


def pp_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def pp_group():
    return parallel_state.get_pipeline_model_parallel_group()


def dp_group():
    return parallel_state.get_data_parallel_group()


def model_parallel_group():
    """TP x PP ranks holding one full copy of the model."""
    return parallel_state.get_model_parallel_group()


def is_pipeline_first_stage(vp_stage: int | None = None) -> bool:
    return parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)


def is_pipeline_last_stage(vp_stage: int | None = None) -> bool:
    return parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)


def unwrap(chunk):
    """The bare megatron module of a model chunk, DDP-wrapped or not."""
    return chunk.module if hasattr(chunk, "module") else chunk


# ---------------------------------------------------------------- collectives (the device contract)
# NCCL groups reject host tensors and gloo groups reject CUDA tensors. Every collective of the package goes
# through these helpers, which move the tensor to the device the group's backend works on and return the
# result on the caller's device; a test fails on any torch.distributed collective called elsewhere.


def group_device(group=None) -> torch.device:
    """The device a collective on ``group`` must use: the local GPU for NCCL, else the CPU."""
    backend = dist.get_backend(group)
    return device() if backend == "nccl" else torch.device("cpu")


def all_reduce(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``tensor`` in place on ``group``; return it (on its own device)."""
    dev = group_device(group)
    if tensor.device == dev:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    moved = tensor.to(dev)
    dist.all_reduce(moved, op=op, group=group)
    tensor.copy_(moved)
    return tensor


def all_gather_into(output: torch.Tensor, share: torch.Tensor, group=None) -> torch.Tensor:
    """``output`` (1-D, ``world(group) x share.numel()`` entries) := every rank's ``share`` of ``group`` in
    group-rank order; return ``output``. ``share`` must not overlap ``output``."""
    dev = group_device(group)
    if output.device == dev:
        dist.all_gather_into_tensor(output, share.to(dev), group=group)
        return output
    moved = output.to(dev)
    dist.all_gather_into_tensor(moved, share.to(dev), group=group)
    output.copy_(moved)
    return output


def reduce_from_tp(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the tensor-parallel group with autograd (backward: the identity, as for a vocab-parallel
    loss that every TP rank computes from the summed value)."""
    return tensor_parallel.reduce_from_tensor_model_parallel_region(tensor)


def all_gather_object(obj, group=None) -> list:
    """Every rank's ``obj`` of ``group``, in group-rank order (pickled; host side for any backend)."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    """Global rank ``src``'s ``obj`` on every rank of ``group`` (pickled; the other ranks' ``obj`` is
    ignored)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=group_device(group))
    return box[0]


def barrier(group=None) -> None:
    if group_device(group).type == "cuda":
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


def tiktoken_pattern(name: str) -> str:
    """The regex megatron's ``TikTokenTokenizer`` splits text with: ``v1`` or ``v2``."""
    from megatron.core.tokenizers.text.libraries import tiktoken_tokenizer

    patterns = {"v1": tiktoken_tokenizer._PATTERN_TIKTOKEN_V1, "v2": tiktoken_tokenizer._PATTERN_TIKTOKEN_V2}
    return patterns[name]


def tiktoken_special_tokens() -> list[str]:
    """megatron's ``TikTokenTokenizer`` control tokens before its ``<SPECIAL_i>`` fillers, in id order."""
    from megatron.core.tokenizers.text.libraries import tiktoken_tokenizer

    return list(tiktoken_tokenizer.SPECIAL_TOKENS)
