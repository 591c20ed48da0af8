"""Offline algorithmic tasks over random vocabulary ids: copy, reverse and in-context key-value recall.

Every content token is drawn uniformly from the whole vocabulary (special ids and the four marker ids
excepted), so fine-tuning on these tasks touches every embedding and lm_head row -- unlike text, whose
Zipf tail leaves most rows of a 32k vocabulary untouched (the rows PMP's Stage I puts in the complement).
No tokenizer and no data files: an example is a function of (task, vocab size, length, seed).

Formats (``M_*`` are marker ids, ``SEP`` the separator; the first four non-special ids of the vocab):

- ``copy``:    prompt ``M_copy x1 .. xn SEP``,                 target ``x1 .. xn``
- ``reverse``: prompt ``M_reverse x1 .. xn SEP``,              target ``xn .. x1``
- ``recall``:  prompt ``M_recall k1 v1 .. kn vn SEP kq SEP``,  target ``vq`` (keys distinct)

Train and eval are disjoint BY CONSTRUCTION: an example belongs to the eval split iff the sha256 of its
prompt falls in the first ``eval_percent`` of 100 buckets, and generation rejects every draw of the other
split, so no seed, count or call order can put one prompt in both splits.

Scoring is exact match of the whole target under teacher forcing: the argmax at every target position,
given the true prefix, must equal the target token. For a whole-target exact match this equals greedy
decoding (greedy emits the target iff every teacher-forced argmax is right) and needs one forward pass.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

TASKS = ("copy", "reverse", "recall")
SPLITS = ("train", "eval")
NUM_MARKERS = 4  # copy, reverse, recall, separator


@dataclass(frozen=True)
class Example:
    prompt: tuple[int, ...]
    target: tuple[int, ...]


@dataclass(frozen=True)
class SyntheticTask:
    """One task of the family over one vocabulary."""

    name: str  # copy | reverse | recall
    vocab_size: int
    length: int = 8  # content tokens (copy, reverse) or key-value pairs (recall)
    special_ids: tuple[int, ...] = (0, 1, 2)  # never drawn (Llama sentencepiece: unk, bos, eos)
    eval_percent: int = 20  # share of all possible prompts that belongs to the eval split

    def __post_init__(self):
        if self.name not in TASKS:
            raise ValueError(f"unknown synthetic task {self.name!r}; known: {', '.join(TASKS)}")
        if self.length < 1:
            raise ValueError(f"synthetic task {self.name}: length must be >= 1, got {self.length}")
        if not 0 < self.eval_percent < 100:
            raise ValueError(f"synthetic task {self.name}: eval_percent must be in (0, 100), got "
                             f"{self.eval_percent}")
        minimum = NUM_MARKERS + (2 * self.length if self.name == "recall" else 2)
        if len(self.content_ids) + NUM_MARKERS < minimum:
            raise ValueError(f"synthetic task {self.name}: vocab_size {self.vocab_size} leaves too few "
                             f"non-special ids for length {self.length}")

    @functools.cached_property
    def _free_ids(self) -> list[int]:
        skip = set(self.special_ids)
        return [i for i in range(self.vocab_size) if i not in skip]

    @property
    def markers(self) -> dict[str, int]:
        """Marker ids: one per task and ``sep``, the first non-special ids of the vocabulary."""
        return dict(zip((*TASKS, "sep"), self._free_ids[:NUM_MARKERS], strict=True))

    @property
    def content_ids(self) -> list[int]:
        """The ids content tokens are drawn from: every id but the special ones and the markers."""
        return self._free_ids[NUM_MARKERS:]

    @property
    def prompt_length(self) -> int:
        return 2 * self.length + 4 if self.name == "recall" else self.length + 2

    @property
    def target_length(self) -> int:
        return 1 if self.name == "recall" else self.length


def split_of(prompt: Sequence[int], eval_percent: int) -> str:
    """``eval`` or ``train``: a fixed function of the prompt (sha256 of its ids)."""
    digest = hashlib.sha256(",".join(map(str, prompt)).encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "little") % 100 < eval_percent else "train"


def _draw(task: SyntheticTask, rng: random.Random, ids: list[int], markers: dict[str, int]) -> Example:
    m, n = markers, task.length
    if task.name == "recall":
        keys = rng.sample(ids, n)
        values = rng.choices(ids, k=n)
        q = rng.randrange(n)
        pairs = [t for kv in zip(keys, values, strict=True) for t in kv]
        return Example((m["recall"], *pairs, m["sep"], keys[q], m["sep"]), (values[q],))
    x = rng.choices(ids, k=n)
    target = x if task.name == "copy" else x[::-1]
    return Example((m[task.name], *x, m["sep"]), tuple(target))


def generate(task: SyntheticTask, split: str, num_examples: int, seed: int = 0) -> list[Example]:
    """``num_examples`` distinct examples of ``split``, a deterministic function of the arguments."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng = random.Random(f"pmp-synthetic:{task.name}:{task.vocab_size}:{task.length}:"
                        f"{sorted(task.special_ids)}:{split}:{seed}")
    ids, markers = task.content_ids, task.markers
    out, seen = [], set()
    budget = 200 * num_examples + 1000
    for _ in range(budget):
        if len(out) == num_examples:
            return out
        example = _draw(task, rng, ids, markers)
        if example.prompt in seen or split_of(example.prompt, task.eval_percent) != split:
            continue
        seen.add(example.prompt)
        out.append(example)
    if len(out) == num_examples:
        return out
    raise ValueError(f"synthetic task {task.name} (vocab {task.vocab_size}, length {task.length}): found "
                     f"only {len(out)} distinct {split} examples of {num_examples} in {budget} draws; lower "
                     "the count or raise vocab_size / length")


