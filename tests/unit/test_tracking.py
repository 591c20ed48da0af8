"""Trackers (``train/tracking.py``): a configured tracker whose package is missing fails at Trainer setup,
before torch.distributed starts, in one line naming the package and the extra; tensorboard and wandb get the
same scalars, and neither gets the private mask's structure. The real wandb, offline, on a real PMP run:
tests/e2e/test_wandb_offline.py."""

from __future__ import annotations

import sys
import types

import pytest

from pmp_megatron import cli, mcore
from pmp_megatron.config import LoggingConfig
from pmp_megatron.testing import DEBUG_MODEL, debug_config
from pmp_megatron.train import tracking

DISCOVERY = dict(stage="discovery", step=1, loss=5.5, lr=1e-3, iou=float("nan"), threshold=0.01,
                 embedding_row_coverage=0.9, density_embedding=0.5, density_attn_qkv=0.4, seconds=0.2)
TRAIN = [dict(stage="train", step=s, loss=5.0 - s, grad_norm=1.5, lr=1e-3, skipped=False, valid_loss=4.9)
         for s in (1, 2)]


@pytest.mark.parametrize("field, value, words", [
    ("tensorboard_dir", "tb", "logging.tensorboard_dir needs the 'tensorboard' package"),
    ("wandb_project", "pmp", "logging.wandb_project needs the 'wandb' package"),
])
def test_a_missing_tracker_package_is_named_before_any_compute(monkeypatch, tmp_path, capsys, field, value,
                                                               words):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match=words):
        tracking.check(LoggingConfig(**{field: value}))
    tracking.check(LoggingConfig())  # nothing configured, nothing needed

    def no_distributed(*args, **kwargs):
        raise AssertionError("torch.distributed started before the tracker check")

    monkeypatch.setattr(mcore, "init_distributed", no_distributed)
    argv = ["--config", str(DEBUG_MODEL), "pmp.mode=dense", f"checkpoint.dir={tmp_path / 'run'}",
            f"logging.{field}={value}"]
    assert cli.run("pretrain", argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "pip install 'pmp_megatron[" in err
    assert not (tmp_path / "run").exists()


def test_an_empty_wandb_project_is_refused():
    with pytest.raises(ValueError, match="logging.wandb_project must be a project name"):
        debug_config(["logging.wandb_project=' '"])
    with pytest.raises(ValueError, match="logging.wandb_mode"):
        debug_config(["logging.wandb_mode=cloud"])


def test_scalars_leave_out_the_mask_structure():
    assert tracking.scalars(DISCOVERY).keys() == {"discovery/loss", "discovery/lr", "discovery/iou",
                                                  "discovery/threshold", "discovery/seconds"}
    assert tracking.scalars({**TRAIN[0], "note": "text"}) == {
        "train/loss": 4.0, "train/grad_norm": 1.5, "train/lr": 1e-3, "train/skipped": False,
        "train/valid_loss": 4.9}


class _FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.defined, self.finished = kwargs, [], {}, False

    def define_metric(self, pattern, step_metric):
        self.defined[pattern] = step_metric

    def log(self, data):
        self.logged.append(dict(data))

    def finish(self):
        self.finished = True


def test_tensorboard_and_wandb_get_the_same_scalars(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(_FakeRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = LoggingConfig(tensorboard_dir=str(tmp_path / "tb"), wandb_project="pmp")
    trackers = tracking.Trackers(cfg, run_name="run-1")
    trackers.write([DISCOVERY])
    trackers.write(TRAIN)
    trackers.close()

    [run] = runs
    assert run.init["project"] == "pmp" and run.init["mode"] == "offline" and run.init["name"] == "run-1"
    assert "config" not in run.init and run.finished
    assert run.defined == {"discovery/*": "discovery/step", "train/*": "train/step"}
    assert [r.get("discovery/step", r.get("train/step")) for r in run.logged] == [1, 1, 2]
    logged = {(k, r.get("discovery/step", r.get("train/step"))): v for r in run.logged for k, v in r.items()
              if not k.endswith("/step")}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    board = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert board.keys() == logged.keys()
    assert board[("train/loss", 2)] == logged[("train/loss", 2)] == 3.0
    for tag, _ in board:
        assert "density" not in tag and "coverage" not in tag, tag
