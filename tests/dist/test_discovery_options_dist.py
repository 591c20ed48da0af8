"""Stage-I options on the debug model, against single-process references: the accumulated and EMA
scores equal sums / EMAs of the per-step gradients of one process (and at TP2 x PP2), per-tensor quotas
are exact at TP2, ``batch: micro`` trains on exactly one micro-batch per DP rank, ``embedding:
trainable`` keeps every real embedding row, the warm-up and betas reach the optimizer, and a resumed
accumulated / EMA Stage I equals an uninterrupted one bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from pmp_megatron.model.params import EMBEDDING
from pmp_megatron.testing import spawn

RHO = 0.3
BASE = ["pmp.mode=pmp", f"pmp.rho={RHO}", "pmp.discovery.lr=1e-3", "pmp.discovery.patience=100"]
TP2_PP2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]


def _batches(cfg, step):
    """This DP rank's share of 4 micro-batches of 2 sequences (seeded by the step)."""
    from pmp_megatron import mcore
    from pmp_megatron.testing import synthetic_batches

    return synthetic_batches(cfg, 4, 2, seed=step)[mcore.dp_rank()::mcore.dp_size()]


def _gather(local, infos):
    from pmp_megatron.model.params import gather_full

    return gather_full({n: (t, infos[n]) for n, t in local.items()})


def _plain(history):
    """History records without timings, NaN (the first step's IoU) as None so records compare equal."""
    return [{k: None if v != v else v for k, v in r.items() if k != "seconds"} for r in history]


def _discover(overrides, world, runs):
    """``runs``: a list of extra overrides; one Stage I per entry (fresh W0 each time). Returns, per run,
    the gathered masks and scores and the history (without timings)."""
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import shard_infos
    from pmp_megatron.testing import init_debug_parallel
    from pmp_megatron.train.discovery import discover

    out = []
    for extra in runs:
        cfg = init_debug_parallel([*BASE, *overrides, *extra], world)
        result = discover(cfg, lambda step, cfg=cfg: _batches(cfg, step), return_scores=True)
        layout = shard_infos(build_model(cfg, init_w0=False), cfg.model.vocab_size)
        infos = {n: i for n, (_, i) in layout.items()}
        out.append(dict(masks=_gather(result.masks, infos),
                        scores=_gather(result.scores, infos) if result.scores else None,
                        history=_plain(result.history)))
    return out


def _reference_grads(steps, micro=False, extra=()):
    """One process: the dense Stage-I steps, recording each step's reduced gradient (before clipping)
    and loss; ``micro``: only the first micro-batch of each step."""
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import gather_full, shard_infos
    from pmp_megatron.testing import init_debug_parallel
    from pmp_megatron.train.discovery import stage1_config
    from pmp_megatron.train.optimizer import build_optimizer
    from pmp_megatron.train.step import train_step, wrap_ddp

    cfg = init_debug_parallel([*BASE, *extra], 1)
    d, scfg = cfg.pmp.discovery, stage1_config(cfg)
    model = wrap_ddp(build_model(scfg), scfg)
    optimizer = build_optimizer(model, scfg, lr=d.lr, weight_decay=0.0, clip_grad=d.clip_grad)
    entries = shard_infos(model, cfg.model.vocab_size)
    grads, losses = [], []
    for step in range(steps):
        batch = _batches(cfg, step)[:1] if micro else _batches(cfg, step)

        def record():
            grads.append(gather_full({n: (p.main_grad.clone(), i) for n, (p, i) in entries.items()}))

        losses.append(train_step(model, optimizer, batch, scfg, after_backward=record).loss)
    return grads, losses


def reference_topk(full: dict[str, torch.Tensor], rho: float) -> dict[str, torch.Tensor]:
    """Global top-floor(rho * N) of |score| in (name, index) order, ties to the lower index."""
    names = sorted(full)
    flat = torch.cat([full[n].float().abs().reshape(-1) for n in names])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:math.floor(rho * flat.numel())]] = True
    parts = keep.split([full[n].numel() for n in names])
    return {n: part.view(full[n].shape) for n, part in zip(names, parts, strict=True)}


def accumulate(grads):
    out = {n: torch.zeros_like(g) for n, g in grads[0].items()}
    for g in grads:
        for n in out:
            out[n] = out[n] + g[n].abs()
    return out


