"""Where each local parameter shard sits in the real (unsharded, unpadded) model.

Every parameter of a model chunk gets a canonical global name (global layer numbers, checkpoint-style
names, so the local and Transformer Engine specs agree) and a ``ShardInfo`` describing which slices of
the global tensor it holds. Masks, the distributed top-k, W0 initialisation, gathers and the release
all read this one description instead of re-deriving megatron's sharding rules:

- column-parallel weights and the vocab-parallel embedding split dim 0, row-parallel weights dim 1;
- SwiGLU ``linear_fc1`` holds ``[gate_r; up_r]`` per TP rank: two blocks of the global ``[gate; up]``;
- the vocabulary is padded to a multiple of ``make_vocab_size_divisible_by * TP``: padded rows are in
  no block (they are not parameters of the real model);
- replicated copies (norms across TP ranks, a tied output layer on the last PP stage) have
  ``counted=False`` on all but one owner, so global counts see each real parameter once. DP replicas
  are never counted twice because counts are reduced over the model-parallel group only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pmp_megatron import mcore

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
# The local spec's norm names, renamed as megatron's own sharded_state_dict_keys_map does.
_KEY_MAP = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
            ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))


@dataclass(frozen=True)
class ShardInfo:
    """Placement of one local shard in its global tensor."""

    name: str
    global_shape: tuple[int, ...]
    dim: int
    blocks: tuple[tuple[int, int, int], ...]  # (local_start, global_start, length) along `dim`
    counted: bool

    def local_slices(self):
        """Yield (local index, global index) tuples of slices, one pair per block."""
        for local_start, global_start, length in self.blocks:
            lo = [slice(None)] * len(self.global_shape)
            gl = [slice(None)] * len(self.global_shape)
            lo[self.dim] = slice(local_start, local_start + length)
            gl[self.dim] = slice(global_start, global_start + length)
            yield tuple(lo), tuple(gl)

    def real(self, local_shape: torch.Size, device=None) -> torch.Tensor:
        """Bool tensor of ``local_shape``: True where the entry is a parameter of the real model."""
        out = torch.zeros(local_shape, dtype=torch.bool, device=device)
        for lo, _ in self.local_slices():
            out[lo] = True
        return out

    def to_local(self, full: torch.Tensor, local_shape: torch.Size) -> torch.Tensor:
        """This shard's slice of a global tensor (padding rows zero)."""
        out = torch.zeros(local_shape, dtype=full.dtype, device=full.device)
        for lo, gl in self.local_slices():
            out[lo] = full[gl]
        return out

    def numel(self) -> int:
        n = 1
        for i, s in enumerate(self.global_shape):
            n *= s if i != self.dim else 1
        return n * sum(b[2] for b in self.blocks)


def canonical_name(chunk, local_name: str) -> str:
    """``decoder.layers.<local>.…`` -> ``decoder.layers.<global>.…`` with checkpoint-style norm names."""
    m = re.match(r"(?:module\.)*decoder\.layers\.(\d+)\.(.*)", local_name)
    if m:
        layer = chunk.decoder.layers[int(m.group(1))]
        rest = m.group(2)
        for old, new in _KEY_MAP:
            if rest.startswith(old):
                rest = new + rest[len(old):]
        return f"decoder.layers.{layer.layer_number - 1}.{rest}"
    return re.sub(r"^(module\.)+", "", local_name)


def _info(name: str, param: torch.nn.Parameter, vocab_size: int, tied_copy: bool) -> ShardInfo:
    tp, r = mcore.tp_size(), mcore.tp_rank()
    shape = tuple(param.shape)
    if name in (EMBEDDING, OUTPUT):  # vocab-parallel along dim 0, padded rows excluded
        n = shape[0]
        start = r * n
        length = max(0, min(vocab_size - start, n))
        gshape = (vocab_size, *shape[1:])
        return ShardInfo(name, gshape, 0, ((0, start, length),) if length else (), counted=not tied_copy)
    if not getattr(param, "tensor_model_parallel", False):  # replicated over TP: rank 0 counts it
        return ShardInfo(name, shape, 0, ((0, 0, shape[0]),), counted=r == 0)
    dim = param.partition_dim
    n = shape[dim]
    gshape = list(shape)
    gshape[dim] = n * tp
    if name.endswith("mlp.linear_fc1.weight"):  # [gate_r; up_r] of global [gate; up]
        half = n // 2
        blocks = ((0, r * half, half), (half, n * tp // 2 + r * half, half))
    else:
        blocks = ((0, r * n, n),)
    return ShardInfo(name, tuple(gshape), dim, blocks, counted=True)


def shard_infos(chunks, vocab_size: int) -> dict[str, tuple[torch.nn.Parameter, ShardInfo]]:
    """Canonical name -> (local parameter, ShardInfo) for every parameter of this rank's chunks."""
    out = {}
    for chunk in chunks:
        chunk = mcore.unwrap(chunk)  # DDP-wrapped or not
        for local_name, param in chunk.named_parameters():
            name = canonical_name(chunk, local_name)
            tied_copy = name == OUTPUT and getattr(param, "shared_embedding", False)
            if tied_copy:
                name = EMBEDDING
            if name in out:  # the tied embedding held twice by one rank (PP=1 never does)
                continue
            out[name] = (param, _info(name, param, vocab_size, tied_copy))
    return out


def gather_full(local: dict[str, tuple[torch.Tensor, ShardInfo]]) -> dict[str, torch.Tensor]:
    """Assemble global tensors from every rank's shards (for tests and small models; not streaming)."""
    mine = [(info, t.detach().cpu()) for t, info in local.values()]
    everyone = mcore.all_gather_object(mine)
    full: dict[str, torch.Tensor] = {}
    for shards in everyone:
        for info, t in shards:
            buf = full.setdefault(info.name, torch.zeros(info.global_shape, dtype=t.dtype))
            for lo, gl in info.local_slices():
                buf[gl] = t[lo]
    return dict(sorted(full.items()))
