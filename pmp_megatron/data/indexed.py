"""Preprocessing: tokenize document sources into Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``).

Each document (see ``corpora.iter_source`` for the accepted sources) becomes one sequence of its token
ids followed by the tokenizer's end-of-document id. Tokenization runs in worker processes
(``multiprocessing.Pool.imap``, which keeps the input order), so the output is byte-identical across
runs and across worker counts. Tokens are stored as ``uint16`` when the vocabulary fits, else ``int32``.
A small ``PREFIX.meta.json`` records the tokenizer hash and counts; ``datasets.build_datasets`` checks it.

The three files (and the tokenizer, when it was trained in the same run) are written to temp files and
renamed into place only after every document is in: a failed run leaves an existing dataset at the same
prefix as it was. The ``.idx`` is megatron's format (version 1), written here rather than by megatron's
builder, which opens its files by name.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing as mp
import os
import struct
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pmp_megatron import mcore
from pmp_megatron.atomic import atomic_writes
from pmp_megatron.data.corpora import corpus_fingerprint, iter_source, parse_builtin
from pmp_megatron.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_WORKER_TOKENIZER: Tokenizer | None = None
_INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron's .idx magic
_INDEX_VERSION = 1


def token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest of uint16 / int32 that holds every id of a ``vocab_size`` vocabulary."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def meta_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.meta.json")


def iter_inputs(inputs: Sequence[str | os.PathLike], json_key: str = "text", split_paragraphs: bool = False,
                max_docs: int | None = None, max_chars: int | None = None) -> Iterator[str]:
    """The documents of every input in order; ValueError at once for a missing file or unknown domain."""
    check_inputs(inputs)
    return itertools.chain.from_iterable(
        iter_source(source, json_key=json_key, split_paragraphs=split_paragraphs, max_docs=max_docs,
                    max_chars=max_chars)
        for source in inputs)


def check_inputs(inputs: Sequence[str | os.PathLike]) -> None:
    """Raise ValueError for an empty input list, a missing input file, or an unknown builtin domain."""
    if not inputs:
        raise ValueError("no input given")
    for source in inputs:
        if parse_builtin(str(source)) is None and not Path(source).is_file():
            raise ValueError(f"input file {source} does not exist (or is not a file)")


def preprocess(inputs: Sequence[str | os.PathLike], output_prefix: str | os.PathLike, tokenizer: Tokenizer,
               json_key: str = "text", split_paragraphs: bool = False, workers: int = 1,
               chunk_size: int = 16, max_docs: int | None = None, max_chars: int | None = None,
               progress: bool = True, write_tokenizer: bool = False) -> dict:
    """Tokenize ``inputs`` into ``output_prefix.bin`` / ``.idx`` (and ``.meta.json``); return the metadata.

    ``max_docs`` / ``max_chars`` limit each input (see ``corpora.iter_source``). ``workers`` > 1 tokenizes
    in that many processes; the result does not depend on it. ``write_tokenizer`` also writes the
    tokenizer's ``.model`` to ``tokenizer.model_path``, together with the dataset (a tokenizer trained
    for this dataset replaces the old one only if the dataset is written too). Nothing is replaced unless
    every file is complete.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    docs = iter_inputs(inputs, json_key, split_paragraphs, max_docs, max_chars)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # Replaced in this order: the metadata (with the tokenizer hash) after the data it describes.
    targets = [Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), meta_path(prefix)]
    if write_tokenizer:
        targets.insert(0, Path(tokenizer.model_path))
        targets[0].parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    start = time.perf_counter()
    lengths: list[int] = []
    with atomic_writes(targets) as files:
        *tokenizer_file, bin_file, idx_file, meta_file = files
        with _encoded(docs, tokenizer, workers, chunk_size) as encoded:
            bar = tqdm(encoded, desc=f"tokenizing -> {prefix.name}", unit="doc", file=sys.stderr,
                       disable=not progress, mininterval=1.0)
            for ids in bar:
                bin_file.write(ids.astype(dtype, copy=False).tobytes(order="C"))
                lengths.append(ids.size)
        if not lengths:
            raise ValueError(f"the inputs {[str(s) for s in inputs]} hold no document")
        write_index(idx_file, dtype, lengths)
        meta = {
            "num_documents": len(lengths),
            "num_tokens": sum(lengths),  # end-of-document tokens included
            "dtype": np.dtype(dtype).name,
            "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
            "inputs": [str(s) for s in inputs],
            "builtin_corpora": corpus_fingerprint(),
        }
        meta_file.write((json.dumps(meta, indent=2) + "\n").encode())
        for f in tokenizer_file:
            f.write(tokenizer.proto)
    logger.info("wrote %s.{bin,idx}: %d documents, %d tokens (%s) in %.1f s", prefix, meta["num_documents"],
                meta["num_tokens"], meta["dtype"], time.perf_counter() - start)
    return meta


