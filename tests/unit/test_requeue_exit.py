"""Preemption without Slurm: the requeue marker (``signals.requeue_exit``) and how the rendered
``slurm/pretrain.sbatch`` reads it, and DataLoader workers that outlive the preemption signals.

Under torchrun a trainer's exit 42 reaches the batch script as 1, so the script requeues on a failed step
only when rank 0 left the marker, and removes any marker before the step so an old one never turns a
crash into a requeue. The script runs here as rendered, with stand-ins for srun, scontrol and the trainer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pmp_megatron.launch.sbatch import SlurmOptions, render_sbatch
from pmp_megatron.train import signals

REPO = Path(__file__).resolve().parents[2]


def test_requeue_exit_writes_the_marker_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(signals.MARKER_ENV, raising=False)
    assert signals.requeue_exit(tmp_path, iteration=7) == signals.REQUEUE_EXIT_CODE == 42
    assert (tmp_path / ".requeue").read_text().startswith("iteration 7 time ")
    assert [p.name for p in tmp_path.iterdir()] == [".requeue"]  # no temp file left
    assert signals.requeue_exit(None) == 42  # no checkpoint dir and no launcher: no marker, same exit


def test_requeue_exit_writes_where_the_launcher_asks(tmp_path, monkeypatch):
    wanted = tmp_path / "launcher" / ".requeue"
    wanted.parent.mkdir()
    monkeypatch.setenv(signals.MARKER_ENV, str(wanted))
    assert signals.requeue_exit(tmp_path / "checkpoints", iteration=3) == 42
    assert wanted.read_text().startswith("iteration 3 ")
    assert not (tmp_path / "checkpoints").exists()


def test_only_rank_0_writes_and_every_rank_waits_for_it(tmp_path, monkeypatch):
    monkeypatch.delenv(signals.MARKER_ENV, raising=False)
    barriers = []
    monkeypatch.setattr(signals.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(signals.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(signals.mcore, "barrier", lambda: barriers.append(1))
    assert signals.requeue_exit(tmp_path, iteration=1) == 42
    assert not (tmp_path / ".requeue").exists() and barriers == [1]


# ------------------------------------------------------------------ the sbatch script's side

_FAKES = {
    # srun: drop its own options, run the task command (the real rendezvous module, then the trainer)
    "srun": 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    "scontrol": 'if [[ "$1" == requeue ]]; then echo "$2" >> "$REQUEUES"; exit 0; fi\nexit 1\n',
    "sleep": "exit 0\n",
    "fake-trainer": 'eval "$FAKE_TRAINER"\n',
}

# What the trainer step does, as seen by the batch script.
_TRAINERS = {
    # torchrun: rank 0 saved, wrote the marker (the real function) and exited 42; torchrun exits 1
    "torchrun_preempted": f"{sys.executable} -c 'from pmp_megatron.train.signals import requeue_exit; "
                          "requeue_exit(None, iteration=5)'; exit 1",
    "torchrun_preempted_echo": 'echo "iteration 5" > "$PMP_REQUEUE_MARKER"; exit 1',
    "crash": "exit 1",
    "direct_42": "exit 42",  # srun without torchrun passes the trainer's 42 on
    "done": "exit 0",
}


def run_script(tmp_path: Path, trainer: str, stale_marker: bool = False) -> tuple[subprocess.CompletedProcess,
                                                                                   list[str], Path]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = render_sbatch(SlurmOptions(nodes=1, gpus_per_node=0, ntasks_per_node=1, job_name="t",
                                        trainer="fake-trainer"), run_dir)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in _FAKES.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    marker = run_dir / ".requeue"
    if stale_marker:
        marker.write_text("iteration 3 time 2020-01-01T00:00:00Z\n")
    requeues = tmp_path / "requeues"
    env = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
           "SLURM_LOCALID": "0", "REQUEUES": str(requeues), "FAKE_TRAINER": trainer}
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    done = requeues.read_text().split() if requeues.exists() else []
    return proc, done, marker


@pytest.mark.parametrize("case", ["torchrun_preempted", "torchrun_preempted_echo", "direct_42"])
def test_a_preempted_step_is_requeued(tmp_path, case):
    proc, requeues, marker = run_script(tmp_path, _TRAINERS[case])
    assert proc.returncode == 0 and requeues == ["1234"], proc.stdout + proc.stderr
    assert "asked to be requeued (exit 42)" in proc.stdout
    if case.startswith("torchrun"):
        assert "exited with code 1 after writing the requeue marker: iteration 5" in proc.stdout
    assert not marker.exists()  # the next segment starts clean


@pytest.mark.parametrize("stale_marker", [False, True])
def test_a_crash_is_not_requeued_even_with_an_old_marker(tmp_path, stale_marker):
    proc, requeues, marker = run_script(tmp_path, _TRAINERS["crash"], stale_marker)
    assert proc.returncode == 1 and requeues == [], proc.stdout + proc.stderr
    assert "trainer exited with code 1" in proc.stdout and "requeue marker" not in proc.stdout
    assert not marker.exists()


def test_a_finished_step_exits_0(tmp_path):
    proc, requeues, _ = run_script(tmp_path, _TRAINERS["done"])
    assert proc.returncode == 0 and requeues == [], proc.stdout + proc.stderr
    assert "trainer exited with code 0" in proc.stdout


# ------------------------------------------------------------------ DataLoader workers

_WORKER_PROBE = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    import torch
    from pmp_megatron.data.datasets import build_dataloader

    # the trainer's handlers (train/signals.py install), which a forked worker inherits
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, lambda s, f: print(f"handler {s} ran in {os.getpid()}", flush=True))

    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):  # this worker's pid, SIGUSR2 ignored, SIGTERM blocked
            usr2 = signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
            term = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            t = torch.tensor([os.getpid(), usr2, term])
            return dict(tokens=t, labels=t, loss_mask=t, position_ids=t)

    it = iter(build_dataloader(Probe(), 1, 0, 1, num_workers=1))
    pid, usr2, term = next(it)["tokens"][0].tolist()
    print("worker", pid != os.getpid(), usr2, term, flush=True)
    for sig in ("USR2", "TERM"):  # as Slurm sends them: from another process
        subprocess.run(["kill", f"-{sig}", str(pid)], check=True)
    time.sleep(1)
    print("same worker after the signals", next(it)["tokens"][0, 0].item() == pid, flush=True)
    sys.exit(42)  # the iterator is still alive: exit terminates the worker, and must not hang on it
""")


def test_dataloader_workers_outlive_preemption_signals_and_still_exit(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _WORKER_PROBE], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 42, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["worker True 1 1", "same worker after the signals True"], \
        proc.stdout + proc.stderr
