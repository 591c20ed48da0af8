"""Slurm tier: pmp-launch's rendered script on a real local cluster (see conftest.py).

(a) the sbatch script runs 2 ranks (on 2 namespace "hosts") and leaves its run dir and results;
(b) USR2 mid-run -> checkpoint, exit 42, `scontrol requeue`, resume, same final state as no interruption;
(c) a submitit job array with a concurrency cap, results gathered;
(d) the real `pmp-pretrain` on the debug model, when the trainer's CLI exists.
The stand-in trainer (standin_trainer.py) has pmp-pretrain's contract and finishes in seconds.
PMP_TEST_TRAINER="cmd ..." replaces pmp-pretrain in (d), e.g. to try a patched trainer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from pmp_megatron.cli import run
from pmp_megatron.launch import gather, submit_array

pytestmark = pytest.mark.slurm

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "standin_trainer.py"
DEBUG_MODEL = HERE.parents[1] / "configs" / "model" / "debug.yaml"


def expected_value(steps: int, world_size: int) -> float:
    """The stand-in's final state for an uninterrupted run, computed here in float64."""
    value = 0.0
    for step in range(steps):
        value = value * 0.9 + sum(math.sin(0.1 * step + rank) for rank in range(world_size))
    return value


def submit_standin(slurm, run_dir: Path, steps: int, job_name: str) -> str:
    argv = ["--config", str(DEBUG_MODEL), "--nodes", str(len(slurm.nodes)),
            "--gpus-per-node", str(slurm.gpus_per_node), "--ntasks-per-node", str(slurm.tasks_per_node),
            "--partition", "debug", "--job-name", job_name, "--run-dir", str(run_dir),
            "--trainer", f"{sys.executable} {STANDIN}",
            f"train.train_steps={steps}", "optim.lr_warmup_steps=1", "checkpoint.save_interval=5",
            "pmp.rho=0.5"]
    assert run("launch", argv) == 0
    return (run_dir / "jobs.txt").read_text().split()[-1]


