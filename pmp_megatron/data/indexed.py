"""Preprocessing: tokenize document sources into Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``).

Each document (see ``corpora.iter_source`` for the accepted sources) becomes one sequence of its token
ids followed by the tokenizer's end-of-document id. Tokenization runs in worker processes
(``multiprocessing.Pool.imap``, which keeps the input order), so the output is byte-identical across
runs and across worker counts. Tokens are stored as ``uint16`` when the vocabulary fits, else ``int32``.
A small ``PREFIX.meta.json`` records the tokenizer hash and counts; ``datasets.build_datasets`` checks it.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing as mp
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tqdm import tqdm

from pmp_megatron.data.corpora import corpus_fingerprint, iter_source, parse_builtin
from pmp_megatron.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_WORKER_TOKENIZER: Tokenizer | None = None


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
               progress: bool = True) -> dict:
    """Tokenize ``inputs`` into ``output_prefix.bin`` / ``.idx`` (and ``.meta.json``); return the metadata.

    ``max_docs`` / ``max_chars`` limit each input (see ``corpora.iter_source``). ``workers`` > 1 tokenizes
    in that many processes; the result does not depend on it.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    docs = iter_inputs(inputs, json_key, split_paragraphs, max_docs, max_chars)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    start = time.perf_counter()
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    num_docs = num_tokens = 0
    try:
        with _encoded(docs, tokenizer, workers, chunk_size) as encoded:
            bar = tqdm(encoded, desc=f"tokenizing -> {prefix.name}", unit="doc", file=sys.stderr,
                       disable=not progress, mininterval=1.0)
            for ids in bar:
                builder.add_document(ids.astype(dtype, copy=False), [ids.size])
                num_docs += 1
                num_tokens += ids.size
        if num_docs == 0:
            raise ValueError(f"the inputs {[str(s) for s in inputs]} hold no document")
    except BaseException:
        builder.data_file.close()
        for path in (Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), meta_path(prefix)):
            path.unlink(missing_ok=True)  # no half-written or stale dataset left behind
        raise
    builder.finalize(f"{prefix}.idx")
    meta = {
        "num_documents": num_docs,
        "num_tokens": num_tokens,  # end-of-document tokens included
        "dtype": np.dtype(dtype).name,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "inputs": [str(s) for s in inputs],
        "builtin_corpora": corpus_fingerprint(),
    }
    meta_path(prefix).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("wrote %s.{bin,idx}: %d documents, %d tokens (%s) in %.1f s", prefix, num_docs,
                num_tokens, meta["dtype"], time.perf_counter() - start)
    return meta


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
    ids = _WORKER_TOKENIZER.encode(text)
    ids.append(_WORKER_TOKENIZER.eod)
    return np.asarray(ids, dtype=np.int32)


def read_indexed(prefix: str | os.PathLike) -> IndexedDataset:
    """Open ``prefix.bin`` / ``prefix.idx`` with megatron's reader (memory-mapped)."""
    if not Path(f"{prefix}.idx").is_file() or not Path(f"{prefix}.bin").is_file():
        raise ValueError(f"indexed dataset {prefix}.bin/.idx does not exist")
    with quiet_rank_warnings():
        return IndexedDataset(str(prefix), multimodal=False, mmap=True)


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
