"""Stage-I options in one process, without torch.distributed: the per-tensor quota equals a plain
``torch.sort`` top-k of each tensor (ties by index) on sharded-looking layouts with padding, permuted
blocks, uncounted replicas and deliberate ties; the tensor types of the density statistics; the Stage-I
learning rate, betas and the defaults that keep the reference's behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from pmp_megatron.model.params import EMBEDDING, ShardInfo

PAD = 1e30  # padded entries hold huge scores: selecting one would show


def reference_per_tensor(full: dict[str, torch.Tensor], rho: float) -> dict[str, torch.Tensor]:
    """Each tensor's top-floor(rho * n) of |score|, equal values kept in row-major index order."""
    out = {}
    for name, t in full.items():
        flat = t.detach().float().abs().reshape(-1)
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[torch.sort(flat, descending=True, stable=True).indices[:math.floor(rho * flat.numel())]] = True
        out[name] = keep.view(t.shape)
    return out


def _layout(gen, name):
    """A random global tensor and a local shard holding all of it in permuted blocks with padding gaps."""
    ndim = int(torch.randint(1, 4, (1,), generator=gen))
    gshape = tuple(int(s) for s in torch.randint(1, 8, (ndim,), generator=gen))
    dim = int(torch.randint(ndim, (1,), generator=gen))
    size = gshape[dim]
    cuts = sorted({0, size, *(int(c) for c in torch.randint(1, size + 1, (2,), generator=gen))})
    pieces = list(zip(cuts, cuts[1:], strict=False))
    pieces = [pieces[i] for i in torch.randperm(len(pieces), generator=gen).tolist()]
    blocks, pos = [], 0
    for a, b in pieces:
        pos += int(torch.randint(0, 3, (1,), generator=gen))
        blocks.append((pos, a, b - a))
        pos += b - a
    lshape = list(gshape)
    lshape[dim] = pos + int(torch.randint(0, 2, (1,), generator=gen))
    return tuple(lshape), ShardInfo(name, gshape, dim, tuple(blocks), counted=True)