def ema(grads, beta):
    out = {n: torch.zeros_like(g) for n, g in grads[0].items()}
    for g in grads:
        for n in out:
            out[n] = out[n] * beta + (1 - beta) * g[n] * g[n]
    return out


def _iou(a, b):
    return sum(int((a[n] & b[n]).sum()) for n in a) / sum(int((a[n] | b[n]).sum()) for n in a)


@pytest.fixture(scope="module")
def reference():
    """Per-step gradients and losses of 3 global-batch steps and 2 micro-batch steps, in one process."""
    return spawn(_reference_grads, 1, 3)[0], spawn(_reference_grads, 1, 2, True)[0]


@pytest.fixture(scope="module")
def single(reference):
    """Stage I in one process: accumulated, ema, and micro-batch accumulated."""
    runs = [["pmp.discovery.max_steps=3", "pmp.discovery.score=accumulated"],
            ["pmp.discovery.max_steps=3", "pmp.discovery.score=ema", "pmp.discovery.ema_beta=0.9"],
            ["pmp.discovery.max_steps=2", "pmp.discovery.score=accumulated", "pmp.discovery.batch=micro"]]
    return spawn(_discover, 1, [], 1, runs)[0]


@pytest.mark.dist
def test_accumulated_score_is_the_sum_of_step_gradients(reference, single):
    (grads, _), _ = reference
    acc = single[0]
    ref = accumulate(grads)
    for n in ref:
        assert torch.equal(acc["scores"][n], ref[n]), n  # one process: bit for bit
    ref_masks = reference_topk(ref, RHO)
    assert all(torch.equal(acc["masks"][n], ref_masks[n]) for n in ref)
    # the last step's mask is not the last gradient's: the running sum is what was ranked
    assert _iou(reference_topk(grads[-1], RHO), acc["masks"]) < 0.95


@pytest.mark.dist
def test_ema_score(reference, single):
    (grads, _), _ = reference
    ref = ema(grads, 0.9)
    got = single[1]["scores"]
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=0)
    assert _iou(single[1]["masks"], reference_topk(ref, RHO)) > 0.999


@pytest.mark.dist
def test_micro_batch_mode_trains_on_one_micro_batch(reference, single):
    (grads, losses), (micro_grads, micro_losses) = reference
    run = single[2]
    assert [r["loss"] for r in run["history"]] == micro_losses  # exactly the first micro-batch's loss
    assert micro_losses[0] != losses[0]
    ref = accumulate(micro_grads)
    assert all(torch.equal(run["scores"][n], ref[n]) for n in ref)
    assert not torch.allclose(ref[EMBEDDING], accumulate(grads[:2])[EMBEDDING])


def _micro_dp2():
    """DP 2, batch micro: each rank's first micro-batch (global micro-batches 0 and 1)."""
    return _discover([], 2, [["pmp.discovery.max_steps=1", "pmp.discovery.batch=micro",
                              "pmp.discovery.score=accumulated"]])[0]


def _one_batch_of_four():
    """One process: the step on micro-batches 0 and 1 of step 0 concatenated (4 sequences)."""
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import gather_full, shard_infos
    from pmp_megatron.testing import init_debug_parallel
    from pmp_megatron.train.discovery import stage1_config
    from pmp_megatron.train.optimizer import build_optimizer
    from pmp_megatron.train.step import train_step, wrap_ddp

    cfg = init_debug_parallel(BASE, 1)
    scfg = stage1_config(cfg)
    model = wrap_ddp(build_model(scfg), scfg)
    optimizer = build_optimizer(model, scfg, lr=1e-3, weight_decay=0.0)
    two = _batches(cfg, 0)[:2]
    batch = [{k: torch.cat([two[0][k], two[1][k]]) for k in two[0]}]
    entries = shard_infos(model, cfg.model.vocab_size)
    got = {}

    def record():
        got.update(gather_full({n: (p.main_grad.abs(), i) for n, (p, i) in entries.items()}))

    loss = train_step(model, optimizer, batch, scfg, after_backward=record).loss
    return got, loss


