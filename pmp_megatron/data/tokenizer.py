"""SentencePiece tokenizer: deterministic training from texts, and the ``Tokenizer`` the data pipeline
and megatron's ``GPTDataset`` use.

Training settings are fixed for byte-exact reproducibility and for lossless round trips of prose and
code: one thread, no input shuffling or sampling, identity normalisation, whitespace kept as is (runs of
spaces become pieces), no dummy prefix, digits split, and byte fallback (any text encodes, nothing maps
to ``<unk>``). Documents are fed line by line (blank lines dropped); newlines encode as the byte piece
``<0x0A>``. Special ids: ``<unk>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos, used as end-of-document),
``<pad>`` 3 (never produced by ``encode``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

logger = logging.getLogger(__name__)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NUM_BYTE_PIECES = 256


def train_tokenizer(texts: Iterable[str], model_path: str | os.PathLike, vocab_size: int,
                    model_type: str = "bpe", max_sentences: int = 2_000_000,
                    character_coverage: float = 0.9995) -> Tokenizer:
    """Train a SentencePiece model on ``texts`` (documents) and write it to ``model_path``.

    The same texts and arguments always give a byte-identical ``.model`` file. ``max_sentences`` caps
    the number of (non-blank) lines read, the first ones in order. Returns the loaded ``Tokenizer``.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    min_vocab = NUM_BYTE_PIECES + 4
    if vocab_size <= min_vocab:
        raise ValueError(f"vocab_size must exceed {min_vocab} (256 byte pieces + 4 special pieces), "
                         f"got {vocab_size}")
    lines = _training_lines(texts, max_sentences)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            minloglevel=2,
        )
    except RuntimeError as err:  # e.g. "Vocabulary size too high" on a small corpus
        raise ValueError(f"sentencepiece training failed (vocab_size={vocab_size}): {err}") from err
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(buffer.getvalue())
    logger.info("trained a %s tokenizer with %d pieces -> %s", model_type, vocab_size, model_path)
    return Tokenizer(model_path)


def _training_lines(texts: Iterable[str], max_sentences: int) -> Iterator[str]:
    num_lines = 0
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line
                num_lines += 1
                if num_lines >= max_sentences:
                    return


class Tokenizer:
    """A trained SentencePiece model, with the attributes megatron's ``GPTDataset`` reads
    (``vocab_size``, ``eod``, ``eos``, ``bos``, ``pad``, ``unique_identifiers``) and
    ``tokenize``/``detokenize`` aliases.

    Picklable (it carries the model bytes), so worker processes can receive it.
    """

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.is_file():
            raise ValueError(f"tokenizer model {path} does not exist")
        self.model_path = str(path)
        self._load(path.read_bytes())

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._load(state["proto"])

    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids are ``0 .. vocab_size - 1``); the model pads its embedding on top."""
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        """End-of-document id, appended after every document (the ``</s>`` piece)."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    @property
    def sha256(self) -> str:
        """Hash of the model file: names the tokenizer a dataset was built with."""
        return hashlib.sha256(self._proto).hexdigest()

    @property
    def unique_identifiers(self) -> dict:
        """What megatron's dataset cache key records about the tokenizer (its content, not its path)."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "sha256": self.sha256}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; control pieces (bos/eos/pad) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"