def _case(seed):
    """name -> (local scores, info), the global scores, and an uncounted replica of one tensor."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.0, 1e-3, 0.5, 0.5, 2.0])
    entries, full = {}, {}
    for j in range(int(torch.randint(2, 6, (1,), generator=gen))):
        name = f"p{int(torch.randint(100, (1,), generator=gen)):02d}.{j}"
        lshape, info = _layout(gen, name)
        g = levels[torch.randint(len(levels), info.global_shape, generator=gen)]
        g = torch.where(torch.rand(info.global_shape, generator=gen) < 0.2, torch.randn(info.global_shape,
                                                                                          generator=gen), -g)
        local = torch.full(lshape, PAD)
        for lo, gl in info.local_slices():
            local[lo] = g[gl]
        entries[name], full[name] = (local, info), g
    return entries, full


@pytest.mark.parametrize("digits", [None, ((3, 4, 4, 4, 4, 4, 8), 2)], ids=["default_digits", "small_digits"])
def test_per_tensor_quota_equals_sorted_reference(digits):
    from pmp_megatron.pmp import select

    saved = select._TENSOR_VALUE_DIGITS, select._TENSOR_INDEX_DIGIT_BITS
    if digits:
        select._TENSOR_VALUE_DIGITS, select._TENSOR_INDEX_DIGIT_BITS = digits
    try:
        splits = 0
        for seed in range(30):
            entries, full = _case(seed)
            for rho in (0.1, 0.5, 0.77, 1.0):
                masks, stats = select.per_tensor_topk_masks(entries, rho)
                ref = reference_per_tensor(full, rho)
                for name, (local, info) in entries.items():
                    assert not masks[name][~info.real(local.shape)].any(), "padded entry kept"
                    got = torch.zeros(info.global_shape, dtype=torch.bool)
                    for lo, gl in info.local_slices():
                        got[gl] = masks[name][lo]
                    assert torch.equal(got, ref[name]), (seed, rho, name)
                    assert int(got.sum()) == stats[name].k == math.floor(rho * full[name].numel())
                    splits += stats[name].num_tied_kept < stats[name].num_tied
        assert splits > 10  # the tie rule is exercised
    finally:
        select._TENSOR_VALUE_DIGITS, select._TENSOR_INDEX_DIGIT_BITS = saved


def test_per_tensor_replica_gets_the_owners_mask():
    from pmp_megatron.pmp.select import per_tensor_topk_masks

    entries, full = _case(3)
    name, (local, info) = next(iter(entries.items()))
    replica = ShardInfo(info.name, info.global_shape, info.dim, info.blocks, counted=False)
    masks, _ = per_tensor_topk_masks(dict(entries, copy=(local.clone(), replica)), 0.5)
    assert torch.equal(masks["copy"], masks[name])
    alone, _ = per_tensor_topk_masks(entries, 0.5)  # the uncounted copy changes no quota
    assert all(torch.equal(alone[n], masks[n]) for n in entries)


def test_embedding_trainable_masks_all_real_rows_and_ranks_the_rest():
    from pmp_megatron.config import DiscoveryConfig
    from pmp_megatron.pmp.select import global_topk_masks
    from pmp_megatron.train.discovery import select_masks

    gen = torch.Generator().manual_seed(0)
    emb = ShardInfo(EMBEDDING, (5, 3), 0, ((0, 0, 5),), counted=True)
    other = ShardInfo("w", (4, 6), 0, ((0, 0, 4),), counted=True)
    scores = {EMBEDDING: (torch.randn(8, 3, generator=gen) * 100, emb),  # 3 padded rows
              "w": (torch.randn(4, 6, generator=gen), other)}
    for quota in ("global", "per_tensor"):
        d = DiscoveryConfig(embedding="trainable", quota=quota)
        masks, _ = select_masks(scores, 0.25, d)
        assert masks[EMBEDDING][:5].all() and not masks[EMBEDDING][5:].any()
        assert int(masks["w"].sum()) == 6  # floor(0.25 * 24): the embedding took none of the quota
        alone, _ = global_topk_masks({"w": scores["w"]}, 0.25)
        assert torch.equal(masks["w"], alone["w"])
    masked, _ = select_masks(scores, 0.25, DiscoveryConfig())
    assert int(masked[EMBEDDING].sum()) + int(masked["w"].sum()) == math.floor(0.25 * 39)


def test_tensor_types_cover_the_models_names():
    from pmp_megatron.train.discovery import TENSOR_TYPES, tensor_type

    expected = {
        "embedding.word_embeddings.weight": "embedding",
        "output_layer.weight": "output_layer",
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": "norm",
        "decoder.layers.0.self_attention.linear_qkv.weight": "attn_qkv",
        "decoder.layers.0.self_attention.linear_qkv.bias": "attn_qkv",
        "decoder.layers.3.self_attention.linear_proj.weight": "attn_proj",
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": "norm",
        "decoder.layers.0.mlp.linear_fc1.weight": "mlp_fc1",
        "decoder.layers.11.mlp.linear_fc2.weight": "mlp_fc2",
        "decoder.final_layernorm.weight": "norm",
    }
    assert {n: tensor_type(n) for n in expected} == expected
    assert set(expected.values()) < set(TENSOR_TYPES)


def test_stage1_lr_warmup_and_betas():
    from pmp_megatron.config import Config
    from pmp_megatron.train.discovery import stage1_config, stage1_lr

    cfg = Config()
    d = cfg.pmp.discovery
    d.lr = 1e-3
    assert [stage1_lr(d, t) for t in range(3)] == [1e-3] * 3  # no warm-up: today's constant rate
    d.warmup_steps = 4
    assert [stage1_lr(d, t) for t in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    s = stage1_config(cfg)
    assert (s.optim.adam_beta1, s.optim.adam_beta2) == (cfg.optim.adam_beta1, cfg.optim.adam_beta2)
    d.adam_beta1, d.adam_beta2 = 0.8, 0.999
    s = stage1_config(cfg)
    assert (s.optim.adam_beta1, s.optim.adam_beta2) == (0.8, 0.999)
    assert (cfg.optim.adam_beta1, cfg.optim.adam_beta2) == (0.9, 0.95)  # Stage II keeps its own
