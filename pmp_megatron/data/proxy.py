"""The simulated attacker's data for adversarial Stage II (``pmp.adversarial.proxy``): token rows with a
loss mask, cut into megatron microbatches.

A source is ``synthetic:<copy|reverse|recall>[:length]`` (``data.synthetic``'s train split over the
model's vocabulary: the attacker touches every embedding row), ``builtin:<domain>`` or a JSONL file (text
through the training tokenizer, documents joined with its end-of-document id and cut into blocks). Each
source gives ``num_rows`` rows; rows are right-padded to one width, a multiple of 8 tokens at most
``seq_length``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pmp_megatron.data import corpora, synthetic

SYNTHETIC_PREFIX = "synthetic:"
_ALIGN = 8  # row width multiple (sequence parallelism needs it divisible by the TP size)


@dataclass(frozen=True)
class ProxyRows:
    """``tokens`` ``[n, w + 1]`` (int64) and ``loss_mask`` ``[n, w + 1]`` (bool: True where the token is a
    training target, i.e. its prediction from the previous position is scored)."""

    tokens: torch.Tensor
    loss_mask: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def microbatches(self, rows: torch.Tensor, micro_batch_size: int) -> list[dict]:
        """Rows ``rows`` (indices) as megatron microbatches of ``micro_batch_size``: ``tokens``,
        ``labels``, ``loss_mask``, ``position_ids``, each ``[b, w]``."""
        out = []
        for i in range(0, rows.numel(), micro_batch_size):
            take = rows[i: i + micro_batch_size]
            seq, mask = self.tokens[take], self.loss_mask[take]
            b, w = seq.shape[0], seq.shape[1] - 1
            out.append({"tokens": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous(),
                        "loss_mask": mask[:, 1:].float().contiguous(),
                        "position_ids": torch.arange(w).expand(b, w).contiguous()})
        return out


def load_proxy(sources: list[str], num_rows: int, vocab_size: int, seq_length: int,
               tokenizer=None) -> ProxyRows:
    """``num_rows`` rows of each source (deterministic). ``tokenizer`` (``data.tokenizer.Tokenizer``) is
    needed for text sources only. ValueError naming the source when one cannot give its rows."""
    parts = [_synthetic(s, num_rows, vocab_size) if s.startswith(SYNTHETIC_PREFIX)
             else _text(s, num_rows, seq_length, tokenizer) for s in sources]
    width = max(t.shape[1] for t, _ in parts)
    if width - 1 > seq_length:
        raise ValueError(f"pmp.adversarial.proxy: rows of {width - 1} tokens exceed model.seq_length "
                         f"({seq_length}); shorten the synthetic task")
    width = min(-(-(width - 1) // _ALIGN) * _ALIGN, seq_length) + 1
    tokens = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t, _ in parts])
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for _, m in parts])
    return ProxyRows(tokens, mask)


def _synthetic(source: str, num_rows: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    name, _, length = source[len(SYNTHETIC_PREFIX):].partition(":")
    try:
        task = synthetic.SyntheticTask(name, vocab_size, int(length) if length else 8)
        return synthetic.lm_samples(synthetic.generate(task, "train", num_rows))
    except ValueError as e:
        raise ValueError(f"pmp.adversarial.proxy {source!r}: {e}") from None


def _text(source: str, num_rows: int, seq_length: int, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    if tokenizer is None:
        raise ValueError(f"pmp.adversarial.proxy {source!r} is text: it needs data.tokenizer_model")
    need = num_rows * (seq_length + 1)
    ids: list[int] = []
    try:
        for text in corpora.iter_source(source):
            ids.extend(tokenizer.encode(text))
            ids.append(tokenizer.eod)
            if len(ids) >= need:
                break
    except ValueError as e:
        raise ValueError(f"pmp.adversarial.proxy {source!r}: {e}") from None
    if len(ids) < need:
        raise ValueError(f"pmp.adversarial.proxy {source!r} has {len(ids)} tokens, fewer than "
                         f"pmp.adversarial.proxy_rows ({num_rows}) blocks of {seq_length + 1}")
    tokens = torch.tensor(ids[:need], dtype=torch.long).view(num_rows, seq_length + 1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    return tokens, mask
