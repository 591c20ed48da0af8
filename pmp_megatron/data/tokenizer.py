"""SentencePiece tokenizer: deterministic training from texts, and the ``Tokenizer`` the data pipeline
and megatron's ``GPTDataset`` use.

Training settings are fixed for byte-exact reproducibility and for lossless round trips of prose and
code: one thread, no input shuffling or sampling, identity normalisation, whitespace kept as is (runs of
spaces become pieces), no dummy prefix, digits split, and byte fallback (any text encodes, nothing maps
to ``<unk>``). Documents are fed line by line (blank lines dropped); newlines encode as the byte piece
``<0x0A>``. Special ids: ``<unk>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos, used as end-of-document),
``<pad>`` 3 (never produced by ``encode``).

Long lines: sentencepiece's trainer silently drops sentences over ``MAX_SENTENCE_BYTES``, so longer lines
are cut into pieces under it (after the last space in reach, when there is one) and trained on. Encoding
a very long text in one call costs sentencepiece tens of bytes per character, so ``encode_array`` encodes
texts longer than ``ENCODE_CHUNK_CHARS`` in pieces cut after a newline (no piece of a tokenizer trained
here crosses one: the same ids as one call) or, on a line longer than that, before a space.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pmp_megatron.atomic import write_bytes_atomic

logger = logging.getLogger(__name__)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NUM_BYTE_PIECES = 256
MAX_SENTENCE_BYTES = 4192  # sentencepiece's max_sentence_length (its default), in UTF-8 bytes
ENCODE_CHUNK_CHARS = 1 << 16  # longer texts are encoded in pieces of at most this many characters


def train_tokenizer(texts: Iterable[str], model_path: str | os.PathLike, vocab_size: int,
                    model_type: str = "bpe", max_sentences: int = 2_000_000,
                    character_coverage: float = 0.9995) -> Tokenizer:
    """Train a SentencePiece model on ``texts`` (documents) and write it to ``model_path`` (atomically).

    The same texts and arguments always give a byte-identical ``.model`` file. ``max_sentences`` caps
    the number of (non-blank) lines read, the first ones in order. Returns the loaded ``Tokenizer``.
    """
    tokenizer = Tokenizer.from_proto(
        train_tokenizer_proto(texts, vocab_size, model_type, max_sentences, character_coverage), model_path)
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(model_path, tokenizer.proto)
    logger.info("trained a %s tokenizer with %d pieces -> %s", model_type, vocab_size, model_path)
    return tokenizer


def train_tokenizer_proto(texts: Iterable[str], vocab_size: int, model_type: str = "bpe",
                          max_sentences: int = 2_000_000, character_coverage: float = 0.9995) -> bytes:
    """``train_tokenizer`` without writing a file: the serialized ``.model`` bytes."""
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
            max_sentence_length=MAX_SENTENCE_BYTES,
            minloglevel=2,
        )
    except RuntimeError as err:  # e.g. "Vocabulary size too high" on a small corpus
        raise ValueError(f"sentencepiece training failed (vocab_size={vocab_size}): {err}") from err
    return buffer.getvalue()


def _training_lines(texts: Iterable[str], max_sentences: int) -> Iterator[str]:
    num_lines = 0
    for text in texts:
        for line in _lines(text):
            too_long = (len(line) > MAX_SENTENCE_BYTES // 4  # <= 4 UTF-8 bytes a character
                        and len(line.encode("utf-8", "surrogatepass")) > MAX_SENTENCE_BYTES)
            for piece in _cut(line, MAX_SENTENCE_BYTES // 4, "after") if too_long else (line,):
                if piece.strip():
                    yield piece
                    num_lines += 1
                    if num_lines >= max_sentences:
                        return


def _lines(text: str) -> Iterator[str]:
    """The lines of ``text`` without their newlines, one at a time (no list of them all)."""
    start = 0
    while (end := text.find("\n", start)) >= 0:
        yield text[start:end]
        start = end + 1
    yield text[start:]


def _cut(text: str, size: int, at_space: str) -> Iterator[str]:
    """``text`` in pieces of at most ``size`` characters, each cut after its last newline in the second
    half of its reach, else after (``at_space="after"``) or before (``"before"``) its last space there,
    else at ``size``. Joined, the pieces are ``text``."""
    start = 0
    while len(text) - start > size:
        lo, hi = start + size // 2, start + size
        cut = text.rfind("\n", lo, hi) + 1
        if cut <= 0:
            space = text.rfind(" ", lo, hi)
            cut = hi if space < 0 else space + (at_space == "after")
        yield text[start:cut]
        start = cut
    yield text[start:]


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

    @classmethod
    def from_proto(cls, proto: bytes, model_path: str | os.PathLike) -> Tokenizer:
        """A tokenizer from ``.model`` bytes that will live at ``model_path`` (not read, not written)."""
        tokenizer = cls.__new__(cls)
        tokenizer.model_path = str(model_path)
        tokenizer._load(proto)
        return tokenizer

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
    def proto(self) -> bytes:
        """The serialized ``.model`` file."""
        return self._proto

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

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int32 array; long texts are encoded piecewise (module docstring)."""
        if len(text) <= ENCODE_CHUNK_CHARS:
            return np.asarray(self._sp.encode(text), dtype=np.int32)
        parts = [np.asarray(self._sp.encode(piece), dtype=np.int32)
                 for piece in _cut(text, ENCODE_CHUNK_CHARS, "before")]
        return np.concatenate(parts)

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
