"""`pmp-pretrain` end to end through the CLI: a PMP run (Stage I + II) at TP=2 x PP=2 whose loss falls;
kill -9 mid-run and resume gives the uninterrupted loss trace exactly; resuming at TP=1 matches to
tolerance; a truncated checkpoint is refused by name and the previous one is used; the mask exports."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pmp_megatron.testing import DEBUG_MODEL

STEPS = 8
TP2PP2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pmp_megatron.data.prepare import prepare_builtin

    model, prefixes = prepare_builtin(tmp_path_factory.mktemp("data"), 500, domains=("prose",),
                                      max_docs=80, max_chars=4000)
    return model, prefixes[0]


def _args(data, run_dir, extra=()):
    # A public W0 seed: the kill-and-resume test compares two separate runs, which must share W0.
    model, prefix = data
    return ["model.seed=42", f"data.data_path=[{prefix}]", f"data.tokenizer_model={model}",
            "data.split=90,10,0",
            "pmp.mode=pmp", "pmp.rho=0.5", "pmp.projection=true", "pmp.projection_interval=3",
            "pmp.projection_radius=20.0", "pmp.discovery.max_steps=4", "pmp.discovery.lr=1e-3",
            f"train.train_steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=8",
            "train.eval_interval=4", "train.eval_steps=1", "optim.lr=2e-3", "optim.lr_warmup_steps=2",
            f"checkpoint.dir={run_dir}", "checkpoint.save_interval=2", "checkpoint.keep_last=3",
            "logging.log_interval=1", *extra]


def _launch(nproc, args):
    from pmp_megatron.mcore import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}",
           "-m", "pmp_megatron", "pretrain", "--config", str(DEBUG_MODEL), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _run(nproc, args, timeout=600):
    proc = _launch(nproc, args)
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return err


def _losses(run_dir):
    """step -> loss of the train records (the last record wins: a resumed run rewrites its steps)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["stage"] == "train":
            out[r["step"]] = r["loss"]
    return out


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_a")
    _run(4, _args(data, run_dir, TP2PP2))
    return run_dir


@pytest.mark.e2e
def test_pmp_run_learns_and_logs(uninterrupted):
    losses = _losses(uninterrupted)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]
    records = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "discovery" and r["step"] == 4 for r in records)
    assert any("valid_loss" in r for r in records)
    assert any("projected_norm" in r or "complement_norm" in r for r in records)
    assert (uninterrupted / "iter_0000000").is_dir()  # W0 + masks, the rewind point, kept
    assert (uninterrupted / "latest").read_text().strip() == str(STEPS)


@pytest.mark.e2e
def test_kill9_and_resume_gives_the_same_trace(data, uninterrupted, tmp_path):
    run_dir = tmp_path / "run_b"
    proc = _launch(4, _args(data, run_dir, TP2PP2))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once step 5 is done (checkpoint 4 exists, 6 not yet)
        if metrics.exists() and 5 in _losses(run_dir):
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "iter_0000008").exists()
    _run(4, _args(data, run_dir, TP2PP2))
    assert _losses(run_dir) == _losses(uninterrupted)  # exact, every step


@pytest.mark.e2e
def test_resume_at_another_layout(data, uninterrupted, tmp_path):
    run_dir = tmp_path / "run_c"
    shutil.copytree(uninterrupted, run_dir)
    for it in (6, 8):  # back to the checkpoint at step 4
        shutil.rmtree(run_dir / f"iter_{it:07d}", ignore_errors=True)
    (run_dir / "metrics.jsonl").unlink()
    _run(1, _args(data, run_dir))
    ref, got = _losses(uninterrupted), _losses(run_dir)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5)


@pytest.mark.e2e
def test_truncated_checkpoint_is_refused_and_the_previous_one_used(uninterrupted, tmp_path, caplog):
    from pmp_megatron.train import checkpoint

    run_dir = tmp_path / "run_d"
    shutil.copytree(uninterrupted, run_dir)
    victim = sorted((run_dir / "iter_0000008").glob("*.distcp"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match=victim.name):
        checkpoint.verify(run_dir / "iter_0000008")
    assert checkpoint.latest_valid(run_dir) == 6
    assert victim.name in caplog.text


@pytest.mark.e2e
def test_export_mask_from_a_tp2_pp2_checkpoint(uninterrupted, tmp_path):
    import stat

    from pmp_megatron.pmp import maskfile

    out = tmp_path / "private" / "mask.safetensors"
    subprocess.run([sys.executable, "-m", "pmp_megatron", "export-mask", "--checkpoint",
                    str(uninterrupted), "--out", str(out)], check=True, capture_output=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    masks, meta = maskfile.load(out)
    assert meta["rho"] == 0.5
    assert "model.layers.0.self_attn.q_proj.weight" in masks and "lm_head.weight" in masks
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(kept / total - 0.5) < 1e-3
    again = subprocess.run([sys.executable, "-m", "pmp_megatron", "export-mask", "--checkpoint",
                            str(uninterrupted), "--out", str(out)], capture_output=True, text=True)
    assert again.returncode != 0 and "--force" in again.stderr


@pytest.mark.e2e
def test_resume_from_the_w0_checkpoint_skips_stage1(data, uninterrupted, tmp_path):
    # A run preempted right after Stage I has only iteration 0 (W0 + masks, no optimizer state yet).
    run_dir = tmp_path / "run_e"
    shutil.copytree(uninterrupted, run_dir)
    for it in (4, 6, 8):
        shutil.rmtree(run_dir / f"iter_{it:07d}", ignore_errors=True)
    (run_dir / "metrics.jsonl").unlink()
    _run(1, _args(data, run_dir))
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any(r["stage"] == "discovery" for r in records)  # the saved masks were used
    ref, got = _losses(uninterrupted), _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5)