def write_index(f, dtype: type[np.number], sequence_lengths: Sequence[int]) -> None:
    """Write megatron's ``.idx`` (version 1, one sequence per document) for ``sequence_lengths`` tokens of
    ``dtype`` each to the binary file ``f``: what ``IndexedDatasetBuilder.finalize`` writes."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)  # byte offset of each sequence in the .bin
    np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
    f.write(_INDEX_HEADER)
    f.write(struct.pack("<Q", _INDEX_VERSION))
    f.write(struct.pack("<B", mcore.DType.code_from_dtype(dtype)))
    f.write(struct.pack("<Q", len(lengths)))
    f.write(struct.pack("<Q", len(document_indices)))
    f.write(lengths.tobytes(order="C"))
    f.write(pointers.tobytes(order="C"))
    f.write(document_indices.tobytes(order="C"))


class _encoded:
    """Context manager yielding the token arrays of ``docs`` in order, in-process or from a Pool."""

    def __init__(self, docs: Iterable[str], tokenizer: Tokenizer, workers: int, chunk_size: int):
        self.docs, self.tokenizer, self.workers, self.chunk_size = docs, tokenizer, workers, chunk_size
        self.pool = None

    def __enter__(self) -> Iterator[np.ndarray]:
        if self.workers == 1:
            _init_worker(self.tokenizer)
            return map(_encode, self.docs)
        # fork: workers start at once and inherit the tokenizer; imap keeps the input order.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(self.tokenizer,))
        return self.pool.imap(_encode, self.docs, chunksize=self.chunk_size)

    def __exit__(self, *exc) -> None:
        global _WORKER_TOKENIZER
        _WORKER_TOKENIZER = None
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode(text: str) -> np.ndarray:
    """Token ids of one document followed by the end-of-document id, as int32."""
    return np.append(_WORKER_TOKENIZER.encode_array(text), np.int32(_WORKER_TOKENIZER.eod))


def read_indexed(prefix: str | os.PathLike) -> mcore.IndexedDataset:
    """Open ``prefix.bin`` / ``prefix.idx`` with megatron's reader (memory-mapped)."""
    if not Path(f"{prefix}.idx").is_file() or not Path(f"{prefix}.bin").is_file():
        raise ValueError(f"indexed dataset {prefix}.bin/.idx does not exist")
    with quiet_rank_warnings():
        return mcore.IndexedDataset(str(prefix), multimodal=False, mmap=True)


@contextmanager
def quiet_rank_warnings() -> Iterator[None]:
    """Silence megatron's "Could not determine rank" warning, raised by its logging without a process
    group (and without RANK set), once per log line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not determine (rank|world size)")
        yield


def read_meta(prefix: str | os.PathLike) -> dict | None:
    """The ``prefix.meta.json`` written by ``preprocess``, or None when there is none."""
    path = meta_path(prefix)
    return json.loads(path.read_text()) if path.is_file() else None
