"""Adversarial Stage II through ``Trainer.run`` at TP2 (debug model, synthetic batches, a synthetic proxy):
every ``interval``-th step is adversarial and records its simulated attacks in the owner's metrics (not in
log lines); a run stopped after an adversarial step and resumed ends bit-identical to one that was not
stopped (each step's draw is a function of the seed and step, so there is no state to lose)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pmp_megatron.testing import spawn

OVERRIDES = ["pmp.mode=pmp", "pmp.rho=0.5", "pmp.discovery.max_steps=2", "pmp.discovery.lr=1e-3",
             "pmp.complement=frozen", "model.seed=42", "train.micro_batch_size=2",
             "train.global_batch_size=4", "train.eval_interval=0", "optim.lr=1e-3",
             "optim.lr_decay_style=constant", "checkpoint.save_interval=2", "logging.log_interval=1",
             "parallel.tensor_model_parallel_size=2",
             "pmp.adversarial.enabled=true", "pmp.adversarial.interval=2", "pmp.adversarial.inner_steps=2",
             "pmp.adversarial.inner_batch_size=4", "pmp.adversarial.proxy=[synthetic:reverse:4]",
             "pmp.adversarial.proxy_rows=64", "pmp.adversarial.evaluation_tasks=[synthetic:copy:8]"]


def _train(run_dir, steps):
    import logging

    from pmp_megatron import mcore
    from pmp_megatron.testing import capture_log_messages, debug_config, synthetic_batches
    from pmp_megatron.train.trainer import Trainer

    lines = capture_log_messages(logging.DEBUG)
    cfg = debug_config([*OVERRIDES, f"checkpoint.dir={run_dir}", f"train.train_steps={steps}"], 2)

    def source(split, consumed):
        step = consumed // cfg.train.global_batch_size
        while True:
            step += 1
            batch = synthetic_batches(cfg, 2, 2, seed=step)
            yield batch[mcore.dp_rank()::mcore.dp_size()]

    return Trainer(cfg, batches=source).run(), lines


def _load_weights(run_dir, iteration):
    from pmp_megatron import mcore

    mcore.init_distributed()
    return mcore.dist_checkpointing.load_plain_tensors(str(Path(run_dir) / f"iter_{iteration:07d}"))


def _weights(run_dir, iteration):
    """Every tensor of a checkpoint, loaded in a worker (the test process keeps no process group)."""
    return spawn(_load_weights, 1, str(run_dir), iteration)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    whole, parts = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("parts")
    out = spawn(_train, 2, str(whole), 4)
    assert [code for code, _ in out] == [0, 0]
    assert [code for code, _ in spawn(_train, 2, str(parts), 2)] == [0, 0]
    resumed = spawn(_train, 2, str(parts), 4)
    assert [code for code, _ in resumed] == [0, 0]
    return whole, parts, out[0][1] + resumed[0][1]


@pytest.mark.e2e
def test_every_interval_th_step_is_adversarial_and_its_stats_stay_out_of_the_logs(runs):
    whole, _, lines = runs
    records = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["stage"] == "train"}
    assert sorted(train) == [1, 2, 3, 4]
    for step, r in train.items():
        assert ("adversarial_lr" in r) == (step % 2 == 0), step
    for step in (2, 4):
        r = train[step]
        assert 1e-4 <= r["adversarial_lr"] <= 1e-3
        assert 0 < r["adversarial_keyless"] < torch.log(torch.tensor(500.0)).item()  # an entropy, in nats
        assert r["adversarial_key_loss"] > 0
    assert train[2]["adversarial_lr"] != train[4]["adversarial_lr"]
    assert not [x for x in lines if "adversarial" in x and "key" in x]


@pytest.mark.e2e
def test_a_run_resumed_after_an_adversarial_step_ends_bit_identical(runs):
    whole, parts, _ = runs
    a, b = _weights(whole, 4), _weights(parts, 4)
    names = [n for n in a if "optimizer" not in n and torch.is_tensor(a[n])]
    assert any("word_embeddings" in n for n in names)
    for name in names:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(_weights(whole, 2)[names[0]], a[names[0]])  # steps 3-4 changed the weights
