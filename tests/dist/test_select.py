"""The distributed global top-k (pmp_megatron.pmp.select) equals a plain single-process top-k of the
whole model's |score| (ties by global index) at TP / PP / TP x PP / DP layouts and with a tied
embedding, for deliberately tied scores; padded rows are never kept and replicas get identical masks."""

from __future__ import annotations

import math

import pytest
import torch

from pmp_megatron.model.params import EMBEDDING, OUTPUT, ShardInfo
from pmp_megatron.testing import spawn

V, H, FFN, QKV = 50, 8, 12, 24
VOCAB_DIVISIBLE_BY = 32  # 50 -> 64 rows at TP=1 and TP=2
PAD_SCORE = 1e30  # padded rows hold huge scores: selecting one would show
RHOS = (0.1, 0.5, 0.9, 1.0)
SEEDS = (0, 1)
SMALL_DIGITS = ((7, 8, 8, 8), 3)  # several radix passes over values and indices
DROPPED = "decoder.layers.1.mlp.linear_fc2.weight"


# ---------------------------------------------------------------- reference (one process, no shards)

def reference_topk(full_scores: dict[str, torch.Tensor], rho: float) -> dict[str, torch.Tensor]:
    """Global top-floor(rho * N) of |score| over all parameters in name order; ties by lower index."""
    names = sorted(full_scores)
    flat = torch.cat([full_scores[n].detach().float().abs().reshape(-1) for n in names])
    k = math.floor(rho * flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices  # equal values keep index order
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    out, start = {}, 0
    for n in names:
        size = full_scores[n].numel()
        out[n] = keep[start:start + size].view(full_scores[n].shape)
        start += size
    return out


def reference_iou(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return 1.0 if union == 0 else inter / union


def test_reference_tie_rule():
    scores = {"b": torch.tensor([1.0, -2.0, 1.0]), "a": torch.tensor([[1.0, 0.0], [-1.0, 3.0]])}
    got = reference_topk(scores, 4 / 7)  # k = 4: 3, -2, then the first two 1's in (name, index) order
    assert got["a"].tolist() == [[True, False], [True, True]]
    assert got["b"].tolist() == [False, True, False]


# ---------------------------------------------------------------- a fake model and its shards

def model_params(tied: bool, drop: bool = False) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """name -> (global shape, kind, where) of a two-layer Llama-like model; ``where`` is first / last /
    layer index."""
    p = {EMBEDDING: ((V, H), "vocab", "first")}
    for layer in range(2):
        pre = f"decoder.layers.{layer}."
        p[pre + "self_attention.linear_qkv.layer_norm_weight"] = ((H,), "rep", layer)
        p[pre + "self_attention.linear_qkv.weight"] = ((QKV, H), "col", layer)
        p[pre + "self_attention.linear_qkv.bias"] = ((QKV,), "col", layer)
        p[pre + "self_attention.linear_proj.weight"] = ((H, 16), "row", layer)
        p[pre + "mlp.linear_fc1.layer_norm_weight"] = ((H,), "rep", layer)
        p[pre + "mlp.linear_fc1.weight"] = ((2 * FFN, H), "swiglu", layer)
        p[pre + "mlp.linear_fc2.weight"] = ((H, FFN), "row", layer)
    p["decoder.final_layernorm.weight"] = ((H,), "rep", "last")
    if not tied:
        p[OUTPUT] = ((V, H), "vocab", "last")
    if drop:
        del p[DROPPED]
    return p


def shard(name, gshape, kind, tp, r, tied_copy=False) -> tuple[tuple[int, ...], ShardInfo]:
    """(local shape, ShardInfo) of TP rank ``r``, following megatron's layout (see model/params.py)."""
    if kind == "vocab":
        padded = -(-V // (VOCAB_DIVISIBLE_BY * tp)) * VOCAB_DIVISIBLE_BY * tp
        n = padded // tp
        start = r * n
        length = max(0, min(V - start, n))
        blocks = ((0, start, length),) if length else ()
        return (n, *gshape[1:]), ShardInfo(name, gshape, 0, blocks, counted=not tied_copy)
    if kind == "rep":
        return gshape, ShardInfo(name, gshape, 0, ((0, 0, gshape[0]),), counted=r == 0)
    dim = 1 if kind == "row" else 0
    n = gshape[dim] // tp
    local = list(gshape)
    local[dim] = n
    if kind == "swiglu":
        half = n // 2
        blocks = ((0, r * half, half), (half, gshape[0] // 2 + r * half, half))
    else:
        blocks = ((0, r * n, n),)
    return tuple(local), ShardInfo(name, gshape, dim, blocks, counted=True)


def on_stage(where, pp: int, stage: int) -> bool:
    if where == "first":
        return stage == 0
    if where == "last":
        return stage == pp - 1
    return where * pp // 2 == stage  # two layers over pp stages


def make_scores(seed: int, tied: bool, drop: bool = False) -> dict[str, torch.Tensor]:
    """Global scores with deliberate ties: a few quantised levels (many exact +-0), some noise."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.0, 0.0, 0.0, 1e-3, 0.5, 0.5, 1.0, 2.0])
    out = {}
    for name, (shape, _, _) in sorted(model_params(tied, drop).items()):
        v = levels[torch.randint(len(levels), shape, generator=gen)]
        v = v * (torch.randint(2, shape, generator=gen) * 2 - 1)  # signs, -0.0 included
        noisy = torch.rand(shape, generator=gen) < 0.15
        out[name] = torch.where(noisy, torch.randn(shape, generator=gen), v)
    return out


def local_entries(full, tp, tp_r, pp, pp_r, tied, drop=False) -> dict[str, tuple[torch.Tensor, ShardInfo]]:
    """This rank's shards of ``full`` (padded rows filled with PAD_SCORE)."""
    out = {}
    for name, (gshape, kind, where) in model_params(tied, drop).items():
        if not on_stage(where, pp, pp_r):
            continue
        lshape, info = shard(name, gshape, kind, tp, tp_r)
        out[name] = (fill(full[name], lshape, info), info)
    if tied and pp > 1 and pp_r == pp - 1:  # the output layer: a copy of the embedding, not counted
        lshape, info = shard(EMBEDDING, (V, H), "vocab", tp, tp_r, tied_copy=True)
        out[EMBEDDING] = (fill(full[EMBEDDING], lshape, info), info)
    return out


def fill(full: torch.Tensor, lshape, info: ShardInfo) -> torch.Tensor:
    local = torch.full(lshape, PAD_SCORE)
    for lo, gl in info.local_slices():
        local[lo] = full[gl]
    return local


def assemble(per_rank: list[tuple[dict, dict]], names) -> dict[str, torch.Tensor]:
    """Global masks from every rank's (masks, infos); replicated copies must agree, padding be False."""
    glob: dict[str, torch.Tensor] = {}
    for masks, infos in per_rank:
        for name, mask in masks.items():
            info = infos[name]
            assert mask.dtype == torch.bool
            assert not mask[~info.real(mask.shape)].any(), f"padded entry kept in {name}"
            buf = glob.setdefault(name, torch.full(info.global_shape, -1, dtype=torch.int8))
            for lo, gl in info.local_slices():
                new = mask[lo].to(torch.int8)
                cur = buf[gl]
                assert ((cur == -1) | (cur == new)).all(), f"replicas of {name} disagree"
                buf[gl] = new
    assert sorted(glob) == sorted(names)
    for name, buf in glob.items():
        assert (buf >= 0).all(), f"{name} not fully covered"
    return {n: b.bool() for n, b in glob.items()}


def check(per_rank_cases: list[list], label: str) -> None:
    """Every case (same order on each rank) equals the reference; stats agree across ranks."""
    for i, case in enumerate(per_rank_cases[0]):
        key, full, iou_value = case["key"], case["full"], case["iou"]
        ref_masks = {rho: reference_topk(full, rho) for rho in RHOS}
        for rho in RHOS:
            got = assemble([(r[i]["masks"][rho], r[i]["infos"]) for r in per_rank_cases], full)
            for name, ref in ref_masks[rho].items():
                assert torch.equal(got[name], ref), f"{label} {key} rho={rho}: mask of {name} differs"
            n = sum(t.numel() for t in full.values())
            stats = case["stats"][rho]
            assert stats.k == math.floor(rho * n) and stats.num_params == n
            assert 0 < stats.num_tied_kept <= stats.num_tied
            assert all(r[i]["stats"][rho] == stats for r in per_rank_cases)
        ref_iou = reference_iou(ref_masks[0.5], ref_masks[0.9])
        assert iou_value == pytest.approx(ref_iou, abs=1e-12)
        assert all(r[i]["iou"] == iou_value for r in per_rank_cases)
    # the test's scores do exercise the tie rule
    assert any(c["stats"][rho].num_tied_kept < c["stats"][rho].num_tied
               for c in per_rank_cases[0] for rho in RHOS)


# ---------------------------------------------------------------- the distributed runs

def _set_digits(digits):
    from pmp_megatron.pmp import select

    select._VALUE_DIGITS, select._INDEX_DIGIT_BITS = digits or ((15, 16), 16)


def _select_cases(tp, pp, tied, tp_r, pp_r, group, drop_on_stage=None, split_group=None):
    from pmp_megatron.pmp.select import global_topk_masks, iou

    cases = []
    for digits in (None, SMALL_DIGITS):
        _set_digits(digits)
        for seed in SEEDS:
            full = make_scores(seed, tied)
            entries = local_entries(full, tp, tp_r, pp, pp_r, tied)
            case = {"key": (digits, seed), "full": full, "masks": {}, "stats": {},
                    "infos": {n: info for n, (_, info) in entries.items()}}
            for rho in RHOS:
                case["masks"][rho], case["stats"][rho] = global_topk_masks(entries, rho, group, split_group)
            case["iou"] = iou(case["masks"][0.5], case["masks"][0.9], entries, group)
            cases.append(case)
    _set_digits(None)
    if drop_on_stage is not None:  # one stage's layout changes: every rank must refresh the layout
        full = make_scores(7, tied, drop=True)
        entries = local_entries(full, tp, tp_r, pp, pp_r, tied, drop=True)
        case = {"key": "dropped", "full": full, "masks": {}, "stats": {},
                "infos": {n: info for n, (_, info) in entries.items()}}
        for rho in RHOS:
            case["masks"][rho], case["stats"][rho] = global_topk_masks(entries, rho, group)
        case["iou"] = iou(case["masks"][0.5], case["masks"][0.9], case["infos"], group)
        cases.append(case)
    return cases


def _plain(tp, pp, dp, tied):
    """Plain gloo processes, rank = tp_r + tp * (pp_r + pp * dp_r); one group per model replica."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tp_r, pp_r, dp_r = rank % tp, rank // tp % pp, rank // (tp * pp)
    group = None  # WORLD when there is a single replica
    if dp > 1:
        groups = [dist.new_group(list(range(d * tp * pp, (d + 1) * tp * pp))) for d in range(dp)]
        group = groups[dp_r]
    return _select_cases(tp, pp, tied, tp_r, pp_r, group, drop_on_stage=pp - 1 if pp > 1 else None)


def _megatron_dp(tp, dp):
    """Megatron's own groups; ``group=None`` must pick the model-parallel group (one replica)."""
    from pmp_megatron import mcore

    mcore.setup_parallel(tp, 1)
    cases = _select_cases(tp, 1, False, mcore.tp_rank(), 0, None)
    return cases


def _megatron_dp_split(tp, dp):
    """TP x DP with megatron's groups, the DP replicas sharing the counting (``split_group``); the
    per-tensor quota's masks and statistics with and without the split ride along as ``per_tensor``."""
    from pmp_megatron import mcore
    from pmp_megatron.pmp.select import per_tensor_topk_masks

    mcore.setup_parallel(tp, 1)
    cases = _select_cases(tp, 1, False, mcore.tp_rank(), 0, None, split_group=mcore.dp_group())
    entries = local_entries(make_scores(3, False), tp, mcore.tp_rank(), 1, 0, False)
    split = per_tensor_topk_masks(entries, 0.5, split_group=mcore.dp_group())
    whole = per_tensor_topk_masks(entries, 0.5)
    cases[0]["per_tensor"] = (split, whole)
    return cases


LAYOUTS = {  # name -> (function, args, world size)
    "tp2": (_plain, (2, 1, 1, False), 2),
    "pp2": (_plain, (1, 2, 1, False), 2),
    "tp2_pp2": (_plain, (2, 2, 1, False), 4),
    "dp2_explicit_groups": (_plain, (1, 1, 2, False), 2),
    "dp2_megatron_groups": (_megatron_dp, (1, 2), 2),
    "tp2_dp2_split_counting": (_megatron_dp_split, (2, 2), 4),
    "tied_pp2": (_plain, (1, 2, 1, True), 2),
    "tied_tp2_pp2": (_plain, (2, 2, 1, True), 4),
}


@pytest.mark.dist
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_distributed_selection_equals_reference(layout):
    fn, args, world = LAYOUTS[layout]
    results = spawn(fn, world, *args)
    if layout == "tp2_dp2_split_counting":  # ranks 0-1: replica 0's TP shards; 2-3: replica 1's
        check(results[:2], layout)
        check(results[2:], layout)
        for r in results:
            (split_masks, split_stats), (whole_masks, whole_stats) = r[0]["per_tensor"]
            assert split_stats == whole_stats
            assert all(torch.equal(m, whole_masks[n]) for n, m in split_masks.items())
    elif layout.startswith("dp2"):  # each replica is a whole model: check each on its own
        for r in results:
            check([r], layout)
        for a, b in zip(results[0], results[1], strict=True):
            for rho in RHOS:
                for name, m in a["masks"][rho].items():
                    assert torch.equal(m, b["masks"][rho][name]), f"DP replicas differ: {name}"
    else:
        check(results, layout)


@pytest.mark.dist
def test_world_of_one_process():
    results = spawn(_plain, 1, 1, 1, 1, False)
    check(results, "world1")


# ---------------------------------------------------------------- single process (no torch.distributed)

@pytest.mark.dist
def test_single_process_padded_model():
    from pmp_megatron.pmp.select import global_topk_masks, iou

    for tied in (False, True):
        full = make_scores(3, tied)
        entries = local_entries(full, 1, 0, 1, 0, tied)
        case = {"key": "single", "full": full, "masks": {}, "stats": {},
                "infos": {n: info for n, (_, info) in entries.items()}}
        for rho in RHOS:
            case["masks"][rho], case["stats"][rho] = global_topk_masks(entries, rho)
        case["iou"] = iou(case["masks"][0.5], case["masks"][0.9], case["infos"])
        check([[case]], "single")


def _random_layout(gen, name):
    """A random global tensor and ONE local shard holding all of it, with its blocks permuted and
    padding gaps in between (exercises the local -> global index map)."""
    ndim = int(torch.randint(1, 4, (1,), generator=gen))
    gshape = tuple(int(s) for s in torch.randint(1, 7, (ndim,), generator=gen))
    dim = int(torch.randint(ndim, (1,), generator=gen))
    size = gshape[dim]
    cuts = sorted({0, size, *(int(c) for c in torch.randint(1, size + 1, (2,), generator=gen))})
    pieces = [(a, b - a) for a, b in zip(cuts, cuts[1:], strict=False)]
    pieces = [pieces[i] for i in torch.randperm(len(pieces), generator=gen).tolist()]
    blocks, pos = [], 0
    for gstart, length in pieces:
        pos += int(torch.randint(0, 3, (1,), generator=gen))  # padding before this block
        blocks.append((pos, gstart, length))
        pos += length
    pos += int(torch.randint(0, 2, (1,), generator=gen))
    lshape = list(gshape)
    lshape[dim] = pos
    return tuple(lshape), ShardInfo(name, gshape, dim, tuple(blocks), counted=True)


@pytest.mark.dist
def test_property_random_ties_many_seeds():
    from pmp_megatron.pmp import select

    try:
        for seed in range(150):
            gen = torch.Generator().manual_seed(seed)
            _set_digits(SMALL_DIGITS if seed % 3 == 0 else None)
            entries, full = {}, {}
            num = int(torch.randint(1, 6, (1,), generator=gen))
            nlevels = int(torch.randint(1, 5, (1,), generator=gen))
            levels = torch.randn(nlevels, generator=gen)
            dtype = (torch.float32, torch.bfloat16, torch.float16)[seed % 3]
            for j in range(num):
                name = f"p{int(torch.randint(100, (1,), generator=gen)):02d}.{j}"
                lshape, info = _random_layout(gen, name)
                g = levels[torch.randint(nlevels, info.global_shape, generator=gen)]
                if seed % 2:
                    g = torch.where(torch.rand(info.global_shape, generator=gen) < 0.3,
                                    torch.randn(info.global_shape, generator=gen), g)
                g = g.to(dtype)
                full[name] = g
                entries[name] = (fill(g.float(), lshape, info).to(dtype), info)
            n = sum(t.numel() for t in full.values())
            rho = float(torch.rand((), generator=gen)) if seed % 5 else (1.0, 0.5, 1 / (n + 1))[seed % 3]
            rho = max(rho, 1e-9)
            masks, stats = select.global_topk_masks(entries, rho)
            ref = reference_topk(full, rho)
            got = assemble([(masks, {n_: i for n_, (_, i) in entries.items()})], full)
            for name in full:
                assert torch.equal(got[name], ref[name]), f"seed {seed}: {name}"
            assert stats.k == math.floor(rho * n) == sum(int(m.sum()) for m in masks.values())
    finally:
        _set_digits(None)


@pytest.mark.dist
def test_edge_cases():
    from pmp_megatron.pmp.select import global_topk_masks, iou

    info = ShardInfo("w", (4,), 0, ((0, 0, 4),), counted=True)
    masks, stats = global_topk_masks({"w": (torch.tensor([1.0, 2.0, 3.0, 4.0]), info)}, 0.2)
    assert stats.k == 0 and stats.threshold == math.inf and not masks["w"].any()
    masks, stats = global_topk_masks({"w": (torch.zeros(4), info)}, 0.5)
    assert masks["w"].tolist() == [True, True, False, False]
    assert (stats.threshold, stats.num_tied, stats.num_tied_kept) == (0.0, 4, 2)
    masks, stats = global_topk_masks({"w": (torch.tensor([-5.0, 1.0, 5.0, 2.0]), info)}, 0.5)
    assert masks["w"].tolist() == [True, False, True, False] and stats.threshold == 5.0
    with pytest.raises(ValueError):
        global_topk_masks({"w": (torch.zeros(4), info)}, 0.0)
    empty = {"w": torch.zeros(4, dtype=torch.bool)}
    assert iou(empty, empty, {"w": info}) == 1.0
