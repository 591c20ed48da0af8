"""The release's model card (``README.md``), generated with ``huggingface_hub.ModelCard``.

It says what a user of the weights needs: the architecture, the tokens the released weights were trained
on, that fine-tuning is restricted by design, the license (``release.license``), the dtype and why fp32 is
the default, and how such a release is evaluated. It never holds a mask-derived number (no density, no
mask, no recovery IoU, no seed, no owner path): everything in it comes from ``CardInfo`` and the model's
shape, whose fields are public by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from pmp_megatron.config import ModelConfig

CARD_FILE = "README.md"


@dataclass(frozen=True)
class CardInfo:
    """Public facts of a release."""

    name: str  # the model's name on the card (release.model_name, else the release directory's name)
    license: str  # an SPDX id or Hugging Face license tag (release.license)
    dtype: str  # float32 | bfloat16 | float16
    pmp: bool  # trained with a private mask (Stage II) or a dense baseline
    steps: int  # optimizer steps of the released weights
    tokens: int  # training tokens of the released weights (steps x global batch x sequence length)
    num_parameters: int


_DTYPE_NOTE = {
    "float32": "The weights are stored in float32, the precision they were trained and evaluated in.",
    "bfloat16": "The weights are stored in bfloat16, rounded from the float32 weights that were trained "
                "and evaluated: expect small differences from the evaluated model.",
    "float16": "The weights are stored in float16, rounded from the float32 weights that were trained and "
               "evaluated: expect small differences from the evaluated model.",
}


def render(info: CardInfo, model_cfg: ModelConfig) -> str:
    """The card's text (YAML metadata + markdown)."""
    from huggingface_hub import ModelCard, ModelCardData

    m = model_cfg
    tags = ["llama", "pmp_megatron", "non-fine-tunable" if info.pmp else "dense-baseline"]
    data = ModelCardData(license=info.license, library_name="transformers", pipeline_tag="text-generation",
                         tags=tags)
    restriction = (
        "This model was pretrained with **Private Mask Pre-Training (PMP)**: only a secret subset of its "
        "weights (the owner's key) was trained, and the other weights were not. It is released for "
        "inference. Fine-tuning it **without the owner's key is restricted by design**: the method aims to "
        "make keyless fine-tuning less effective than fine-tuning a comparable dense model, while "
        "fine-tuning with the key stays effective. How far that holds is what the evaluation below "
        "measures. The key is not part of this release."
        if info.pmp else
        "This is a dense baseline trained with pmp_megatron (no private mask): it fine-tunes like any model.")
    body = f"""
# {info.name}

{restriction}

## Architecture

Llama (`LlamaForCausalLM`, loads with `transformers`): {m.num_layers} layers, hidden size {m.hidden_size},
{m.num_attention_heads} attention heads ({m.num_query_groups} key-value groups), MLP size
{m.ffn_hidden_size} (SwiGLU), vocabulary {m.vocab_size}, context {m.seq_length} tokens, RoPE base
{m.rotary_base:g}, {"untied" if m.untie_embeddings else "tied"} input and output embeddings;
{info.num_parameters:,} parameters.

## Training

{info.steps:,} optimizer steps, {info.tokens:,} training tokens seen by the released weights.

{_DTYPE_NOTE[info.dtype]}

## Evaluation

Releases of pmp_megatron are evaluated by fine-tuning attacks (`pmp-attack`): keyless full and LoRA
fine-tunes of this model are compared, over several seeds and with intervals, with the same attacks on a
dense model and on a model trained from scratch, under a decision rule fixed before the run. Language
modelling quality is the validation loss of the pretraining data.

## License

{info.license}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
