"""Stage I (early-bird discovery) on the debug model gives the same mask at every layout as in one
process, stops on the IoU rule, and the rewind gives W0 bit for bit."""

import pytest
import torch

from pmp_megatron.testing import spawn

RHO = 0.3


def _discover(overrides, world, extra=(), fixed_batch=False):
    from pmp_megatron import mcore
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import gather_full, shard_infos
    from pmp_megatron.testing import init_debug_model, synthetic_batches
    from pmp_megatron.train.discovery import discover

    cfg, w0_chunks = init_debug_model(["pmp.mode=pmp", f"pmp.rho={RHO}", "pmp.discovery.max_steps=3",
                                       "pmp.discovery.lr=1e-3", *extra, *overrides], world)
    infos = shard_infos(w0_chunks, cfg.model.vocab_size)
    w0 = gather_full({n: (p, i) for n, (p, i) in infos.items()})

    def batches(step):
        return synthetic_batches(cfg, 4, 2, seed=0 if fixed_batch else step)[mcore.dp_rank()::mcore.dp_size()]

    result = discover(cfg, batches)
    rewound = build_model(cfg)  # the rewind: a fresh build from the seed
    rew = gather_full({n: (p, i) for n, (p, i) in shard_infos(rewound, cfg.model.vocab_size).items()})
    masks = gather_full({n: (result.masks[n], i) for n, (_, i) in infos.items()})
    return masks, result.history, result.stopped_early, all(torch.equal(rew[n], w0[n]) for n in w0)


def _iou(a, b):
    inter = sum((a[n] & b[n]).sum().item() for n in a)
    union = sum((a[n] | b[n]).sum().item() for n in a)
    return inter / union


@pytest.fixture(scope="module")
def reference():
    return spawn(_discover, 1, [], 1)[0]


@pytest.mark.dist
@pytest.mark.parametrize("overrides,world", [
    (["parallel.tensor_model_parallel_size=2"], 2),
    (["parallel.pipeline_model_parallel_size=2"], 2),
    (["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"], 4),
    ([], 2),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"], 2),
], ids=["tp2", "pp2", "tp2_pp2", "dp2", "pp2_vpp2"])
def test_stage1_masks_match_single_process(reference, overrides, world):
    ref_masks, ref_hist, _, _ = reference
    masks, hist, _, rewound_is_w0 = spawn(_discover, world, overrides, world)[0]
    assert rewound_is_w0
    assert _iou(masks, ref_masks) >= 0.999
    kept = sum(m.sum().item() for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept == int(RHO * total)  # k = floor(rho * #real params), padded rows excluded
    for h, r in zip(hist, ref_hist, strict=True):
        assert h["loss"] == pytest.approx(r["loss"], rel=1e-5)


@pytest.mark.dist
def test_early_bird_stops_when_the_mask_is_stable():
    # lr=0: the weights never move and the batch repeats, so the mask is identical step after step:
    # IoU = 1 from step 2, and with patience 2 discovery stops at step 3 of 50.
    extra = ["pmp.discovery.lr=0.0", "pmp.discovery.max_steps=50", "pmp.discovery.patience=2"]
    masks, hist, stopped, _ = spawn(_discover, 1, [], 1, extra, True)[0]
    assert stopped and len(hist) == 3
    assert hist[1]["iou"] == 1.0 and hist[2]["iou"] == 1.0
