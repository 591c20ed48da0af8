"""Layer specs for the Llama-style GPT: megatron-core's local modules on CPU, Transformer Engine on GPU.

Behaviour is swapped through ModuleSpec, never by editing the transformer layer. The local spec uses
megatron's column/row-parallel linears and dot-product attention with our ``RMSNorm`` (torch's, but
usable with sequence parallelism: megatron's ``WrappedTorchNorm`` refuses SP, though all SP needs from a
norm is that its weight's gradient is all-reduced over TP, which ``sequence_parallel=True`` on the
parameter asks ``finalize_model_grads`` to do).
"""

from __future__ import annotations

import torch

from pmp_megatron import mcore


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron's norm constructor signature; SP-aware (see module docstring)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(transformer_impl: str):
    """The ModuleSpec of one transformer layer for ``model.transformer_impl``."""
    if transformer_impl == "transformer_engine":
        if not mcore.HAVE_TE:
            raise ValueError(
                "model.transformer_impl=transformer_engine needs Transformer Engine and CUDA "
                "(pip install 'pmp_megatron[gpu]' on a GPU machine); use 'local' on CPU"
            )
        return mcore.get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
    spec = mcore.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


def final_norm(transformer_impl: str):
    """The module class of the decoder's final norm."""
    if transformer_impl == "transformer_engine":
        return mcore.te_norm()
    return RMSNorm
