"""Megatron -> Hugging Face Llama release, and the owner's steps around it.

``hf_llama`` (the declarative key map, both ways), ``writer`` (the guarded directory writer: public files
in the release, the manifest in the owner's directory), ``tokenizer`` (sentencepiece -> HF),
``from_checkpoint`` (``pmp-release``: any TP/PP layout -> HF directory), ``key_export``
(``pmp-export-mask``: the private key, mask + W0 seed), ``recovery`` (the mask-recovery attackers, the
seed-guessing one included) and ``audit`` (how much of the mask a release leaks to them), ``reader`` (reads
an HF directory) and ``to_megatron`` (HF directory -> megatron checkpoint)."""

from pmp_megatron.release.hf_llama import canonical_shapes, from_hf, hf_config, hf_names, hf_shapes, to_hf
from pmp_megatron.release.writer import tensor_sha256, write_release

__all__ = ["canonical_shapes", "from_hf", "hf_config", "hf_names", "hf_shapes", "tensor_sha256", "to_hf",
           "write_release"]
