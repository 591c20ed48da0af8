"""One attack cell, two engines: the HF runner in one process and the megatron-core engine (suite ``engine:
megatron``) at TP2 and at PP2 (four one-row micro-batches per step there) give the same task-loss curve,
training losses and scores, for a keyless attacker (dense) and the owner's key (PMP, frozen complement),
under AdamW (cosine schedule with warmup) and SGD (momentum, L2 decay, linear schedule); the keyed megatron
run leaves every complement entry of the release bit-identical while the masked-in entries move.

The release is the debug model (vocabulary 500, padded to 512 on the megatron side: the padded logits must
not enter the loss or the argmax); the tasks are an LM task (token accuracy) and the synthetic copy task
(exact match, labels on part of each row: the per-token loss must weight micro-batches by their tokens)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from pmp_megatron.testing import spawn

pytestmark = pytest.mark.dist
RTOL = 1e-4
SUITE = {
    "name": "parity",
    "tasks": [{"source": "builtin:prose_heldout", "max_docs": 12, "max_chars": 4000},
              {"kind": "synthetic", "source": "copy", "length": 4, "num_train": 64, "num_eval": 12}],
    "pretraining_eval": {"source": "builtin:prose", "max_docs": 6, "max_chars": 2000},
    "seq_length": 32, "eval_blocks": 6, "eval_batch_size": 4, "eval_every": 2, "seeds": [0],
    "attackers": ["unauthorized", "authorized"], "precision": "fp32",
    "adversaries": [{"method": "full", "optimizer": "adamw", "lr": 3.0e-3, "weight_decay": 0.1, "steps": 4,
                     "batch_size": 4, "schedule": "cosine", "warmup_steps": 1},
                    {"method": "full", "optimizer": "sgd", "lr": 0.3, "weight_decay": 0.01, "steps": 4,
                     "batch_size": 4, "schedule": "linear"}],
}
LAYOUTS = {"tp2": ({"tensor_model_parallel_size": 2}, 2),
           "pp2": ({"pipeline_model_parallel_size": 2, "micro_batch_size": 1}, 2)}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A PMP-like debug-model release (masked-in entries moved, complement 0.9 * W0), its key, and the
    suite YAMLs of both engines."""
    from pmp_megatron.testing import write_debug_release

    tmp = tmp_path_factory.mktemp("engine")
    out = write_debug_release(tmp)
    (tmp / "hf.yaml").write_text(yaml.safe_dump(SUITE))
    for name, (layout, _) in LAYOUTS.items():
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump({**SUITE, "engine": "megatron", "megatron": layout}))
    return {"tmp": tmp, **out}


_STATES: dict = {}


def _keep_state(cell, state):
    _STATES[(cell.attacker, cell.task.name, cell.adversary.optimizer)] = state


def _records(path) -> dict:
    return {(r["attacker"], r["task"], r["adv_optimizer"]): r for r in map(json.loads, open(path))}


def _megatron(suite, model, key, out):
    """In a spawned rank: the suite on the megatron engine; the records and trained weights (rank 0)."""
    from pmp_megatron.attack import megatron_engine, runner
    from pmp_megatron.attack.run import prepare

    runner.set_trained_state_hook(_keep_state)
    cells, ctx = prepare(suite, model, mask=key)
    assert megatron_engine.run_cells(cells, ctx, out) == 0
    if not megatron_engine.is_main():
        return None
    return _records(out), dict(_STATES)


@pytest.fixture(scope="module")
def hf(release):
    from pmp_megatron.attack import execute, runner
    from pmp_megatron.attack.run import prepare

    runner.set_trained_state_hook(_keep_state)
    try:
        cells, ctx = prepare(str(release["tmp"] / "hf.yaml"), release["model"], mask=release["key"],
                             device="cpu")
        out = release["tmp"] / "hf.jsonl"
        execute.run_cells(cells, ctx, out)
    finally:
        runner.set_trained_state_hook(None)
    return _records(out), dict(_STATES)


def _close(a, b, what):
    assert math.isclose(a, b, rel_tol=RTOL), f"{what}: {a} vs {b}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_cells_follow_the_hf_cells(layout, release, hf):
    tmp = release["tmp"]
    world = LAYOUTS[layout][1]
    results = spawn(_megatron, world, str(tmp / f"{layout}.yaml"), release["model"], release["key"],
                    str(tmp / f"{layout}.jsonl"))
    records, states = results[0]
    hf_records, hf_states = hf
    assert records.keys() == hf_records.keys() and len(records) == 8
    for key, ref in hf_records.items():
        rec = records[key]
        assert rec.keys() == ref.keys(), key  # the same record, read by report / stats unchanged
        assert rec["id"] != ref["id"]  # the engine enters megatron cells' ids
        assert rec["device"].startswith(f"megatron tp{2 if layout == 'tp2' else 1}")
        assert [s for s, _ in rec["curve"]] == [s for s, _ in ref["curve"]] == [0, 2, 4]
        for (_, a), (_, b) in zip(rec["curve"], ref["curve"], strict=True):
            _close(a, b, f"{layout} {key} task-loss curve")
        for name in ("train_loss_first", "train_loss_last", "pretrain_loss_before", "pretrain_loss_after"):
            _close(rec[name], ref[name], f"{layout} {key} {name}")
        assert rec["score_curve"] == ref["score_curve"], key
        assert rec["trainable_fraction"] == ref["trainable_fraction"]
        assert rec["mask_density"] == ref["mask_density"]
        if key[1] == "prose_heldout":  # (4 steps do not teach the copy task)
            assert ref["curve"][-1][1] < ref["curve"][0][1] - 0.3, f"{key}: the attack must learn something"
    masks, released = release["masks"], release["weights"]
    for task, optimizer in [(t, o) for t in ("prose_heldout", "copy") for o in ("adamw", "sgd")]:
        keyed, dense = states[("authorized", task, optimizer)], states[("unauthorized", task, optimizer)]
        assert keyed.keys() == released.keys()
        for name, w in released.items():
            complement = ~masks[name]
            assert torch.equal(keyed[name][complement], w[complement]), f"{layout} {task}: {name} complement"
            torch.testing.assert_close(keyed[name], hf_states[("authorized", task, optimizer)][name], rtol=0,
                                       atol=1e-4)
        moved = sum(int((keyed[n] != w)[masks[n]].sum()) for n, w in released.items())
        assert moved > 0.5 * sum(int(m.sum()) for m in masks.values())
        assert all(not torch.equal(dense[n], w) for n, w in released.items())
