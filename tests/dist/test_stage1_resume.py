"""Stage I is preemptible: a preemption signal during Stage-I step 3 (TP=2) checkpoints Stage I under
``run_dir/stage1`` and exits for requeue after that step; the requeued run continues Stage I from there,
and its masks, W0 checkpoint (iteration 0) and Stage II loss trace equal an uninterrupted run's bit for
bit. A crash between the periodic Stage-I checkpoints (``pmp.discovery.save_interval``) resumes from the
last one just as exactly. Runs go through ``Trainer.run`` with a synthetic batch source."""

import json
from pathlib import Path

import pytest
import torch

from pmp_megatron.testing import spawn

WORLD = 2
OVERRIDES = ["parallel.tensor_model_parallel_size=2", "pmp.mode=pmp", "pmp.rho=0.3",
             "pmp.discovery.max_steps=6", "pmp.discovery.patience=100", "pmp.discovery.lr=1e-3",
             "train.train_steps=4", "train.micro_batch_size=2", "train.global_batch_size=4",
             "train.eval_interval=0", "optim.lr=1e-3", "checkpoint.save_interval=2",
             "logging.log_interval=1"]


class Crash(RuntimeError):
    pass


def _train(run_dir, extra=(), signal_at=None, crash_at=None):
    """``Trainer.run`` on synthetic batches (one seed per global step, so any position replays exactly).
    ``signal_at``/``crash_at``: the Stage-I step (1-based) during which rank 0 gets SIGUSR2 / every rank
    raises ``Crash``. Returns the exit code."""
    import os
    import signal

    from pmp_megatron import mcore
    from pmp_megatron.testing import debug_config, synthetic_batches
    from pmp_megatron.train.trainer import Trainer

    cfg = debug_config([*OVERRIDES, f"checkpoint.dir={run_dir}", *extra], WORLD)
    gbs = cfg.train.global_batch_size
    calls = []

    def source(split, consumed):
        calls.append(split)
        stage1 = len(calls) == 1  # the first stream a fresh or Stage-I-resumed run reads is Stage I's

        def stream():
            step = consumed // gbs
            while True:
                step += 1
                if stage1 and step == signal_at and mcore.dp_rank() == 0 and mcore.tp_rank() == 0:
                    os.kill(os.getpid(), signal.SIGUSR2)
                if stage1 and step == crash_at:
                    raise Crash(f"crash during stage I step {step}")
                dp, num_micro = mcore.dp_size(), cfg.num_microbatches(WORLD)
                batch = synthetic_batches(cfg, num_micro * dp, cfg.train.micro_batch_size, seed=step)
                yield batch[mcore.dp_rank()::dp]

        return stream()

    return Trainer(cfg, batches=source).run()


def _w0_checkpoint(run_dir):
    """Every tensor of iteration 0 (W0 and the masks), as saved."""
    from pmp_megatron import mcore

    mcore.init_distributed()
    tensors = mcore.dist_checkpointing.load_plain_tensors(str(Path(run_dir) / "iter_0000000"))
    return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


def _records(run_dir, stage):
    """step -> loss of one stage's metric records (the last record of a step wins)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["stage"] == stage:
            out[r["step"]] = r["loss"]
    return out


def _assert_same_run(run_dir, ref_dir):
    assert not (Path(run_dir) / "stage1").exists()  # removed once iteration 0 is saved
    assert _records(run_dir, "discovery") == _records(ref_dir, "discovery")
    assert _records(run_dir, "train") == _records(ref_dir, "train")  # exact, every Stage II step
    got, ref = spawn(_w0_checkpoint, 1, run_dir)[0], spawn(_w0_checkpoint, 1, ref_dir)[0]
    assert got.keys() == ref.keys() and any(k.startswith("pmp_mask.") for k in ref)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert spawn(_train, WORLD, str(run_dir)) == [0] * WORLD
    assert sorted(_records(run_dir, "discovery")) == list(range(1, 7))
    return run_dir


@pytest.mark.dist
def test_signal_in_stage1_checkpoints_exits_and_resumes_exactly(reference, tmp_path):
    from pmp_megatron.train import checkpoint, signals

    run_dir = tmp_path / "run"
    codes = spawn(_train, WORLD, str(run_dir), (), 3)
    assert codes == [signals.REQUEUE_EXIT_CODE] * WORLD
    assert sorted(_records(run_dir, "discovery")) == [1, 2, 3]  # stopped right after the signalled step
    assert checkpoint.complete_iterations(run_dir / "stage1") == [3]
    assert not (run_dir / "iter_0000000").exists()
    assert spawn(_train, WORLD, str(run_dir)) == [0] * WORLD
    _assert_same_run(run_dir, reference)


@pytest.mark.dist
def test_crash_resumes_from_the_last_periodic_stage1_checkpoint(reference, tmp_path):
    from pmp_megatron.train import checkpoint

    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash during stage I step 5"):
        spawn(_train, WORLD, str(run_dir), ["pmp.discovery.save_interval=2"], None, 5)
    assert checkpoint.complete_iterations(run_dir / "stage1") == [4, 2]
    assert spawn(_train, WORLD, str(run_dir), ["pmp.discovery.save_interval=2"]) == [0] * WORLD
    _assert_same_run(run_dir, reference)
