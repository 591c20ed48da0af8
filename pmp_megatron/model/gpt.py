"""Llama-style GPT on megatron-core: RoPE, GQA, SwiGLU, RMSNorm, no biases, untied embeddings by default.

``transformer_config`` turns our ``Config`` into megatron's ``TransformerConfig``; ``build_model`` returns
this rank's model chunks, one per virtual pipeline stage (a list of one without virtual stages), each
initialised from the layout-independent W0 of ``pmp_megatron.model.init``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pmp_megatron import mcore
from pmp_megatron.config import Config
from pmp_megatron.model import init as model_init
from pmp_megatron.model.specs import final_norm, layer_spec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_config(cfg: Config) -> mcore.TransformerConfig:
    """megatron-core TransformerConfig for ``cfg`` (model + parallel sections)."""
    m, p = cfg.model, cfg.parallel
    on_gpu = torch.cuda.is_available()
    te = m.transformer_impl == "transformer_engine"
    dtype = _DTYPES[m.params_dtype]
    fp8 = {}
    if m.fp8 is not None:
        fp8 = dict(fp8=m.fp8, fp8_recipe=m.fp8_recipe)
    recompute = {}
    if m.recompute_granularity is not None:
        recompute = dict(recompute_granularity=m.recompute_granularity)
        if m.recompute_granularity == "full":
            recompute.update(recompute_method="uniform", recompute_num_layers=m.recompute_num_layers)
    return mcore.TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        # W0 comes from model/init.py (layout-independent); skip megatron's own initialisation.
        perform_initialization=False,
        use_cpu_initialization=not on_gpu,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        # gloo cannot batch isend/irecv correctly for interleaved PP (see megatron-cpu-notes).
        batch_p2p_comm=on_gpu,
        # Fused kernels exist only with CUDA (TE/apex); the local path uses plain torch ops.
        gradient_accumulation_fusion=te and on_gpu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        **fp8,
        **recompute,
    )


def build_model(cfg: Config, init_w0: bool = True) -> list[mcore.GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), initialised to W0 (from ``model.seed``).

    Needs megatron's groups first (``mcore.setup_parallel``). Chunks are on ``mcore.device()``, unwrapped
    (no DDP). ``init_w0=False`` leaves the weights uninitialised, for a checkpoint to overwrite them all.
    """
    tcfg = transformer_config(cfg)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        num_layers = mcore.get_num_layers_to_build(tcfg, vp_stage=stage)
        block = mcore.TransformerBlockSubmodules(
            layer_specs=[layer_spec(cfg.model.transformer_impl)] * num_layers,
            layer_norm=final_norm(cfg.model.transformer_impl),
        )
        chunk = mcore.GPTModel(
            config=tcfg,
            transformer_layer_spec=block,
            vocab_size=cfg.model.padded_vocab_size(cfg.parallel.tensor_model_parallel_size),
            max_sequence_length=cfg.model.seq_length,
            pre_process=mcore.is_pipeline_first_stage(stage),
            post_process=mcore.is_pipeline_last_stage(stage),
            share_embeddings_and_output_weights=not cfg.model.untie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.model.rotary_base),
            vp_stage=stage,
        )
        chunk.to(mcore.device())
        chunks.append(chunk)
    if init_w0:
        model_init.initialize(chunks, cfg)
    return chunks
