"""Classification by LM: which standard-library family a paragraph of its test suite belongs to.

The documents are the standard library's own test files under ``test/test_<family>/`` -- the
``code_test`` downstream domain of ``data.corpora`` (never pretraining data), offline and identical on
every machine with the same Python. Each file is cut into paragraphs (blank-line blocks merged until
``min_chars``, cut at a line end before ``max_chars``) after every family name is masked (``xxx``), so
the label is not spelled out in the text. A paragraph occurring in two files is dropped.

Splits are by DOCUMENT: in each family the files are ranked by the sha256 of their path and the first
``eval_percent`` % (at least one) are eval; no eval paragraph comes from a training file. Each split is
balanced by taking at most ``max_per_family`` paragraphs per family (a fixed shuffle).

As an LM task, a prompt is ``<paragraph>\\n# module family:`` followed by one label token (the first
token of `` <family>``); accuracy is the argmax over the label tokens' logits at the prompt's last
position. ``lm_eval_records`` writes the same examples as multiple-choice records for lm-eval
(``configs/evals``).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pmp_megatron.data import corpora

FAMILIES = ("asyncio", "ctypes", "email", "importlib", "sqlite3", "unittest")
SUFFIX = "\n# module family:"
MASK = "xxx"
SPLITS = ("train", "eval")
_MASKED = re.compile(r"asyncio|ctypes|email|importlib|sqlite3?|unittest", re.IGNORECASE)


@dataclass(frozen=True)
class ClassifyExample:
    text: str  # the masked paragraph
    label: int  # index into the families
    source: str  # the document: path relative to the standard library


def prompt(text: str) -> str:
    return text + SUFFIX


def _stdlib() -> Path:
    return Path(corpora.corpus_fingerprint()["stdlib"])


def family_documents(family: str) -> list[str]:
    """Sorted paths (relative to the standard library) of the test files of ``family``."""
    root = _stdlib()
    folder = root / "test" / f"test_{family}"
    if not folder.is_dir():
        raise ValueError(f"family {family!r}: no test folder {folder} in this Python's standard library")
    return sorted(p.relative_to(root).as_posix() for p in folder.rglob("*.py")
                  if "__pycache__" not in p.parts)


def split_documents(documents: Sequence[str], eval_percent: int) -> dict[str, list[str]]:
    """The documents of one family by split: the first ``eval_percent`` % by path hash (at least one)."""
    ranked = sorted(documents, key=lambda d: hashlib.sha256(d.encode()).hexdigest())
    num_eval = max(1, round(len(ranked) * eval_percent / 100))
    if len(ranked) < 2:
        raise ValueError(f"need at least two documents to split, got {list(documents)}")
    return {"eval": sorted(ranked[:num_eval]), "train": sorted(ranked[num_eval:])}


def paragraphs(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Blank-line blocks merged until ``min_chars``, cut at the last line end before ``max_chars``."""
    out, current = [], ""
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        block = block.strip("\n")
        if not block.strip():
            continue
        current = f"{current}\n\n{block}" if current else block
        if len(current) >= min_chars:
            if len(current) > max_chars:
                cut = current.rfind("\n", 0, max_chars)
                current = current[: cut if cut >= min_chars else max_chars]
            out.append(current)
            current = ""
    return out


