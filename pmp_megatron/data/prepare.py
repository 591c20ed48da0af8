"""One call from the built-in offline corpora to a trained tokenizer and indexed datasets (used by the
quickstart, the experiments and the end-to-end tests): nothing is downloaded."""

from __future__ import annotations

import logging
from pathlib import Path

from pmp_megatron.data import corpora
from pmp_megatron.data.indexed import preprocess
from pmp_megatron.data.tokenizer import Tokenizer, train_tokenizer

logger = logging.getLogger(__name__)


def prepare_builtin(out_dir: str | Path, vocab_size: int, domains=corpora.PRETRAINING_DOMAINS,
                    max_docs: int | None = None, max_chars: int | None = None,
                    workers: int = 1) -> tuple[str, list[str]]:
    """Train a tokenizer on ``domains`` and write one indexed dataset per domain into ``out_dir``.

    Returns (tokenizer .model path, [dataset prefix per domain]). Reuses files already there.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "tokenizer.model"
    if not model.is_file():
        texts = (doc for d in domains for doc in corpora.iter_documents(d, max_docs, max_chars))
        train_tokenizer(texts, model, vocab_size)
    tokenizer = Tokenizer(model)
    prefixes = []
    for domain in domains:
        prefix = out / domain
        if not Path(f"{prefix}.idx").is_file():
            preprocess([f"builtin:{domain}"], prefix, tokenizer, workers=workers, max_docs=max_docs,
                       max_chars=max_chars, progress=False)
        prefixes.append(str(prefix))
    logger.info("data ready in %s: tokenizer (vocab %d), %s", out, tokenizer.vocab_size, ", ".join(domains))
    return str(model), prefixes