def lm_samples(examples: Sequence[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-tuning samples: ``tokens`` ``[n, L]`` (prompt + target, right-padded with ``pad_id``) and
    ``loss_mask`` ``[n, L]`` (bool, True on the target tokens: the positions whose prediction trains)."""
    if not examples:
        raise ValueError("lm_samples: no examples")
    width = max(len(e.prompt) + len(e.target) for e in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        p, t = len(e.prompt), len(e.target)
        tokens[i, : p + t] = torch.tensor(e.prompt + e.target)
        loss_mask[i, p: p + t] = True
    return tokens, loss_mask


def hf_labels(tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``labels`` for a Hugging Face causal LM (it shifts them itself): the tokens, -100 off the mask."""
    return tokens.masked_fill(~loss_mask, -100)


@torch.no_grad()
def exact_match(model: torch.nn.Module, examples: Sequence[Example], device: torch.device | str = "cpu",
                batch_size: int = 64) -> float:
    """Share of ``examples`` whose whole target is the teacher-forced argmax of ``model`` (an HF causal
    LM: ``model(input_ids=..., logits_to_keep=k).logits``). Examples are batched by shape (no padding);
    the count stays on the device until the one read at the end."""
    if not examples:
        raise ValueError("exact_match: no examples")
    device = torch.device(device)
    by_shape: dict[tuple[int, int], list[Example]] = defaultdict(list)
    for e in examples:
        by_shape[(len(e.prompt), len(e.target))].append(e)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for (_, num_target), group in sorted(by_shape.items()):
        for i in range(0, len(group), batch_size):
            chunk = group[i: i + batch_size]
            seq = torch.tensor([e.prompt + e.target for e in chunk], dtype=torch.long)  # [b, P + T]
            x, target = seq[:, :-1].to(device), seq[:, -num_target:].to(device)  # [b, P + T - 1], [b, T]
            logits = model(input_ids=x, logits_to_keep=num_target).logits  # [b, T, V]
            correct += (logits.argmax(-1) == target).all(-1).sum()
    model.train(was_training)
    return int(correct) / len(examples)
