"""The one Megatron <-> Hugging Face Llama adapter: a declarative key map plus the few real transforms.

Canonical names are the global, unpadded megatron names of ``pmp_megatron.model.params``. Most tensors
are renamed unchanged; two are split (and merged back):

- ``linear_qkv.weight`` ``[(n_heads + 2 * n_groups) * d, h]`` is interleaved per query group
  ``[q heads of group g; k_g; v_g]`` and becomes ``q_proj`` ``[n_heads * d, h]``, ``k_proj`` and
  ``v_proj`` ``[n_groups * d, h]``;
- ``linear_fc1.weight`` ``[2 * ffn, h]`` is ``[gate; up]`` and becomes ``gate_proj`` and ``up_proj``.

With tied embeddings (``model.untie_embeddings`` false) there is no ``output_layer`` and no ``lm_head``.
RoPE needs no permutation: megatron's non-interleaved rotary embedding is HF Llama's rotate-half.
Every transform is pure indexing, so a private mask (a bool tensor) converts exactly like its weight.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from pmp_megatron.config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _split_qkv(w: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
    """Per-group interleaved ``[(n_heads + 2 n_groups) d, h]`` -> q ``[n_heads d, h]``, k and v
    ``[n_groups d, h]``."""
    groups, per_group, d = m.num_query_groups, m.num_attention_heads // m.num_query_groups, m.head_dim
    w = w.reshape(groups, per_group + 2, d, -1)  # [g, heads of g + k + v, d, h]
    q = w[:, :per_group].reshape(groups * per_group * d, -1)
    k = w[:, per_group].reshape(groups * d, -1)
    v = w[:, per_group + 1].reshape(groups * d, -1)
    return [q.contiguous(), k.contiguous(), v.contiguous()]


def _merge_qkv(parts: list[torch.Tensor], m: ModelConfig) -> torch.Tensor:
    groups, per_group, d = m.num_query_groups, m.num_attention_heads // m.num_query_groups, m.head_dim
    q, k, v = parts
    h = q.shape[-1]
    blocks = [q.reshape(groups, per_group, d, h), k.reshape(groups, 1, d, h), v.reshape(groups, 1, d, h)]
    return torch.cat(blocks, dim=1).reshape(-1, h)


def _split_fc1(w: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
    """``[2 ffn, h]`` = ``[gate; up]`` -> gate ``[ffn, h]``, up ``[ffn, h]``."""
    gate, up = w.chunk(2, dim=0)
    return [gate.contiguous(), up.contiguous()]


def _merge_fc1(parts: list[torch.Tensor], m: ModelConfig) -> torch.Tensor:
    return torch.cat(parts, dim=0)


@dataclass(frozen=True)
class Rule:
    """One canonical tensor and the HF tensor(s) it becomes; ``{i}`` is the global layer number."""

    megatron: str
    hf: tuple[str, ...]
    split: Callable[[torch.Tensor, ModelConfig], list[torch.Tensor]] | None = None
    merge: Callable[[list[torch.Tensor], ModelConfig], torch.Tensor] | None = None


_LAYER = "decoder.layers.{i}."
_HF_LAYER = "model.layers.{i}."
RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule(_LAYER + "self_attention.linear_qkv.layer_norm_weight", (_HF_LAYER + "input_layernorm.weight",)),
    Rule(_LAYER + "self_attention.linear_qkv.weight",
         tuple(_HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"), _split_qkv, _merge_qkv),
    Rule(_LAYER + "self_attention.linear_proj.weight", (_HF_LAYER + "self_attn.o_proj.weight",)),
    Rule(_LAYER + "mlp.linear_fc1.layer_norm_weight", (_HF_LAYER + "post_attention_layernorm.weight",)),
    Rule(_LAYER + "mlp.linear_fc1.weight",
         (_HF_LAYER + "mlp.gate_proj.weight", _HF_LAYER + "mlp.up_proj.weight"), _split_fc1, _merge_fc1),
    Rule(_LAYER + "mlp.linear_fc2.weight", (_HF_LAYER + "mlp.down_proj.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",)),
)
_PATTERNS = [(re.compile(re.escape(r.megatron).replace(r"\{i\}", r"(\d+)") + "$"), r) for r in RULES]


def canonical_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of the real model and its global, unpadded shape."""
    m = model_cfg
    h, d = m.hidden_size, m.head_dim
    shapes = {"embedding.word_embeddings.weight": (m.vocab_size, h)}
    for i in range(m.num_layers):
        shapes[f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight"] = (h,)
        shapes[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = (
            (m.num_attention_heads + 2 * m.num_query_groups) * d, h)
        shapes[f"decoder.layers.{i}.self_attention.linear_proj.weight"] = (h, m.num_attention_heads * d)
        shapes[f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"] = (h,)
        shapes[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = (2 * m.ffn_hidden_size, h)
        shapes[f"decoder.layers.{i}.mlp.linear_fc2.weight"] = (h, m.ffn_hidden_size)
    shapes["decoder.final_layernorm.weight"] = (h,)
    if m.untie_embeddings:
        shapes["output_layer.weight"] = (m.vocab_size, h)
    return shapes


def _rule(name: str) -> tuple[Rule, str]:
    """The rule of canonical ``name`` and its layer number ('' outside the decoder layers)."""
    for pattern, rule in _PATTERNS:
        match = pattern.match(name)
        if match:
            return rule, match.group(1) if match.groups() else ""
    raise ValueError(f"tensor {name!r} is not a parameter of the Llama model (no HF name maps to it)")


def to_hf(name: str, tensor: torch.Tensor, model_cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """Convert ONE canonical tensor (a weight or its bool mask) to its HF (name, tensor) pair(s)."""
    expected = canonical_shapes(model_cfg).get(name)
    if expected is None:
        _rule(name)  # raises for names of no model
        raise ValueError(f"tensor {name!r} is not a parameter of this model config (layer out of range, "
                         f"or output_layer with tied embeddings)")
    if tuple(tensor.shape) != expected:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected} "
                         f"(global, unpadded vocabulary)")
    rule, layer = _rule(name)
    parts = rule.split(tensor, model_cfg) if rule.split else [tensor]
    return [(hf.format(i=layer), t) for hf, t in zip(rule.hf, parts, strict=True)]


def hf_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF parameter of the release and its shape (derived by converting meta tensors)."""
    out = {}
    for name, shape in canonical_shapes(model_cfg).items():
        for hf, t in to_hf(name, torch.empty(shape, device="meta"), model_cfg):
            out[hf] = tuple(t.shape)
    return out


def hf_names(model_cfg: ModelConfig) -> list[str]:
    """The full expected HF parameter set (no ``lm_head.weight`` when embeddings are tied)."""
    return list(hf_shapes(model_cfg))


def from_hf(hf_tensors: Mapping[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Convert a whole HF Llama state dict back to canonical megatron tensors."""
    expected = hf_shapes(model_cfg)
    unexpected = sorted(set(hf_tensors) - set(expected))
    if unexpected:
        raise ValueError(f"HF tensors not in the Llama model of this config: {unexpected}")
    missing = sorted(set(expected) - set(hf_tensors))
    if missing:
        raise ValueError(f"HF tensors missing: {missing}")
    for hf, shape in expected.items():
        if tuple(hf_tensors[hf].shape) != shape:
            raise ValueError(f"HF tensor {hf!r} has shape {tuple(hf_tensors[hf].shape)}, expected {shape}")
    get = hf_tensors.__getitem__
    return {name: canonical_tensor(name, get, model_cfg) for name in canonical_shapes(model_cfg)}


def canonical_tensor(name: str, get: Callable[[str], torch.Tensor], model_cfg: ModelConfig) -> torch.Tensor:
    """ONE canonical tensor (a weight or its bool mask) from its HF part(s), each read through ``get(HF
    name)``: a loader that places one global tensor at a time never holds the whole release."""
    rule, layer = _rule(name)
    parts = [get(hf.format(i=layer)) for hf in rule.hf]
    return rule.merge(parts, model_cfg) if rule.merge else parts[0]


def hf_config(model_cfg: ModelConfig, dtype: str = "float32", bos_token_id: int | None = 1,
              eos_token_id: int | None = 2) -> dict:
    """config.json content for ``LlamaForCausalLM``.

    transformers 5.x reads ``rope_parameters`` and ``dtype``; 4.x reads ``rope_theta`` and
    ``torch_dtype``. Both spellings are written so either version loads the directory.
    """
    torch_dtype(dtype)  # validates the name
    m = model_cfg
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.head_dim,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
        "rope_theta": float(m.rotary_base),
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": not m.untie_embeddings,
        "initializer_range": m.init_method_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }


# ModelConfig field <- HF config.json key: the architecture a Llama directory fixes.
_ARCH = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
         "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
         "ffn_hidden_size": "intermediate_size", "vocab_size": "vocab_size"}


def _rope_theta(hf_cfg: Mapping) -> float:
    rope = hf_cfg.get("rope_parameters") or {}
    scaling = hf_cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ValueError(f"HF config rope_type {kind!r} is not supported (only plain RoPE, 'default')")
    return float(rope.get("rope_theta", hf_cfg.get("rope_theta", 10000.0)))


def model_config_from_hf(hf_cfg: Mapping) -> ModelConfig:
    """The ModelConfig of an HF ``LlamaForCausalLM`` config.json (the inverse of ``hf_config``);
    ValueError for what we cannot build."""
    if hf_cfg.get("model_type") != "llama":
        raise ValueError(f"HF config model_type is {hf_cfg.get('model_type')!r}, only 'llama' converts")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf_cfg.get(key, ok) != ok:
            raise ValueError(f"HF config {key}={hf_cfg[key]!r} is not supported (expected {ok!r})")
    heads = hf_cfg["num_attention_heads"]
    m = ModelConfig(**{f: hf_cfg[k] for f, k in _ARCH.items() if k in hf_cfg and hf_cfg[k] is not None},
                    seq_length=hf_cfg.get("max_position_embeddings", ModelConfig.seq_length),
                    rotary_base=_rope_theta(hf_cfg), norm_epsilon=float(hf_cfg.get("rms_norm_eps", 1e-5)),
                    init_method_std=float(hf_cfg.get("initializer_range", 0.02)),
                    untie_embeddings=not hf_cfg.get("tie_word_embeddings", False))
    if hf_cfg.get("num_key_value_heads") is None:
        m.num_query_groups = heads
    if hf_cfg.get("head_dim") not in (None, m.head_dim):
        raise ValueError(f"HF config head_dim {hf_cfg['head_dim']} != hidden_size / num_attention_heads "
                         f"= {m.head_dim} (not supported)")
    return m


def check_architecture(given: ModelConfig, hf: ModelConfig, what: str = "config") -> None:
    """ValueError unless ``given`` has the architecture (shapes, tying) of ``hf``, a model_config_from_hf."""
    for f in (*_ARCH, "untie_embeddings"):
        if getattr(given, f) != getattr(hf, f):
            raise ValueError(f"{what} model.{f}={getattr(given, f)!r} disagrees with the HF directory "
                             f"({getattr(hf, f)!r})")


def torch_dtype(dtype: str) -> torch.dtype:
    """``'float32'`` / ``'bfloat16'`` / ``'float16'`` -> torch dtype; ValueError otherwise."""
    if dtype not in _DTYPES:
        raise ValueError(f"release dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]
