"""The release's Hugging Face tokenizer files, from the tokenizer the run was trained with
(``TokenizerSpec``: sentencepiece, huggingface or tiktoken; ``write_tokenizer_files``).

SentencePiece ``.model`` -> Hugging Face tokenizer files that ``AutoTokenizer`` loads offline:

The backend ``tokenizer.json`` is built by transformers' ``SpmConverter.build_tokenizer_from_spm_proto``,
which follows the model's own normalizer spec (NFKC charsmap, extra-whitespace removal, dummy prefix,
byte fallback), so ``encode(text, add_special_tokens=False)`` equals ``SentencePieceProcessor.encode``.

``tokenizer_config.json`` names ``PreTrainedTokenizerFast`` on purpose: in transformers 5.x a class with
its own ``__init__`` such as ``LlamaTokenizer`` rebuilds the pipeline from vocab + merges with Llama's
hard-wired settings (no normalizer), which disagrees with a sentencepiece model trained with the
default ``nmt_nfkc`` rule; ``PreTrainedTokenizerFast`` loads ``tokenizer.json`` as written in 4.x and 5.x.
The original ``tokenizer.model`` is copied beside it for sentencepiece users.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

_SPM_BPE, _SPM_UNIGRAM = 2, 1
# a Hugging Face tokenizer's files a release copies as they are (data.tokenizer_type huggingface)
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _proto(sp_model: str | Path):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(sp_model).read_bytes())
    return proto


def special_token_ids(sp_model: str | Path) -> dict[str, int | None]:
    """``{'unk': id, 'bos': id, 'eos': id, 'pad': id}`` of a sentencepiece model (None when disabled)."""
    spec = _proto(sp_model).trainer_spec
    ids = {"unk": spec.unk_id, "bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def vocab_size(sp_model: str | Path) -> int:
    """Number of pieces of a sentencepiece model."""
    return len(_proto(sp_model).pieces)


def write_tokenizer(sp_model: str | Path, out_dir: str | Path, model_max_length: int,
                    add_bos_token: bool = True) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and tokenizer.model into
    ``out_dir``; return the file names. ``add_bos_token`` prepends BOS when special tokens are added
    (the Llama convention)."""
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    sp_model, out_dir = Path(sp_model), Path(out_dir)
    if not sp_model.is_file():
        raise ValueError(f"tokenizer model {str(sp_model)!r} does not exist")
    proto = _proto(sp_model)
    pieces = proto.pieces
    if proto.trainer_spec.model_type == _SPM_BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
    elif proto.trainer_spec.model_type == _SPM_UNIGRAM:
        vocab = [(p.piece, p.score) for p in pieces]
    else:
        raise ValueError(f"tokenizer model {str(sp_model)!r}: only sentencepiece bpe and unigram models "
                         f"convert, got model_type {proto.trainer_spec.model_type}")
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)

    ids = special_token_ids(sp_model)
    names = {k: (pieces[i].piece if i is not None else None) for k, i in ids.items()}
    # Control pieces (<unk>, <s>, </s>, <pad>) are special tokens: skipped when decoding.
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in names.values() if p])
    bos = names["bos"]
    if add_bos_token and bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, ids["bos"])])

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special = {f"{k}_token": v for k, v in names.items() if v}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos_token and bool(bos),
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    shutil.copyfile(sp_model, out_dir / "tokenizer.model")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"]


@dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer a release carries: ``data.tokenizer_model`` read as ``data.tokenizer_type``."""

    model: str
    type: str = "sentencepiece"
    tiktoken_pattern: str = "v2"
    tiktoken_num_special_tokens: int = 1000

    @classmethod
    def of(cls, data_cfg, model: str | None = None, kind: str | None = None) -> TokenizerSpec:
        """The spec of a run's ``DataConfig``; ``model`` / ``kind`` replace its path / type."""
        return cls(str(model or data_cfg.tokenizer_model), kind or data_cfg.tokenizer_type,
                   data_cfg.tiktoken_pattern, data_cfg.tiktoken_num_special_tokens)


def as_spec(tokenizer: str | Path | TokenizerSpec | None) -> TokenizerSpec | None:
    """A spec from a spec or a sentencepiece ``.model`` path (None stays None)."""
    if tokenizer is None or isinstance(tokenizer, TokenizerSpec):
        return tokenizer
    return TokenizerSpec(str(tokenizer))


def check_exists(spec: TokenizerSpec) -> None:
    """ValueError naming the tokenizer when its file or directory is missing."""
    if spec.type == "huggingface":
        from pmp_megatron.data.library_tokenizer import hf_tokenizer_dir

        hf_tokenizer_dir(spec.model)
    elif not Path(spec.model).is_file():
        raise ValueError(f"tokenizer {spec.model!r} (data.tokenizer_type {spec.type}) does not exist")


def tokenizer_ids(spec: TokenizerSpec) -> tuple[int | None, int | None, int]:
    """``(bos, eos, number of ids)`` of the tokenizer (for config.json and the vocabulary check)."""
    if spec.type == "sentencepiece":
        ids = special_token_ids(spec.model)
        return ids["bos"], ids["eos"], vocab_size(spec.model)
    from pmp_megatron.data.library_tokenizer import LibraryTokenizer

    tok = LibraryTokenizer(spec.type, spec.model, spec.tiktoken_pattern, spec.tiktoken_num_special_tokens)
    return tok.bos, tok.eos, tok.vocab_size


def write_tokenizer_files(spec: TokenizerSpec, out_dir: str | Path, model_max_length: int) -> list[str]:
    """Write the HF tokenizer files of ``spec`` into ``out_dir``; return their names. Sentencepiece: the
    converted pipeline (``write_tokenizer``); huggingface: the source's files as they are; tiktoken: a
    byte-level BPE ``tokenizer.json`` with megatron's ids (``tiktoken_hf``)."""
    if spec.type == "sentencepiece":
        return write_tokenizer(spec.model, out_dir, model_max_length)
    if spec.type == "huggingface":
        from pmp_megatron.data.library_tokenizer import hf_tokenizer_dir

        src = hf_tokenizer_dir(spec.model)
        names = [n for n in HF_FILES if (src / n).is_file()]
        for name in names:
            shutil.copyfile(src / name, Path(out_dir) / name)
        return names
    from pmp_megatron.release.tiktoken_hf import write_tiktoken_tokenizer

    return write_tiktoken_tokenizer(spec.model, out_dir, spec.tiktoken_pattern,
                                    spec.tiktoken_num_special_tokens, model_max_length)
