"""Downstream task data for the attacks: documents -> token blocks -> a fixed train/eval split.

A task is a builtin domain (``builtin:prose_heldout``, or the bare domain name) or a JSONL file (one
``{"text": ...}`` object a line; the key is configurable). Documents are shuffled with a fixed split seed
(independent of the attack seed, so every cell of a task sees the same eval set), tokenized with the
release's own tokenizer, joined with the end-of-document id and cut into blocks of ``seq_length`` tokens.
The first ``eval_blocks`` blocks are the held-out eval set (they come from the first shuffled documents,
so train and eval share at most the one document that straddles the boundary); the rest is train.

Training batches are drawn epoch by epoch from a permutation seeded by the attack seed.

The other task kinds (``suite.TASK_KINDS``) become the same ``TaskData`` with labels: ``synthetic``
(``data.synthetic`` examples over the release's whole vocabulary, right-padded, trained and scored on the
target tokens only) and ``classify`` (``attack.classify`` paragraphs encoded with the release's tokenizer,
cut to ``seq_length``, trained and scored on the one label token). ``lm_eval`` tasks train on the data of
the suite task they name and are scored by lm-eval (``runner``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pmp_megatron.attack.suite import TaskSpec
from pmp_megatron.data import corpora
from pmp_megatron.release.reader import ReleaseTokenizer

logger = logging.getLogger(__name__)

SPLIT_SEED = 1234


METRICS = {"lm": "token_acc", "synthetic": "exact_match", "classify": "accuracy", "lm_eval": "lm_eval"}


@dataclass(frozen=True)
class TaskData:
    """Token rows of one task: ``train`` ``[num_train, s]`` and ``eval`` ``[num_eval, s]`` (int64), with
    ``*_labels`` (same shapes; -100 off the positions that train and score; None: every next token)."""

    name: str
    train: torch.Tensor
    eval: torch.Tensor
    train_labels: torch.Tensor | None = None
    eval_labels: torch.Tensor | None = None
    metric: str = "token_acc"  # token_acc | exact_match | accuracy (over label_ids) | lm_eval
    label_ids: tuple[int, ...] | None = None  # classify: the label tokens accuracy chooses among

    @property
    def num_train_tokens(self) -> int:
        return self.train.numel()


def resolve_source(spec: TaskSpec) -> str:
    """The ``corpora.iter_source`` source of a task; ValueError for an unknown task."""
    src = spec.source
    if src.startswith(corpora.BUILTIN_PREFIX):
        corpora.parse_builtin(src)  # raises for an unknown domain
        return src
    if src in corpora.list_domains():
        return corpora.BUILTIN_PREFIX + src
    if Path(src).is_file():
        return src
    raise ValueError(f"unknown task {src!r}: neither a builtin domain ({', '.join(corpora.list_domains())}) "
                     f"nor an existing JSONL file")


def load_task(spec: TaskSpec, tokenizer: ReleaseTokenizer, seq_length: int, eval_blocks: int) -> TaskData:
    """Tokenize a task and split it into train and eval blocks (deterministic)."""
    docs = list(corpora.iter_source(resolve_source(spec), json_key=spec.json_key, max_docs=spec.max_docs,
                                    max_chars=spec.max_chars))
    random.Random(SPLIT_SEED).shuffle(docs)
    ids: list[int] = []
    for text in docs:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eod)
    num_blocks = len(ids) // seq_length
    if num_blocks < eval_blocks + 1:
        raise ValueError(f"task {spec.name!r} has {len(ids)} tokens = {num_blocks} blocks of {seq_length}: "
                         f"too few for {eval_blocks} eval blocks plus training (raise max_docs or lower "
                         f"eval_blocks / seq_length)")
    blocks = torch.tensor(ids[: num_blocks * seq_length], dtype=torch.long).view(num_blocks, seq_length)
    logger.info("task %s: %d documents, %d tokens, %d train + %d eval blocks of %d", spec.name, len(docs),
                len(ids), num_blocks - eval_blocks, eval_blocks, seq_length)
    return TaskData(spec.name, blocks[eval_blocks:].contiguous(), blocks[:eval_blocks].contiguous())


def load_synthetic(spec: TaskSpec, vocab_size: int) -> TaskData:
    """A synthetic task over ``vocab_size`` ids (deterministic; train and eval disjoint)."""
    from pmp_megatron.data import synthetic

    task = synthetic.SyntheticTask(spec.source, vocab_size, spec.length)
    rows = {}
    for split, num in (("train", spec.num_train or 2000), ("eval", spec.num_eval or 256)):
        tokens, mask = synthetic.lm_samples(synthetic.generate(task, split, num))
        rows[split] = (tokens, synthetic.hf_labels(tokens, mask))
    logger.info("task %s: synthetic %s over %d ids, %d train + %d eval examples", spec.name, spec.source,
                vocab_size, rows["train"][0].shape[0], rows["eval"][0].shape[0])
    return TaskData(spec.name, rows["train"][0], rows["eval"][0], rows["train"][1], rows["eval"][1],
                    "exact_match")


def load_classify(spec: TaskSpec, tokenizer: ReleaseTokenizer, seq_length: int) -> TaskData:
    """The stdlib-family classification task, prompts cut to ``seq_length`` - 1 tokens. The label token
    of a family is the first token of `` <family>`` (with a small vocabulary where two coincide: the first
    token of each not taken by an earlier family)."""
    from pmp_megatron.attack import classify
    from pmp_megatron.data.synthetic import hf_labels

    try:
        label_ids = classify.label_token_ids(tokenizer.encode)
    except ValueError:  # a small vocabulary: the first distinct token of each family name instead
        label_ids = []
        for family in classify.FAMILIES:
            ids = [i for i in tokenizer.encode(" " + family) if i not in label_ids]
            if not ids:
                raise ValueError(f"task {spec.name!r}: the family names have no distinct label tokens under "
                                 "this tokenizer") from None
            label_ids.append(ids[0])
    rows = {}
    for split, num in (("train", spec.num_train), ("eval", spec.num_eval or 50)):
        encoded = classify.encode_examples(classify.examples(split, max_per_family=num), tokenizer.encode,
                                           max_tokens=seq_length - 1)
        tokens, mask = classify.lm_samples(encoded, label_ids)
        rows[split] = (tokens, hf_labels(tokens, mask))
    logger.info("task %s: %d train + %d eval paragraphs", spec.name, rows["train"][0].shape[0],
                rows["eval"][0].shape[0])
    return TaskData(spec.name, rows["train"][0], rows["eval"][0], rows["train"][1], rows["eval"][1],
                    "accuracy", tuple(label_ids))


def train_batches(data: TaskData, batch_size: int, steps: int,
                  seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches (tokens ``[batch_size, s]``, HF labels ``[batch_size, s]``) drawn without
    replacement, epoch after epoch."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(data.train.shape[0], generator=gen)])
        take, order = order[:batch_size], order[batch_size:]
        tokens = data.train[take]
        yield tokens, tokens if data.train_labels is None else data.train_labels[take]
