"""wandb on a real PMP run (debug model, one process, Stage I + Stage II, secret W0 seed), offline: the
run's files are written under WANDB_DIR, they hold the loss and learning rate of both stages, and nothing
of the key: neither the W0 seed (in any spelling) nor the mask's structure (Stage I's row coverage and
density per tensor type, which stay in the owner's metrics.jsonl)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pmp_megatron.testing import spawn

pytest.importorskip("wandb")
pytestmark = pytest.mark.e2e

OVERRIDES = ["model.seed=null", "pmp.mode=pmp", "pmp.rho=0.5", "pmp.discovery.max_steps=2",
             "pmp.discovery.lr=1e-3", "train.train_steps=2", "train.micro_batch_size=2",
             "train.global_batch_size=4", "train.eval_interval=0", "optim.lr=1e-3",
             "checkpoint.save_interval=2", "logging.log_interval=1", "logging.wandb_project=pmp-test"]


def _train(run_dir: str, wandb_dir: str):
    """``Trainer.run`` with wandb offline into ``wandb_dir``; (exit code, the secret W0 seed)."""
    os.environ.update(WANDB_DIR=wandb_dir, WANDB_SILENT="true")
    from pmp_megatron.testing import debug_config, synthetic_batches
    from pmp_megatron.train.trainer import Trainer

    cfg = debug_config([*OVERRIDES, f"checkpoint.dir={run_dir}"], 1)

    def source(split, consumed):
        step = consumed // cfg.train.global_batch_size
        while True:
            step += 1
            yield synthetic_batches(cfg, cfg.num_microbatches(1), cfg.train.micro_batch_size, seed=step)

    trainer = Trainer(cfg, batches=source)
    try:
        code = trainer.run()
    finally:
        trainer.close()
    return code, cfg.model.seed


def test_offline_wandb_run_holds_the_metrics_and_no_key(tmp_path):
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    [(code, seed)] = spawn(_train, 1, str(run_dir), str(wandb_dir))
    assert code == 0 and isinstance(seed, int) and seed.bit_length() > 64  # a drawn, secret seed

    [log] = (wandb_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = log.read_bytes()  # protobuf records: keys and JSON values are stored as plain text
    for key in ("discovery/loss", "discovery/lr", "discovery/step", "train/loss", "train/lr", "train/step",
                "train/grad_norm", "pmp-test"):
        assert key.encode() in history, key
    owner_metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "density_embedding" in owner_metrics[0]  # the owner's record has the statistics; wandb must not
    files = [p for p in wandb_dir.rglob("*") if p.is_file()]
    spellings = [str(seed).encode(), f"{seed:x}".encode(), f"{seed:X}".encode()]
    for path in files:
        data = path.read_bytes()
        assert not any(s in data for s in spellings), path
        assert b"density_" not in data and b"embedding_row_coverage" not in data, path
    assert len(files) >= 3, [str(p.relative_to(wandb_dir)) for p in files]
    assert not any(Path(p).name == "config.yaml" for p in files)  # no config: in memory it holds the seed
