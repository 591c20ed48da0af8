"""The complement redraw (``pmp.complement=redraw``): a fresh secret draw for the weights outside the mask.

Every ``pmp.redraw_interval`` steps each parameter tensor's complement entries are replaced by

    Q(u),   u ~ U(0, 1),

where ``Q`` is the empirical quantile function of the SIGNED values ``w`` of that tensor's masked-in
(trained) entries at that moment: ``Q(u) = sorted(w_trained)[floor(u * n)]``, the inverse of their
empirical CDF, i.e. a draw with replacement from the trained values. The complement then follows the
trained entries' distribution, sign included, so neither ``w`` nor ``|w|`` tells the two apart. (A
magnitude draw with a random sign would not do: trained RMSNorm weights sit near +1, so every negative
norm weight would name a complement entry.) Masked-in entries are not touched.

The randomness is secret: each draw comes from a CPU ``torch.Generator`` seeded by
``sha256("pmp-redraw", secret W0 seed, step, canonical tensor name, the shard's global blocks)``, so a
resumed run redraws exactly as the uninterrupted one, replicated copies of a tensor (norms across TP,
the tied embedding on two PP stages, every DP replica) draw identically, and nothing of the seed is
logged. Without the seed the draw cannot be reproduced.

What holds under tensor parallelism: ``Q`` is taken over the LOCAL shard's trained entries, and the
stream is keyed by the shard's place in the global tensor. The redraw is therefore deterministic for a
given layout (same TP degree, same result on every run and resume); another TP degree gives another,
equally distributed, draw. A shard with no trained entries (mask all False there) or no complement (all
True) is left as it is. Padded vocabulary rows are neither trained nor complement: they stay as they are.
"""

from __future__ import annotations

import hashlib

import torch


def draw_seed(secret: int, step: int, name: str, dim: int, blocks) -> int:
    """A 63-bit generator seed for one shard's redraw at ``step``. ``blocks``: the shard's
    ``(local_start, global_start, length)`` along ``dim`` (``ShardInfo.blocks``); only the global part
    keys the stream, so every replica of a shard gets the same one."""
    where = ",".join(f"{g}+{n}" for _, g, n in blocks)
    digest = hashlib.sha256(f"pmp-redraw:{secret}:{step}:{name}:{dim}:{where}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def redraw_(values: torch.Tensor, trained: torch.Tensor, complement: torch.Tensor,
            generator: torch.Generator) -> int:
    """Overwrite ``values[complement]`` in place with ``Q(u)`` (module docstring), ``Q`` from the signed
    ``values[trained]``; ``generator`` is a CPU generator. Returns the number of entries redrawn (0, and
    nothing changed, when ``trained`` or ``complement`` is empty)."""
    num = int(complement.sum())
    pool = values[trained].sort().values  # [n] ascending: the empirical quantile function
    n = pool.numel()
    if num == 0 or n == 0:
        return 0
    u = torch.rand(num, generator=generator, dtype=torch.float64)  # 53 bits: every index reachable
    index = (u * n).long().clamp_(max=n - 1).to(pool.device)
    values.masked_scatter_(complement, pool[index])
    return num
