"""Megatron -> Hugging Face Llama release: the declarative key map (``hf_llama``), the guarded
directory writer (``writer``) and the sentencepiece -> HF tokenizer conversion (``tokenizer``)."""

from pmp_megatron.release.hf_llama import canonical_shapes, from_hf, hf_config, hf_names, hf_shapes, to_hf
from pmp_megatron.release.writer import tensor_sha256, write_release

__all__ = ["canonical_shapes", "from_hf", "hf_config", "hf_names", "hf_shapes", "tensor_sha256", "to_hf",
           "write_release"]
