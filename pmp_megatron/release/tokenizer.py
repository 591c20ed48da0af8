"""SentencePiece ``.model`` -> Hugging Face tokenizer files that ``AutoTokenizer`` loads offline.

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
from pathlib import Path

_SPM_BPE, _SPM_UNIGRAM = 2, 1


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
