"""W0: the random initialisation, identical for every TP/PP/DP layout and device (torch only).

Each global tensor is drawn from its own CPU generator seeded by (``model.seed``, canonical name). So one
seed gives one W0 whatever the parallel layout (the masks and training traces of different layouts can
be compared exactly), and anyone holding the seed can regenerate W0 from the released names alone --
which is why the release audit runs an init-regeneration attacker (``release.recovery``), and why this
module imports nothing but torch: regenerating W0 needs no megatron-core. Llama/HF-style: weights ~
N(0, init_method_std), norm weights = 1. ``model.init`` copies each rank's shard into the model.
"""

from __future__ import annotations

import hashlib

import torch


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