def examples(split: str, families: Sequence[str] = FAMILIES, max_per_family: int | None = 50,
             min_chars: int = 160, max_chars: int = 400, eval_percent: int = 20) -> list[ClassifyExample]:
    """The examples of ``split``, deterministic, at most ``max_per_family`` per family (None: all; the
    default 50 gives a balanced 300-example eval set), in a fixed shuffled order per family, the
    families taking turns."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    root = _stdlib()
    chunks: dict[str, list[tuple[str, str]]] = {}  # family -> (document, paragraph) of this split
    counts: Counter = Counter()
    for family in families:
        docs = split_documents(family_documents(family), eval_percent)
        for s in SPLITS:
            for doc in docs[s]:
                text = _MASKED.sub(MASK, (root / doc).read_text(encoding="utf-8", errors="replace"))
                for par in paragraphs(text, min_chars, max_chars):
                    counts[par] += 1
                    if s == split:
                        chunks.setdefault(family, []).append((doc, par))
    per_family = []
    for label, family in enumerate(families):
        kept = [(doc, par) for doc, par in chunks.get(family, []) if counts[par] == 1]
        random.Random(f"pmp-classify:{family}:{split}").shuffle(kept)
        if max_per_family is not None:
            kept = kept[:max_per_family]
        per_family.append([ClassifyExample(par, label, doc) for doc, par in kept])
    # round robin over the families, so any prefix (lm-eval's --limit) is as balanced as it can be
    return [e for group in itertools.zip_longest(*per_family) for e in group if e is not None]


# ----------------------------------------------------------------------------- as an LM task


def label_token_ids(encode: Callable[[str], list[int]], families: Sequence[str] = FAMILIES) -> list[int]:
    """The label token of each family: the first token of `` <family>``; ValueError if two coincide."""
    ids = [encode(" " + f)[0] for f in families]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the families' first tokens are not distinct under this tokenizer: "
                         f"{dict(zip(families, ids, strict=True))}; pass label ids of your own")
    return ids


def encode_examples(items: Sequence[ClassifyExample], encode: Callable[[str], list[int]],
                    max_tokens: int = 160) -> list[tuple[list[int], int]]:
    """(prompt ids, label) per example: the paragraph's first tokens, then the suffix's, at most
    ``max_tokens`` in all."""
    suffix = encode(SUFFIX)
    if len(suffix) >= max_tokens:
        raise ValueError(f"max_tokens {max_tokens} leaves no room for the text (suffix: {len(suffix)})")
    return [(encode(e.text)[: max_tokens - len(suffix)] + suffix, e.label) for e in items]


def lm_samples(encoded: Sequence[tuple[list[int], int]], label_ids: Sequence[int],
               pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` ``[n, L]`` (prompt + label token, right-padded) and ``loss_mask`` ``[n, L]`` (True on the
    label token only)."""
    width = max(len(ids) for ids, _ in encoded) + 1
    tokens = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for i, (ids, label) in enumerate(encoded):
        tokens[i, : len(ids) + 1] = torch.tensor([*ids, label_ids[label]])
        loss_mask[i, len(ids)] = True
    return tokens, loss_mask


@torch.no_grad()
def accuracy(model: torch.nn.Module, encoded: Sequence[tuple[list[int], int]], label_ids: Sequence[int],
             device: torch.device | str = "cpu", batch_size: int = 32) -> float:
    """Share of examples whose label token has the largest logit among the label tokens at the prompt's
    last position. Batches of similar length, right-padded (causal: padding after a position cannot
    change it); only the needed positions reach the lm_head; one host read at the end."""
    if not encoded:
        raise ValueError("accuracy: no examples")
    device = torch.device(device)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    labels_dev = torch.tensor(list(label_ids), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[start: start + batch_size]]
        last = [len(ids) - 1 for ids, _ in rows]
        x = torch.zeros((len(rows), max(last) + 1), dtype=torch.long)  # [b, s]
        for r, (ids, _) in enumerate(rows):
            x[r, : len(ids)] = torch.tensor(ids)
        keep = sorted(set(last))
        column = torch.tensor([bisect.bisect_left(keep, p) for p in last], device=device)
        logits = model(input_ids=x.to(device), logits_to_keep=torch.tensor(keep, device=device)).logits
        at_last = logits[torch.arange(len(rows), device=device), column]  # [b, V]
        pred = at_last.index_select(-1, labels_dev).argmax(-1)  # [b]
        target = torch.tensor([label for _, label in rows], device=device)
        correct += (pred == target).sum()
    model.train(was_training)
    return int(correct) / len(encoded)


def lm_eval_records(items: Sequence[ClassifyExample], families: Sequence[str] = FAMILIES) -> list[dict]:
    """Multiple-choice records for lm-eval: ``{"text", "choices", "label", "source"}``."""
    return [{"text": e.text, "choices": list(families), "label": e.label, "source": e.source} for e in items]