@pytest.mark.dist
def test_micro_batch_mode_at_dp2_is_one_micro_batch_per_rank():
    run = spawn(_micro_dp2, 2)[0]
    ref, loss = spawn(_one_batch_of_four, 1)[0]
    assert run["history"][0]["loss"] == pytest.approx(loss, rel=1e-6)
    for n in ref:
        torch.testing.assert_close(run["scores"][n], ref[n], rtol=1e-4, atol=1e-7)


@pytest.mark.dist
def test_tp2_pp2_scores_and_quotas_match_one_process(reference):
    (grads, _), _ = reference
    runs = [["pmp.discovery.max_steps=3", "pmp.discovery.score=accumulated"],
            ["pmp.discovery.max_steps=3", "pmp.discovery.score=ema", "pmp.discovery.ema_beta=0.9",
             "pmp.discovery.quota=per_tensor", "pmp.discovery.embedding=trainable"]]
    acc, per_tensor = spawn(_discover, 4, TP2_PP2, 4, runs)[0]
    ref = accumulate(grads)
    for n in ref:
        torch.testing.assert_close(acc["scores"][n], ref[n], rtol=1e-3, atol=1e-6)
    assert _iou(acc["masks"], reference_topk(ref, RHO)) > 0.999
    num_params = sum(m.numel() for m in ref.values())
    assert sum(int(m.sum()) for m in acc["masks"].values()) == math.floor(RHO * num_params)
    ref_ema = ema(grads, 0.9)
    for n in ref_ema:
        torch.testing.assert_close(per_tensor["scores"][n], ref_ema[n], rtol=1e-3, atol=1e-10)
    masks = per_tensor["masks"]
    assert masks[EMBEDDING].all()  # the gathered (real) rows: all trainable
    for n, m in masks.items():
        if n != EMBEDDING:
            assert int(m.sum()) == math.floor(RHO * m.numel()), n  # exactly per tensor
    last = per_tensor["history"][-1]
    assert last["embedding_row_coverage"] == 1.0 and last["density_embedding"] == 1.0
    assert last["density_mlp_fc1"] == pytest.approx(RHO, abs=1e-3)


def _per_tensor_tp2(seed):
    """TP2: per-tensor quotas of tied random scores drawn per global tensor on the debug model's shards
    (padded vocabulary rows hold huge scores, replicated norms are given on both ranks)."""
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import gather_full, shard_infos
    from pmp_megatron.pmp.select import per_tensor_topk_masks
    from pmp_megatron.testing import init_debug_parallel

    cfg = init_debug_parallel(["parallel.tensor_model_parallel_size=2"], 2)
    entries = shard_infos(build_model(cfg, init_w0=False), cfg.model.vocab_size)
    levels = torch.tensor([0.0, 0.5, 0.5, 1.0, 2.0])
    full, local = {}, {}
    for i, (name, (param, info)) in enumerate(sorted(entries.items())):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        full[name] = levels[torch.randint(len(levels), info.global_shape, generator=gen)]
        t = torch.full(param.shape, 1e30)
        for lo, gl in info.local_slices():
            t[lo] = full[name][gl]
        local[name] = (t, info)
    masks, stats = per_tensor_topk_masks(local, RHO)
    for name, (t, info) in local.items():
        assert not masks[name][~info.real(t.shape)].any()
    return full, gather_full({n: (masks[n], i) for n, (_, i) in local.items()}), stats


@pytest.mark.dist
def test_per_tensor_quota_is_exact_at_tp2():
    (full, got, stats), (_, got1, stats1) = spawn(_per_tensor_tp2, 2, 0)
    assert stats == stats1 and got.keys() == got1.keys()
    split = 0
    for name, scores in full.items():
        n = scores.numel()
        keep = torch.zeros(n, dtype=torch.bool)
        order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
        keep[order[:math.floor(RHO * n)]] = True
        assert torch.equal(got[name], keep.view(scores.shape)), name
        assert torch.equal(got1[name], got[name])
        split += stats[name].num_tied_kept < stats[name].num_tied
    assert split > len(full) // 2  # most tensors' ties had to be split by index


