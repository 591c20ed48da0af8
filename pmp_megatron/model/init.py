"""W0: the random initialisation, identical for every TP/PP/DP layout and device.

Each global tensor is drawn from its own CPU generator seeded by (``model.seed``, canonical name), and
every rank copies out its shard. So one seed gives one W0 whatever the parallel layout (the masks and
training traces of different layouts can be compared exactly), and anyone holding the seed can
regenerate W0 from the released names alone -- which is why the release audit runs an
init-regeneration attacker. Llama/HF-style: weights ~ N(0, init_method_std), norm weights = 1.
"""

from __future__ import annotations

import hashlib

import torch

from pmp_megatron.model.params import shard_infos


def name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for one named tensor, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def w0_tensor(name: str, global_shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """The full fp32 W0 of one parameter of the real model."""
    if len(global_shape) == 1:
        return torch.ones(global_shape)
    gen = torch.Generator().manual_seed(name_seed(seed, name))
    return torch.empty(global_shape).normal_(0.0, std, generator=gen)


@torch.no_grad()
def initialize(chunks, cfg) -> None:
    """Overwrite every parameter of ``chunks`` with its shard of W0."""
    for name, (param, info) in shard_infos(chunks, cfg.model.vocab_size).items():
        full = w0_tensor(name, info.global_shape, cfg.model.seed, cfg.model.init_method_std)
        param.copy_(info.to_local(full, param.shape).to(param.device, param.dtype))
