"""Initialise a model's parameters with W0 (``model.w0``): every rank copies out its shard of the
layout-independent global tensor, so one seed gives one W0 for every TP/PP/DP layout and device."""

from __future__ import annotations

import torch

from pmp_megatron.model.params import shard_infos
from pmp_megatron.model.w0 import w0_tensor


@torch.no_grad()
def initialize(chunks, cfg) -> None:
    """Overwrite every parameter of ``chunks`` with its shard of W0."""
    if cfg.model.seed is None:
        raise ValueError("model.seed is None: W0 needs a seed (the Trainer draws a secret one when a run "
                         "starts; give an int for a public, reproducible W0)")
    for name, (param, info) in shard_infos(chunks, cfg.model.vocab_size).items():
        full = w0_tensor(name, info.global_shape, cfg.model.seed, cfg.model.init_method_std)
        param.copy_(info.to_local(full, param.shape).to(param.device, param.dtype))
