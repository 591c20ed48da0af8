"""Hugging Face (``tokenizer.json``) and tiktoken tokenizers through ``megatron.core.tokenizers``, with the
interface of the SentencePiece ``Tokenizer`` the data pipeline, the trainer and the release use.

``data.tokenizer_type`` picks one (``load_tokenizer``):

- ``sentencepiece``: a ``.model`` file (``data.tokenizer.Tokenizer``, trainable by ``pmp-preprocess``);
- ``huggingface``: a directory ``AutoTokenizer`` loads offline (``tokenizer.json`` +
  ``tokenizer_config.json``, e.g. a Llama-3 or Mistral tokenizer), or the ``tokenizer.json`` file in it;
- ``tiktoken``: megatron's tiktoken vocabulary, a JSON list of ``{"rank", "token_bytes", "token_str"}``
  (ranks 0..255 the single bytes), with ``data.tiktoken_num_special_tokens`` control ids in front
  (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ...) and ``data.tiktoken_pattern`` (``v1`` | ``v2``) splitting the
  text.

Documents are encoded without special tokens (no BOS): end-of-document is the tokenizer's eos, appended by
the data pipeline, as with SentencePiece. The tokenizer's identity (``sha256``) is a hash of its files and
settings: a dataset records it, and training refuses data made with another tokenizer.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

TOKENIZER_TYPES = ("sentencepiece", "huggingface", "tiktoken")
TIKTOKEN_PATTERNS = ("v1", "v2")
HF_IDENTITY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_tokenizer_dir(path: str | os.PathLike) -> Path:
    """The directory of a Hugging Face tokenizer given as its directory or its ``tokenizer.json``."""
    path = Path(path)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer {str(path)!r} (data.tokenizer_type huggingface) is not a directory "
                         f"holding tokenizer.json, nor that file")
    return path


def tiktoken_vocab_size(path: str | os.PathLike) -> int:
    """Number of entries of a megatron tiktoken vocabulary file (special ids not counted)."""
    import json

    try:
        vocab = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"tiktoken vocabulary {str(path)!r} is not readable JSON: {err}") from err
    if not isinstance(vocab, list) or not vocab or not isinstance(vocab[0], dict):
        raise ValueError(f"tiktoken vocabulary {str(path)!r} is not a JSON list of "
                         f"{{rank, token_bytes, token_str}} entries")
    return len(vocab)


class LibraryTokenizer:
    """A ``megatron.core.tokenizers`` text tokenizer (huggingface or tiktoken) with the ``Tokenizer``
    attributes megatron's ``GPTDataset`` and this package read. Picklable: it carries its settings and
    reloads in the receiving process."""

    def __init__(self, kind: str, path: str | os.PathLike, tiktoken_pattern: str = "v2",
                 tiktoken_num_special_tokens: int = 1000):
        if kind not in ("huggingface", "tiktoken"):
            raise ValueError(f"data.tokenizer_type must be one of {TOKENIZER_TYPES}, got {kind!r}")
        self.kind, self.tiktoken_pattern = kind, tiktoken_pattern
        self.tiktoken_num_special_tokens = tiktoken_num_special_tokens
        if kind == "huggingface":
            self.model_path = str(hf_tokenizer_dir(path))
        else:
            if not Path(path).is_file():
                raise ValueError(f"tiktoken vocabulary {str(path)!r} (data.tokenizer_model) does not exist")
            if tiktoken_pattern not in TIKTOKEN_PATTERNS:
                raise ValueError(f"data.tiktoken_pattern must be one of {TIKTOKEN_PATTERNS}, "
                                 f"got {tiktoken_pattern!r}")
            self.model_path = str(path)
        self._load()

    def _load(self) -> None:
        from pmp_megatron import mcore

        if self.kind == "huggingface":
            try:
                self._tok = mcore.MegatronTokenizer.from_pretrained(
                    tokenizer_path=self.model_path, metadata_path={"library": "huggingface"},
                    include_special_tokens=False)
            except ValueError as err:
                raise ValueError(f"tokenizer {self.model_path!r} does not load with transformers' "
                                 f"AutoTokenizer: {str(err).splitlines()[0]}") from err
            if self._tok.eod is None:
                raise ValueError(f"tokenizer {self.model_path!r} has no eos token (needed as "
                                 f"end-of-document)")
        else:
            try:
                import tiktoken  # noqa: F401  (megatron imports it lazily and fails late without it)
            except ImportError as err:
                raise ValueError("data.tokenizer_type tiktoken needs the tiktoken package: "
                                 "pip install 'pmp_megatron[tiktoken]'") from err
            num_special = self.tiktoken_num_special_tokens
            size = tiktoken_vocab_size(self.model_path) + num_special
            try:
                self._tok = mcore.MegatronTokenizer.from_pretrained(
                    tokenizer_path=self.model_path, metadata_path={"library": "tiktoken"},
                    num_special_tokens=num_special, pattern=self.tiktoken_pattern, vocab_size=size)
            except AssertionError as err:
                raise ValueError(f"tiktoken vocabulary {self.model_path!r} does not load with "
                                 f"data.tiktoken_num_special_tokens={num_special}: {err}") from err
        self._sha256 = self._hash()

    def _hash(self) -> str:
        h = hashlib.sha256(f"{self.kind}\n".encode())
        if self.kind == "huggingface":
            for name in HF_IDENTITY_FILES:
                path = Path(self.model_path) / name
                if path.is_file():
                    h.update(f"{name}\n".encode())
                    h.update(path.read_bytes())
        else:
            h.update(f"{self.tiktoken_pattern}\n{self.tiktoken_num_special_tokens}\n".encode())
            h.update(Path(self.model_path).read_bytes())
        return h.hexdigest()

    def __getstate__(self) -> dict:
        return {"kind": self.kind, "model_path": self.model_path, "tiktoken_pattern": self.tiktoken_pattern,
                "tiktoken_num_special_tokens": self.tiktoken_num_special_tokens}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._load()

    @property
    def vocab_size(self) -> int:
        """Number of ids (``0 .. vocab_size - 1``), special ids included."""
        return self._tok.vocab_size

    @property
    def eod(self) -> int:
        """End-of-document id (the tokenizer's eos), appended after every document."""
        return self._tok.eod

    @property
    def eos(self) -> int:
        return self._tok.eod

    @property
    def bos(self) -> int | None:
        return self._tok.bos_id

    @property
    def pad(self) -> int | None:
        return self._tok.pad_id

    @property
    def sha256(self) -> str:
        """Hash of the tokenizer's files and settings: names the tokenizer a dataset was built with."""
        return self._sha256

    @property
    def unique_identifiers(self) -> dict:
        """What megatron's dataset cache key records about the tokenizer (its content, not its path)."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "sha256": self.sha256}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return list(self._tok.tokenize(text))

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        """Text of ``ids``; special tokens decode to nothing."""
        return self._tok.detokenize([int(i) for i in ids], skip_special_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids) -> str:
        return self.decode(ids)

    def __repr__(self) -> str:
        return f"LibraryTokenizer({self.kind!r}, {self.model_path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(kind: str, path: str | os.PathLike, tiktoken_pattern: str = "v2",
                   tiktoken_num_special_tokens: int = 1000):
    """The tokenizer of ``data.tokenizer_type`` ``kind`` at ``path`` (``Tokenizer`` or
    ``LibraryTokenizer``)."""
    if kind == "sentencepiece":
        from pmp_megatron.data.tokenizer import Tokenizer

        return Tokenizer(path)
    return LibraryTokenizer(kind, path, tiktoken_pattern, tiktoken_num_special_tokens)


def tokenizer_of(data_cfg):
    """The tokenizer a ``DataConfig`` names (``data.tokenizer_type`` / ``data.tokenizer_model``)."""
    if not data_cfg.tokenizer_model:
        raise ValueError("data.tokenizer_model is required (the tokenizer the data were made with)")
    return load_tokenizer(data_cfg.tokenizer_type, data_cfg.tokenizer_model, data_cfg.tiktoken_pattern,
                          data_cfg.tiktoken_num_special_tokens)
