"""Global exact top-k of |score| over a sharded model, without gathering the scores.

PMP Stage I keeps, at each step, the ``k = floor(rho * N)`` entries of largest ``|score|`` among ALL
``N`` real parameters of the model, ranked together in one list (no per-layer quota). The model is
sharded (TP slices, PP stages, replicated copies), so the selection is a distributed radix select:

1. **Threshold.** ``|score|`` is compared as float32 (other dtypes are converted first: float16 and
   bfloat16 exactly, float64 rounded). Non-negative IEEE-754 floats order like their int32 bit patterns,
   so the sign bit is cleared and the 31-bit pattern is selected digit by digit, high digit first
   (``_VALUE_DIGITS``: 15 + 16 bits). Each pass builds a local int64 histogram of one digit over the
   real, counted entries whose higher digits match the prefix found so far, and all-reduces it (SUM)
   over ``group``. The result is the threshold ``T`` with ``count(|s| > T) < k <= count(|s| >= T)``.
   NaN scores rank above +inf.
2. **Ties.** Entries equal to ``T`` are kept in order of their GLOBAL INDEX: all real parameters of the
   model are ordered by canonical name (Python string order), then by row-major flat index within the
   global (unsharded, unpadded) tensor. A local element maps to its global position through the
   ``ShardInfo`` block that covers it. Exactly ``need = k - count(> T)`` tied entries are kept: those
   with global index ``<= C``, where the cut ``C`` is found by a second radix select over the int64
   global indices of the tied entries only (``_INDEX_DIGIT_BITS`` bits per pass, histograms all-reduced).
   When every tied entry is kept (``need == count(== T)``, the usual case for continuous scores) this
   step is skipped. Global indices are only materialised for the counted tied entries (``nonzero`` of
   ``== T``); the masks then need none, because the global index grows with the position inside a
   block: each block keeps its tied entries up to the position of ``C`` in it.

Counting once: only entries with ``info.counted`` enter the histograms and ``N``; every entry, counted
or not, receives its mask from the same global ``(T, C)`` and its own global indices, so replicated
copies (norms on TP rank > 0, a tied embedding's copy on the last PP stage) get identical masks.
Padded rows (outside every block) are never counted nor selected: their mask is False.

``group`` holds ONE copy of the model (megatron's model-parallel group, TP x PP). DP replicas hold
identical scores and compute identical masks. With ``split_group`` (the data-parallel group) they share the
histogram work: each of its ranks counts a contiguous 1/DP part of every block, and the histograms are
all-reduced over ``split_group`` too; without it each replica counts everything and there is no DP
communication. Either way the masks are the same.

Host syncs: one read of each pass's all-reduced histogram (the digit is chosen on the host). Counting
never reads back: on CUDA digits are scatter-added into the histogram (``torch.bincount`` reads the
largest digit back to size its output), entries outside the prefix go to an overflow bin instead of being
compacted out by boolean indexing (which syncs on the count).

Collectives per selection: 2 all-reduces of int64 histograms (32 K and 64 K bins; the first also
carries ``N``), plus, only when the tie at ``T`` must be split, ``ceil(log2(N) / 16)`` all-reduces of
64 K bins (2 below 2^32 parameters) and, once per model layout, an ``all_gather_object`` of the
parameter names and sizes (cached afterwards; a layout change on any rank is detected through the
first all-reduce, so all ranks refresh together). Scores are read once per pass, entry by entry (no
flattened copy of the model); each pass syncs with the host (histogram digits are chosen on the host).

Per-tensor quotas (``per_tensor_topk_masks``): the same radix select and tie rule run for every parameter
tensor at once, each tensor with its own ``k = floor(rho * n_tensor)``, threshold and cut. The histograms
get one row per tensor of the model (names agreed through the cached layout), so a tensor's TP shards
and replicated copies are ranked together, and the number of collectives does not grow with the number
of tensors; the digits are narrower (8 bits) to keep the rows small. Ties are broken by the index inside
the global tensor, which orders a tensor's entries exactly as the model-wide global index does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pmp_megatron import mcore
from pmp_megatron.model.params import ShardInfo

_VALUE_BITS = 31  # |float32| without the sign bit
_VALUE_DIGITS = (15, 16)  # radix digits over the value bits, high digit first (sum = 31)
_INDEX_DIGIT_BITS = 16  # radix digit width over the global index
_ABS = 0x7FFFFFFF
_COUNT_CHUNK = 1 << 24  # entries per counting op: bounds the transient digit tensors

# group ranks -> (local layout key, (name -> offset), total): the layout at the last collective refresh.
_LAYOUT_CACHE: dict[tuple, tuple] = {}


@dataclass(frozen=True)
class SelectionStats:
    """What one global top-k selection found (identical on every rank of the group)."""

    k: int  # entries kept: floor(rho * num_params)
    num_params: int  # N: real parameters of the model, each counted once
    threshold: float  # T: the smallest kept |score| (as float32); inf when k == 0
    num_tied: int  # real parameters with |score| == T
    num_tied_kept: int  # of those, kept (the ones of smallest global index)


def default_group(group=None):
    """``group`` if given; else megatron's model-parallel group when it exists; else WORLD; else None
    (torch.distributed not initialised: a single process, no communication)."""
    if group is not None:
        return group
    if not dist.is_initialized():
        return None
    if mcore.parallel_state.model_parallel_is_initialized():
        return mcore.model_parallel_group()
    return dist.group.WORLD


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        mcore.all_reduce(t, group=group)
    return t


def _abs_bits(t: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of ``|t|`` as float32 (ordered like the values)."""
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.float()
    return t.view(torch.int32) & _ABS


