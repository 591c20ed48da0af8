"""Megatron's tiktoken vocabulary -> a Hugging Face ``tokenizer.json`` that encodes to the same ids.

megatron's ``TikTokenTokenizer`` gives the ``num_special_tokens`` control tokens ids ``0 ..
num_special_tokens - 1`` (``<unk>``, ``<s>``, ``</s>``, ``<mask>``, ``<pad>``, ``<cls>``, ``<sep>``, then
``<SPECIAL_i>`` fillers) and the vocabulary entry of rank ``r`` id ``r + num_special_tokens``; it splits the
text with its ``v1``/``v2`` regex and encodes with special tokens allowed, without adding BOS.

The equivalent pipeline: the regex as a ``Split`` pre-tokenizer, byte-level BPE over the ranks (merges
recovered from the ranks: every split of a token into two vocabulary tokens, in the order of the token's
rank, and a piece that is itself a vocabulary token is taken whole, ``ignore_merges``, as tiktoken does),
and the control tokens as special tokens at their ids. ``PreTrainedTokenizerFast`` loads it as written.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

FILLER = "<SPECIAL_{}>"


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the ``ByteLevel`` alphabet)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """The token bytes -> rank table of a megatron tiktoken vocabulary file (ValueError naming it if bad)."""
    try:
        entries = json.loads(Path(path).read_text())
        ranks = {base64.b64decode(e["token_bytes"]): int(e["rank"]) for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"tiktoken vocabulary {str(path)!r} is not a JSON list of {{rank, token_bytes, "
                         f"token_str}} entries: {err}") from err
    if sorted(ranks.values()) != list(range(len(entries))):
        raise ValueError(f"tiktoken vocabulary {str(path)!r}: ranks are not 0 .. {len(entries) - 1}, "
                         f"each once")
    return ranks


def special_tokens(num_special_tokens: int) -> list[str]:
    """megatron's control tokens, in id order (its own list, then fillers)."""
    from pmp_megatron import mcore

    base = mcore.tiktoken_special_tokens()
    if num_special_tokens < len(base):
        raise ValueError(f"data.tiktoken_num_special_tokens must be >= {len(base)}, got {num_special_tokens}")
    return base + [FILLER.format(i) for i in range(len(base), num_special_tokens)]


def build_tokenizer(ranks: dict[bytes, int], pattern: str, num_special_tokens: int):
    """The ``tokenizers.Tokenizer`` of a rank table (ids shifted by ``num_special_tokens``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    table = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    specials = special_tokens(num_special_tokens)
    vocab = {name: i for i, name in enumerate(specials)}
    for token, rank in ranks.items():
        name = text(token)
        if name in vocab:
            raise ValueError(f"tiktoken token {token!r} collides with control token {name!r}")
        vocab[name] = rank + num_special_tokens
    # tiktoken merges any adjacent pair whose concatenation has the lowest rank: every split of a token
    # into two tokens is a merge, ordered by the rank of the result
    merges = sorted((rank, ranks[token[:i]], ranks[token[i:]], i, token) for token, rank in ranks.items()
                    for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks)
    pairs = [(text(token[:i]), text(token[i:])) for *_, i, token in merges]
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def megatron_pattern(name: str) -> str:
    """The regex megatron's ``TikTokenTokenizer`` splits text with (``v1`` | ``v2``)."""
    from pmp_megatron import mcore

    return mcore.tiktoken_pattern(name)


def write_tiktoken_tokenizer(vocab_file: str | Path, out_dir: str | Path, pattern: str,
                             num_special_tokens: int, model_max_length: int) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return the names."""
    out_dir = Path(out_dir)
    tok = build_tokenizer(read_ranks(vocab_file), megatron_pattern(pattern), num_special_tokens)
    tok.save(str(out_dir / "tokenizer.json"))
    special = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": False,
              "add_eos_token": False, "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