def log_text(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.out")))


def read_results(ckpt_dir: Path, world_size: int) -> list[dict]:
    return [json.loads((ckpt_dir / f"result-rank{r}.json").read_text()) for r in range(world_size)]


def test_standin_job_runs_across_nodes(slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_STEP_SECONDS", "0.05")
    run_dir = tmp_path / "run"
    start = time.monotonic()
    job = submit_standin(slurm, run_dir, steps=20, job_name="standin-a")
    slurm.wait_job(job, timeout=90)
    elapsed = time.monotonic() - start

    for name in ("config.yaml", "pretrain.sbatch", "git.txt", "jobs.txt"):
        assert (run_dir / name).is_file(), name
    assert "checkpoint.dir" not in (run_dir / "pretrain.sbatch").read_text()
    world = len(slurm.nodes) * slurm.tasks_per_node
    results = read_results(run_dir / "checkpoints", world)
    assert (run_dir / "checkpoints" / "state.pt").is_file()
    assert [r["world_size"] for r in results] == [world] * world
    assert {r["value"] for r in results} == {expected_value(20, world)}
    assert "trainer exited with code 0" in log_text(run_dir), log_text(run_dir)
    if slurm.netns:  # one rank per namespace "host"; rank 0's host is the rendezvous
        assert [r["node"] for r in results] == ["node1", "node2"]
        assert {r["master_addr"] for r in results} == {"10.213.0.11"}
        assert {r["master_port"] for r in results} == {str(20000 + int(job) % 20000)}
    print(f"{slurm.describe()}; 2-rank job submit->COMPLETED in {elapsed:.1f} s")


def test_preemption_checkpoints_requeues_and_resumes(slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_STEP_SECONDS", "0.1")
    run_dir = tmp_path / "run"
    steps = 40
    start = time.monotonic()
    job = submit_standin(slurm, run_dir, steps=steps, job_name="standin-b")
    progress = run_dir / "checkpoints" / "progress"
    deadline = time.monotonic() + 60
    while not (progress.exists() and progress.read_text().strip() and int(progress.read_text()) >= 8):
        assert time.monotonic() < deadline, f"no progress: {slurm.job_info(job)}\n{log_text(run_dir)}"
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR2", job)  # what --signal=USR2@S does before the time limit
    info = slurm.wait_job(job, timeout=120)
    elapsed = time.monotonic() - start

    log = log_text(run_dir)
    assert int(info["Restarts"]) == 1, info
    assert "asked to be requeued (exit 42)" in log and "restart 1" in log, log
    stopped_at = int((run_dir / "checkpoints" / "preempted-0").read_text())
    assert 8 <= stopped_at < steps
    world = len(slurm.nodes) * slurm.tasks_per_node
    results = read_results(run_dir / "checkpoints", world)
    assert {r["restart_count"] for r in results} == {1}
    assert {r["step"] for r in results} == {steps}
    assert {r["value"] for r in results} == {expected_value(steps, world)}  # == uninterrupted run
    print(f"preempted at step {stopped_at}; submit -> requeue -> COMPLETED in {elapsed:.1f} s")


def test_job_array_with_concurrency_cap(slurm, tmp_path, monkeypatch):
    import standin_trainer  # noqa: F401 - pickled by reference; the jobs import it via PYTHONPATH

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("STANDIN_CELL_SECONDS", "2")
    start = time.monotonic()
    jobs = submit_array(standin_trainer.array_cell, [0, 1, 2, 3], tmp_path / "array", partition="debug",
                        max_parallel=2, timeout_min=5, job_name="pmp-array-test")
    results = gather(jobs, timeout_s=120)
    elapsed = time.monotonic() - start
    assert [r["square"] for r in results] == [0, 1, 4, 9]
    assert sorted(r["array_task"] for r in results) == ["0", "1", "2", "3"]
    events = sorted([(r["start"], 1) for r in results] + [(r["end"], -1) for r in results])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 2, results
    print(f"4-element array, at most {peak} at once, on {sorted({r['node'] for r in results})}, "
          f"{elapsed:.1f} s")


def _pretrain_command() -> str:
    if os.environ.get("PMP_TEST_TRAINER"):
        return os.environ["PMP_TEST_TRAINER"]
    venv_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if shutil.which("pmp-pretrain", path=venv_path):
        return "pmp-pretrain"
    return f"{sys.executable} -m pmp_megatron pretrain"


@pytest.fixture(scope="module")
def debug_data(tmp_path_factory):
    from pmp_megatron.data.prepare import prepare_builtin

    model, prefixes = prepare_builtin(tmp_path_factory.mktemp("data"), 500, domains=("prose",),
                                      max_docs=80, max_chars=4000)
    return model, prefixes[0]


REAL_STEPS = 40


def submit_real(slurm, run_dir: Path, data, job_name: str) -> str:
    tokenizer, prefix = data
    argv = ["--config", str(DEBUG_MODEL), "--nodes", str(len(slurm.nodes)),
            "--gpus-per-node", str(slurm.gpus_per_node), "--ntasks-per-node", str(slurm.tasks_per_node),
            "--partition", "debug", "--job-name", job_name, "--run-dir", str(run_dir),
            "--trainer", _pretrain_command(),
            f"data.data_path=[{prefix}]", f"data.tokenizer_model={tokenizer}", "data.split=90,10,0",
            "model.seed=1234",  # public: the interrupted and uninterrupted runs must share W0
            "pmp.rho=0.5", "pmp.discovery.max_steps=2", f"train.train_steps={REAL_STEPS}",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_interval=1000",
            "optim.lr=1e-3", "optim.lr_warmup_steps=2", "checkpoint.save_interval=1000",
            "logging.log_interval=1"]
    assert run("launch", argv) == 0
    return (run_dir / "jobs.txt").read_text().split()[-1]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the train records (the last record wins: a resumed run rewrites its steps)."""
    path = run_dir / "checkpoints" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r["loss"] for r in records if r["stage"] == "train"}


@pytest.fixture(scope="module")
def real_uninterrupted(slurm_cluster, debug_data, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for key, value in slurm_cluster.env.items():
            mp.setenv(key, value)
        run_dir = tmp_path_factory.mktemp("real") / "run"
        start = time.monotonic()
        job = submit_real(slurm_cluster, run_dir, debug_data, "pmp-debug-a")
        slurm_cluster.wait_job(job, timeout=180)
        return run_dir, time.monotonic() - start


def test_real_pretrain_on_debug_model(real_uninterrupted):
    run_dir, elapsed = real_uninterrupted
    log = log_text(run_dir)
    assert "trainer exited with code 0" in log, log
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, REAL_STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    assert (run_dir / "checkpoints" / "latest").exists()
    print(f"pmp-pretrain on the debug model, 2 ranks, {REAL_STEPS} steps: {elapsed:.1f} s")


def test_real_pretrain_preempted_resumes_exactly(slurm, tmp_path, debug_data, real_uninterrupted):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    job = submit_real(slurm, run_dir, debug_data, "pmp-debug-b")
    deadline = time.monotonic() + 120
    while max(train_losses(run_dir), default=0) < 3:
        assert time.monotonic() < deadline, f"no train step: {slurm.job_info(job)}\n{log_text(run_dir)}"
        assert slurm.job_info(job).get("JobState") in ("PENDING", "RUNNING"), log_text(run_dir)
        time.sleep(0.1)
    slurm.run("scancel", "--signal=USR2", job)
    info = slurm.wait_job(job, timeout=180)
    elapsed = time.monotonic() - start
    log = log_text(run_dir)
    assert int(info["Restarts"]) == 1, log
    assert "asked to be requeued (exit 42)" in log and "restart 1" in log, log
    assert train_losses(run_dir) == train_losses(real_uninterrupted[0])  # bit-identical loss trace
    print(f"pmp-pretrain preempted by USR2, requeued and resumed: {elapsed:.1f} s")


TINY_SUITE = """name: slurm-tiny
tasks:
  - {source: builtin:prose_heldout, max_docs: 6, max_chars: 2000}
pretraining_eval: {source: builtin:prose, max_docs: 6, max_chars: 1000}
seq_length: 32
eval_blocks: 2
eval_batch_size: 2
eval_every: 2
seeds: [0]
attackers: [unauthorized]
adversaries:
  - method: full
    optimizer: [adamw, lion]
    lr: [1.0e-3]
    steps: 2
    batch_size: 2
"""


def tiny_release(tmp_path: Path) -> Path:
    import torch

    from pmp_megatron.config import ModelConfig
    from pmp_megatron.data.corpora import iter_documents
    from pmp_megatron.data.tokenizer import train_tokenizer
    from pmp_megatron.release.recovery import iter_w0
    from pmp_megatron.release.writer import write_release

    tok = tmp_path / "tok.model"
    train_tokenizer(iter_documents("prose", max_docs=40, max_chars=3000), tok, vocab_size=400)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, vocab_size=400, seq_length=64, seed=42, untie_embeddings=True)
    gen = torch.Generator().manual_seed(0)
    weights = {n: t + 0.02 * torch.randn(t.shape, generator=gen) for n, t in iter_w0(cfg)}
    return write_release(weights.items(), tmp_path / "release", cfg, "float32", {"test": "slurm"}, str(tok))


def test_attack_grid_as_job_array(slurm, tmp_path):
    release = tiny_release(tmp_path)
    suite = tmp_path / "suite.yaml"
    suite.write_text(TINY_SUITE)
    out = tmp_path / "results.jsonl"
    slurm_opts = f"partition=debug,time=5,max_concurrent=2,gpus_per_node={slurm.gpus_per_node}"
    start = time.monotonic()
    assert run("attack", ["--suite", str(suite), "--model", str(release), "--out", str(out),
                          "--device", "cpu", "--slurm", slurm_opts, "--log-level", "WARNING"]) == 0
    elapsed = time.monotonic() - start
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and {r["status"] for r in records} == {"ok"}, records
    print(f"attack grid of 2 cells as a Slurm array: {elapsed:.1f} s")


def test_attack_array_task_requeues_itself_on_the_time_limit_signal(slurm, tmp_path):
    """One array task of 3 cells gets Slurm's time-limit signal (what submitit's --signal=USR2@90 sends) while
    running: submitit checkpoints it, it is requeued, and the requeued task runs the cells its shard lacks:
    every cell ends in the results exactly once."""
    from pmp_megatron.attack import execute
    from pmp_megatron.attack.run import prepare

    release = tiny_release(tmp_path)
    suite = tmp_path / "suite.yaml"
    suite.write_text(TINY_SUITE.replace("optimizer: [adamw, lion]", "optimizer: [adamw, lion, sgd]")
                     .replace("steps: 2", "steps: 30"))
    cells, ctx = prepare(str(suite), str(release), device="cpu")
    out = tmp_path / "results.jsonl"
    opts = {"partition": "debug", "time": 5, "cells_per_task": 3, "gpus_per_node": slurm.gpus_per_node}
    jobs = execute.run_cells_slurm(cells, ctx, out, opts, wait=False)
    assert len(jobs) == 1
    job, shard = jobs[0].job_id, tmp_path / "results.jsonl.shards" / "00000.jsonl"
    deadline = time.monotonic() + 300
    while not (shard.is_file() and shard.read_text().strip()):  # the first cell is done: signal mid-task
        assert time.monotonic() < deadline, f"no cell finished: {slurm.log_tail(job)}"
        time.sleep(0.5)
    slurm.run("scancel", "--signal=USR2", job)
    info = slurm.wait_job(job, timeout=600)
    assert int(info.get("Restarts", 0)) >= 1, info
    in_shard = [json.loads(line)["id"] for line in shard.read_text().splitlines()]
    assert sorted(in_shard) == sorted(c.id for c in cells), in_shard  # none ran twice, none is missing
    execute.gather_shards(out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(c.id for c in cells), records
    assert {r["status"] for r in records} == {"ok"}
    logs = "\n".join(p.read_text() for p in (tmp_path / "results.jsonl.slurm").rglob("*.err"))
    assert "timed-out" in logs and "not requeued" not in logs.lower(), logs[-3000:]