def _part(flat: torch.Tensor, part: tuple[int, int]) -> torch.Tensor:
    """Part ``rank`` of ``size`` contiguous parts of a flat tensor."""
    rank, size = part
    n = flat.numel()
    return flat[rank * n // size: (rank + 1) * n // size]


def _add_digits(hist: torch.Tensor, view: torch.Tensor, shift: int, width: int, prefix: int | None,
                part: tuple[int, int] = (0, 1)) -> None:
    """``hist`` (``2**width + 1`` bins, the last one overflow) += the counts of digit
    ``(x >> shift) & (2**width - 1)`` over this rank's ``part`` of ``view``, counting only the entries whose
    higher bits ``x >> (shift + width)`` equal ``prefix`` (all when None). No host sync (module docstring)."""
    bins = 1 << width
    flat = _part(view.reshape(-1), part)
    for lo in range(0, flat.numel(), _COUNT_CHUNK):
        x = flat[lo: lo + _COUNT_CHUNK]
        digit = (x >> shift) & (bins - 1)
        if prefix is not None:
            digit = torch.where((x >> (shift + width)) == prefix, digit, bins)
        if digit.is_cuda:
            digit = digit.long()
            hist.scatter_add_(0, digit, torch.ones_like(digit))
        else:
            hist += torch.bincount(digit, minlength=bins + 1)


def _blocks(info: ShardInfo, local: torch.Tensor):
    """(block view of ``local``, block) for each block of ``info``: the real entries, no copies."""
    for (lo, _), block in zip(info.local_slices(), info.blocks, strict=True):
        yield local[lo], block


def _global_index(flat: torch.Tensor, info: ShardInfo, block: tuple[int, int, int], offset: int):
    """Global indices of the entries at row-major positions ``flat`` of one block view."""
    _, global_start, length = block
    dim = info.dim
    inner = math.prod(info.global_shape[dim + 1:])
    base = offset + global_start * inner
    if dim == 0 or math.prod(info.global_shape[:dim]) == 1:
        return flat + base
    span = length * inner
    outer = torch.div(flat, span, rounding_mode="floor")
    return outer * (info.global_shape[dim] * inner) + (flat - outer * span) + base


def _cut_position(cut: int, info: ShardInfo, block: tuple[int, int, int], offset: int, numel: int) -> int:
    """The last row-major position of a block view whose global index is <= ``cut`` (-1 if none).
    The global index grows with the position inside a block, so tied entries are kept up to it."""
    _, global_start, length = block
    dim = info.dim
    inner = math.prod(info.global_shape[dim + 1:])
    q = cut - (offset + global_start * inner)
    if q < 0:
        return -1
    if dim == 0 or math.prod(info.global_shape[:dim]) == 1:
        return min(q, numel - 1)
    span, stride = length * inner, info.global_shape[dim] * inner
    outer, rest = divmod(q, stride)
    return min(outer * span + min(rest, span - 1), numel - 1)


def _group_key(group) -> tuple:
    if group is None:
        return (None,)
    return tuple(dist.get_process_group_ranks(group))


def _layout_key(entries) -> tuple:
    return tuple(sorted((info.name, tuple(info.global_shape)) for _, info in entries.values()))


def _layout(entries, group, refresh: bool) -> tuple[dict[str, int], int]:
    """name -> offset of the parameter's first element in the global index, and the total, over the
    whole model. Collective (``all_gather_object``) when ``refresh``; the same on all ranks."""
    gkey, lkey = _group_key(group), _layout_key(entries)
    cached = _LAYOUT_CACHE.get(gkey)
    if not refresh and cached is not None and cached[0] == lkey:
        return cached[1], cached[2]
    mine = sorted({(info.name, math.prod(info.global_shape)) for _, info in entries.values()})
    everyone = [mine]
    if group is not None and dist.get_world_size(group) > 1:
        everyone = mcore.all_gather_object(mine, group=group)
    sizes: dict[str, int] = {}
    for part in everyone:
        for name, numel in part:
            if sizes.setdefault(name, numel) != numel:
                raise ValueError(f"parameter {name} has global size {numel} on one rank, "
                                 f"{sizes[name]} on another")
    offsets, total = {}, 0
    for name in sorted(sizes):
        offsets[name] = total
        total += sizes[name]
    _LAYOUT_CACHE[gkey] = (lkey, offsets, total)
    return offsets, total


def _device(entries) -> torch.device:
    for t, _ in entries.values():
        return t.device
    return mcore.device()


def _value_threshold(entries, rho, group, device, split_group=None):
    """Radix select over the value bits: (N, k, T bits, count(> T), count(== T), layout miss anywhere)."""
    counted = [(t, info) for t, info in entries.values() if info.counted]
    gkey = _group_key(group)
    cached = _LAYOUT_CACHE.get(gkey)
    miss = int(cached is None or cached[0] != _layout_key(entries))
    part = _split(split_group)
    prefix = prefix_bits = above = 0
    n = k = remaining = 0
    eq = 0
    for p, width in enumerate(_VALUE_DIGITS):
        shift = _VALUE_BITS - prefix_bits - width
        bins = 1 << width
        # [bins] + overflow; the first pass also carries N and the layout miss
        hist = torch.zeros(bins + 1 + (2 if p == 0 else 0), dtype=torch.int64, device=device)
        for t, info in counted:
            for view, _ in _blocks(info, _abs_bits(t)):
                _add_digits(hist[:bins + 1], view, shift, width, prefix if p else None, part)
        if p == 0:
            hist[bins + 1] = sum(info.numel() for _, info in counted) if part[0] == 0 else 0
            hist[bins + 2] = miss
        _all_reduce(hist, group)
        _all_reduce(hist, split_group)
        h = hist.cpu()  # this pass's one host read
        if p == 0:
            n = int(h[bins + 1])
            miss = int(h[bins + 2])
            k = math.floor(rho * n)
            remaining = k
            if k == 0:
                return n, 0, None, 0, 0, miss
        h = h[:bins]
        at_least = h.flip(0).cumsum(0).flip(0)  # count(digit >= d) among candidates
        digit = int((at_least >= remaining).nonzero()[-1])
        eq = int(h[digit])
        above_here = int(at_least[digit]) - eq
        above += above_here
        remaining -= above_here
        prefix = (prefix << width) | digit
        prefix_bits += width
    return n, k, prefix, above, eq, miss


def _split(split_group) -> tuple[int, int]:
    """(this rank's part, number of parts) of the histogram work (``split_group``: module docstring)."""
    if split_group is None or dist.get_world_size(split_group) == 1:
        return 0, 1
    return dist.get_rank(split_group), dist.get_world_size(split_group)


def _tied_indices(entries, threshold: int, offsets):
    """Global indices (int64) of the real, counted entries equal to the threshold bits, per block."""
    out = []
    for t, info in entries.values():
        if not info.counted:
            continue
        bits = _abs_bits(t)
        for view, block in _blocks(info, bits):
            flat = (view == threshold).reshape(-1).nonzero().squeeze(1)
            out.append(_global_index(flat, info, block, offsets[info.name]))
    return out


def _index_cut(entries, threshold: int, need: int, offsets, total: int, group, device) -> int:
    """Radix select over global indices of the tied entries: the cut C such that exactly ``need``
    tied entries have index <= C."""
    cands = _tied_indices(entries, threshold, offsets)
    nbits = max(1, (total - 1).bit_length())
    passes = -(-nbits // _INDEX_DIGIT_BITS)
    widths = [nbits - _INDEX_DIGIT_BITS * (passes - 1)] + [_INDEX_DIGIT_BITS] * (passes - 1)
    prefix = prefix_bits = 0
    remaining = need
    for width in widths:
        shift = nbits - prefix_bits - width
        bins = 1 << width
        hist = torch.zeros(bins + 1, dtype=torch.int64, device=device)
        for c in cands:
            _add_digits(hist, c, shift, width, prefix if prefix_bits else None)
        hist = _all_reduce(hist, group).cpu()[:bins]
        cum = hist.cumsum(0)  # count(digit <= d)
        digit = int((cum >= remaining).nonzero()[0])
        remaining -= int(cum[digit]) - int(hist[digit])
        prefix = (prefix << width) | digit
        prefix_bits += width
    return prefix


def global_topk_masks(entries: dict[str, tuple[torch.Tensor, ShardInfo]], rho: float, group=None,
                      split_group=None) -> tuple[dict[str, torch.Tensor], SelectionStats]:
    """Bool masks (True = kept) of the global exact top-``floor(rho * N)`` of ``|score|``.

    ``entries``: canonical name -> (local score tensor of the local shard's shape, ShardInfo).
    ``group``: the ranks holding one copy of the model (see ``default_group``). Collective over
    ``group``: every rank must call it with its own shards. ``split_group``: the ranks holding replicas of
    these shards with the same scores (the data-parallel group), to share the counting (module
    docstring). Returns masks of the local shapes (padded rows False) and the selection's statistics.
    See the module docstring for the tie rule.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    group = default_group(group)
    device = _device(entries)
    n, k, threshold, above, eq, miss = _value_threshold(entries, rho, group, device, split_group)
    masks = {name: torch.zeros(t.shape, dtype=torch.bool, device=t.device)
             for name, (t, _) in entries.items()}
    if k == 0:
        return masks, SelectionStats(k=0, num_params=n, threshold=math.inf, num_tied=0, num_tied_kept=0)
    need = k - above
    cut, offsets = None, {}
    if need < eq:
        offsets, total = _layout(entries, group, refresh=bool(miss))
        cut = _index_cut(entries, threshold, need, offsets, total, group, device)
    for name, (t, info) in entries.items():
        _fill_mask(masks[name], t, info, threshold, cut, offsets.get(info.name, 0))
    return masks, SelectionStats(k=k, num_params=n, threshold=_bits_value(threshold), num_tied=eq,
                                 num_tied_kept=need)


def _bits_value(bits: int) -> float:
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32).item()


def _fill_mask(mask: torch.Tensor, t: torch.Tensor, info: ShardInfo, threshold: int, cut: int | None,
               offset: int) -> None:
    """Set the real entries of ``mask`` to (|t| > T) or (|t| == T and global index <= C); without a cut
    (``cut`` None) every tied entry is kept. ``offset``: the global index of the tensor's first entry."""
    bits = _abs_bits(t)
    for (view, block), (lo, _) in zip(_blocks(info, bits), info.local_slices(), strict=True):
        if cut is None:
            mask[lo] = view >= threshold
            continue
        last = _cut_position(cut, info, block, offset, view.numel())
        if last < 0 or last >= view.numel() - 1:  # the cut falls outside this block
            mask[lo] = view > threshold if last < 0 else view >= threshold
            continue
        kept = (view > threshold).contiguous().view(-1)
        tied = (view == threshold).reshape(-1)
        kept[:last + 1] |= tied[:last + 1]
        mask[lo] = kept.view(view.shape)


# ---------------------------------------------------------------- per-tensor quotas

_TENSOR_VALUE_DIGITS = (7, 8, 8, 8)  # narrower digits: one histogram row per tensor (sum = 31)
_TENSOR_INDEX_DIGIT_BITS = 8


def _model_layout(entries, group) -> tuple[dict[str, int], int]:
    """``_layout`` refreshed on every rank together when any rank's layout changed (one tiny all-reduce)."""
    cached = _LAYOUT_CACHE.get(_group_key(group))
    miss = torch.tensor([int(cached is None or cached[0] != _layout_key(entries))], dtype=torch.int64,
                        device=_device(entries))
    _all_reduce(miss, group)
    return _layout(entries, group, refresh=bool(miss.item()))


def _row_select(hist: torch.Tensor, remaining: torch.Tensor, from_top: bool) -> torch.Tensor:
    """Per row of a host histogram ``[S, bins]``: the digit holding the ``remaining``-th candidate,
    counting from the largest digit (values) or from the smallest (indices)."""
    if from_top:
        at_least = hist.flip(1).cumsum(1).flip(1)  # count(digit >= d)
        return ((at_least >= remaining[:, None]).sum(1) - 1).clamp(min=0)
    cum = hist.cumsum(1)  # count(digit <= d)
    return (cum < remaining[:, None]).sum(1).clamp(max=hist.shape[1] - 1)


def _tensor_thresholds(counted, ks: torch.Tensor, group, device, split_group=None):
    """Radix select over the value bits, one histogram row per tensor: per row the threshold bits T,
    count(> T) and count(== T). ``counted``: (local tensor, ShardInfo, row) of the counted shards."""
    num_rows = ks.numel()
    prefix = torch.zeros(num_rows, dtype=torch.int64)
    above = torch.zeros(num_rows, dtype=torch.int64)
    remaining, eq, prefix_bits = ks.clone(), None, 0
    for width in _TENSOR_VALUE_DIGITS:
        shift = _VALUE_BITS - prefix_bits - width
        bins = 1 << width
        hist = torch.zeros(num_rows, bins + 1, dtype=torch.int64, device=device)
        for t, info, row in counted:
            for view, _ in _blocks(info, _abs_bits(t)):
                _add_digits(hist[row], view, shift, width, int(prefix[row]) if prefix_bits else None,
                            _split(split_group))
        _all_reduce(hist, group)
        h = _all_reduce(hist, split_group).cpu()[:, :bins]
        digit = _row_select(h, remaining, from_top=True)
        eq = h.gather(1, digit[:, None]).squeeze(1)
        at_least = h.flip(1).cumsum(1).flip(1).gather(1, digit[:, None]).squeeze(1)
        above += at_least - eq
        remaining -= at_least - eq
        prefix = (prefix << width) | digit
        prefix_bits += width
    return prefix, above, eq


def _tensor_index_cuts(tied, need: torch.Tensor, nbits: int, group, device) -> torch.Tensor:
    """Radix select over the in-tensor global indices of tied entries, one row per split tensor: the cut
    C per row such that exactly ``need`` tied entries have index <= C. ``tied``: (row, indices)."""
    passes = -(-nbits // _TENSOR_INDEX_DIGIT_BITS)
    widths = [nbits - _TENSOR_INDEX_DIGIT_BITS * (passes - 1)] + [_TENSOR_INDEX_DIGIT_BITS] * (passes - 1)
    prefix = torch.zeros(need.numel(), dtype=torch.int64)
    remaining, prefix_bits = need.clone(), 0
    for width in widths:
        shift = nbits - prefix_bits - width
        bins = 1 << width
        hist = torch.zeros(need.numel(), bins + 1, dtype=torch.int64, device=device)
        for row, c in tied:
            _add_digits(hist[row], c, shift, width, int(prefix[row]) if prefix_bits else None)
        h = _all_reduce(hist, group).cpu()[:, :bins]
        digit = _row_select(h, remaining, from_top=False)
        remaining -= h.cumsum(1).gather(1, digit[:, None]).squeeze(1) - h.gather(1, digit[:, None]).squeeze(1)
        prefix = (prefix << width) | digit
        prefix_bits += width
    return prefix


def per_tensor_topk_masks(entries: dict[str, tuple[torch.Tensor, ShardInfo]], rho: float, group=None,
                          split_group=None) -> tuple[dict[str, torch.Tensor], dict[str, SelectionStats]]:
    """Bool masks keeping exactly ``floor(rho * n)`` entries of largest ``|score|`` in EACH parameter
    tensor (``n``: its real entries, replicated copies counted once), ties kept in order of the index
    inside the global tensor -- the tie rule of ``global_topk_masks`` applied to one tensor at a time.

    Same arguments and collective contract as ``global_topk_masks``: a tensor's TP shards (and replicated
    copies) are ranked together over ``group``, every tensor of the model at once -- one histogram row per
    tensor -- so the passes do not grow with the number of tensors: 4 all-reduces of ``[tensors, <=256]``
    int64 values, plus a tiny one to agree on the model's layout, plus, only when some tensor's tie at its
    threshold must be split, ``ceil(log2(n_max) / 8)`` of ``[split tensors, <=256]``. Returns the masks
    and, per canonical name, that tensor's selection statistics.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    group = default_group(group)
    device = _device(entries)
    offsets, total = _model_layout(entries, group)
    names = list(offsets)  # every tensor of the model, sorted, on every rank
    sizes = [end - start for start, end in zip(offsets.values(), [*list(offsets.values())[1:], total],
                                               strict=True)]
    rows = {name: i for i, name in enumerate(names)}
    ks = torch.tensor([math.floor(rho * n) for n in sizes], dtype=torch.int64)
    counted = [(t, info, rows[info.name]) for t, info in entries.values() if info.counted]
    prefix, above, eq = _tensor_thresholds(counted, ks, group, device, split_group)
    need = ks - above
    split = [i for i in range(len(names)) if 0 < ks[i] and need[i] < eq[i]]
    cuts: dict[int, int] = {}
    if split:
        split_row = {row: j for j, row in enumerate(split)}
        tied = []
        for t, info, row in counted:
            if row in split_row:
                for view, block in _blocks(info, _abs_bits(t)):
                    flat = (view == int(prefix[row])).reshape(-1).nonzero().squeeze(1)
                    tied.append((split_row[row], _global_index(flat, info, block, 0)))
        nbits = max(1, max(sizes[row] - 1 for row in split).bit_length())
        found = _tensor_index_cuts(tied, need[split], nbits, group, device)
        cuts = {row: int(found[j]) for row, j in split_row.items()}
    masks, stats = {}, {}
    for name, (t, info) in entries.items():
        row = rows[info.name]
        masks[name] = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
        if ks[row] > 0:
            _fill_mask(masks[name], t, info, int(prefix[row]), cuts.get(row), 0)
    for name, row in rows.items():
        k = int(ks[row])
        stats[name] = SelectionStats(
            k=k, num_params=sizes[row], threshold=_bits_value(int(prefix[row])) if k else math.inf,
            num_tied=int(eq[row]) if k else 0, num_tied_kept=int(need[row]) if k else 0)
    return masks, stats


def iou(masks_a: dict[str, torch.Tensor], masks_b: dict[str, torch.Tensor], entries_infos,
        group=None) -> float:
    """Intersection over union of two mask sets over the real, counted entries of the whole model.

    ``entries_infos``: name -> ShardInfo, or name -> (tensor, ShardInfo) as given to
    ``global_topk_masks``. Collective over ``group`` (default as in ``global_topk_masks``): one
    all-reduce of two int64 counts. Two empty masks have IoU 1.
    """
    group = default_group(group)
    device = next(iter(masks_a.values())).device if masks_a else mcore.device()
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    for name, info in entries_infos.items():
        if isinstance(info, tuple):
            info = info[1]
        if not info.counted:
            continue
        a, b = masks_a[name], masks_b[name]
        for lo, _ in info.local_slices():
            counts[0] += torch.count_nonzero(a[lo] & b[lo])
            counts[1] += torch.count_nonzero(a[lo] | b[lo])
    _all_reduce(counts, group)
    inter, union = int(counts[0]), int(counts[1])
    return 1.0 if union == 0 else inter / union