def _resume(root, score):
    """TP2: an uninterrupted 5-step Stage I saving at steps 2 and 4, then one resumed from step 2."""
    from pathlib import Path

    from pmp_megatron.testing import init_debug_parallel
    from pmp_megatron.train import checkpoint
    from pmp_megatron.train.discovery import discover
    from pmp_megatron.train.resume import Start

    cfg = init_debug_parallel([*BASE, "parallel.tensor_model_parallel_size=2", "pmp.discovery.max_steps=5",
                               "pmp.discovery.save_interval=2", f"pmp.discovery.score={score}"], 2)
    root = Path(root)

    def batches(step):
        return _batches(cfg, step)

    whole = discover(cfg, batches, root=root, return_scores=True)
    assert checkpoint.complete_iterations(root) == [4, 2]
    start = Start(root, 2, checkpoint.read_common(root, 2))
    resumed = discover(cfg, batches, root=root, resume=start, return_scores=True)
    same_masks = all(torch.equal(whole.masks[n], resumed.masks[n]) for n in whole.masks)
    same_scores = all(torch.equal(whole.scores[n], resumed.scores[n]) for n in whole.scores)
    same_history = _plain(whole.history) == _plain(resumed.history)
    return same_masks, same_scores, same_history, resumed.steps


@pytest.mark.dist
@pytest.mark.parametrize("score", ["accumulated", "ema"])
def test_resumed_running_score_equals_uninterrupted(tmp_path, score):
    results = spawn(_resume, 2, str(tmp_path / "stage1"), score)
    assert results == [(True, True, True, 5)] * 2


def _warmup_and_betas():
    """One process: the optimizer Stage I builds, its betas and the lr of each of its steps."""
    from pmp_megatron.testing import init_debug_parallel
    from pmp_megatron.train import discovery

    cfg = init_debug_parallel([*BASE, "pmp.discovery.max_steps=3", "pmp.discovery.warmup_steps=4",
                               "pmp.discovery.adam_beta1=0.8", "pmp.discovery.adam_beta2=0.999"], 1)
    seen = {"lr": []}
    build = discovery.build_optimizer

    def spy(model, scfg, **kw):
        optimizer = build(model, scfg, **kw)
        seen["betas"] = {tuple(g["betas"]) for g in optimizer.param_groups}
        step = optimizer.step

        def step_and_record():
            seen["lr"].append({float(g["lr"]) for g in optimizer.param_groups})
            return step()

        optimizer.step = step_and_record
        return optimizer

    discovery.build_optimizer = spy
    from pmp_megatron.testing import capture_log_messages

    lines = capture_log_messages()
    result = discovery.discover(cfg, lambda s: _batches(cfg, s))
    stage1 = [line for line in lines if line.startswith("stage I step")]
    return seen, [r["lr"] for r in result.history], stage1, sorted(result.history[-1])


@pytest.mark.dist
def test_warmup_and_betas_reach_the_optimizer():
    seen, logged, lines, fields = spawn(_warmup_and_betas, 1)[0]
    assert seen["betas"] == {(0.8, 0.999)}
    # the key's structure is in the owner-side record, never in a log line (logs travel)
    assert "embedding_row_coverage" in fields and any(f.startswith("density_") for f in fields)
    assert len(lines) == 3 and not any("density" in line or "embedding" in line for line in lines), lines
    assert seen["lr"] == [{2.5e-4}, {5e-4}, {7.5e-4}]
    assert logged == [2.5e-4, 5e-4, 7.5e-4]


def test_stage1_with_the_distributed_optimizer_gives_the_same_masks_at_tp2_dp2():
    """Stage I under the distributed optimizer (its buffers completed by an all-gather before the ranking,
    the counting split over the DP replicas) against the plain all-reduce: the same masks, losses and IoUs
    at every step (fp32: a reduce-scatter + all-gather of two ranks' gradients is the all-reduce's sum)."""
    tp2 = ["parallel.tensor_model_parallel_size=2", "pmp.discovery.max_steps=3"]
    on = spawn(_discover, 4, [*tp2, "parallel.use_distributed_optimizer=true"], 4, [[]])[0][0]
    off = spawn(_discover, 4, [*tp2, "parallel.use_distributed_optimizer=false"], 4, [[]])[0][0]
    assert on["history"] == off["history"] and len(on["history"]) == 3
    for name, m in off["masks"].items():
        assert torch.equal(on["masks"][name], m), name
