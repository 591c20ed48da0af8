"""Checkpoint integrity: the manifest holds a sha256 of every file, so a same-size change (flipped floats
in a tensor file, overwritten header bytes) is caught by ``verify`` with the file named, and the trainer
resumes from the previous checkpoint instead of training on (or crashing in) the damaged one; an older
manifest without hashes still loads, and a load that fails anyway falls back too; ``latest`` chooses the
resume point (a manual rollback); a full disk during a save raises ENOSPC naming the folder and leaves the
previous checkpoint and ``latest`` untouched. One process each (spawned: the checkpoints are
dist_checkpointing's), dense debug model."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from pmp_megatron.testing import capture_log_messages, spawn

STEPS = 4
OVERRIDES = ["train.train_steps=4", "train.micro_batch_size=2", "train.global_batch_size=4",
             "train.eval_interval=0", "optim.lr=1e-3", "checkpoint.save_interval=2", "checkpoint.keep_last=0",
             "logging.log_interval=1"]


def _trainer(run_dir):
    from pmp_megatron.testing import debug_config, synthetic_batches
    from pmp_megatron.train.trainer import Trainer

    cfg = debug_config([*OVERRIDES, f"checkpoint.dir={run_dir}"], 1)

    def source(split, consumed):
        step = consumed // cfg.train.global_batch_size
        while True:
            step += 1
            yield synthetic_batches(cfg, cfg.num_microbatches(1), cfg.train.micro_batch_size, seed=step)

    return Trainer(cfg, batches=source)


def _run(run_dir):
    """Train (or resume) to STEPS; (iteration resumed from, exit code, log lines)."""
    logs = capture_log_messages()
    trainer = _trainer(run_dir)
    trainer.setup()
    state = trainer.build()
    first = state.iteration
    return first, trainer.train(state), logs


def _save_full_disk(run_dir, how):
    """A save of iteration 6 while dist_checkpointing reports a full disk (as ``how`` wraps it)."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from pmp_megatron import mcore
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.testing import init_debug_parallel
    from pmp_megatron.train import checkpoint

    cfg = init_debug_parallel(OVERRIDES, 1)
    chunks = build_model(cfg)
    full = OSError(errno.ENOSPC, "No space left on device")

    def failing_save(state, folder):
        Path(folder, "__0_0.distcp").write_bytes(b"partial")
        if how == "chained":
            raise RuntimeError("write failed") from full
        if how == "dcp":
            raise CheckpointException("save", {0: _wrap_exception(full)})
        raise RuntimeError("writer process: [Errno 28] No space left on device")

    mcore.dist_checkpointing.save = failing_save
    try:
        checkpoint.save(run_dir, 6, chunks, None, cfg, {})
    except OSError as e:
        return e.errno, str(e), e.filename
    return None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    first, code, _ = spawn(_run, 1, str(run_dir))[0]
    assert (first, code) == (0, 0)
    return run_dir


def _copy(trained, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    return run_dir


def _losses(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def _tensor_file(folder: Path) -> Path:
    return max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _flip_floats(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 12] = bytes(b ^ 0x40 for b in data[mid:mid + 12])  # 3 floats, same size
    path.write_bytes(bytes(data))


def test_manifest_has_a_sha256_of_every_file(trained):
    from pmp_megatron.train import checkpoint

    folder = trained / "iter_0000004"
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    assert manifest["sha256"].keys() == manifest["files"].keys()
    assert {p.name for p in folder.iterdir()} == set(manifest["files"]) | {checkpoint.MANIFEST}
    for name, digest in manifest["sha256"].items():
        assert checkpoint.file_sha256(folder / name) == digest


def test_same_size_flip_in_a_tensor_file_falls_back(trained, tmp_path, caplog):
    from pmp_megatron.train import checkpoint

    run_dir = _copy(trained, tmp_path)
    victim = _tensor_file(run_dir / "iter_0000004")
    _flip_floats(victim)
    with pytest.raises(checkpoint.CheckpointError, match=victim.name):
        checkpoint.verify(run_dir / "iter_0000004")
    assert checkpoint.latest_valid(run_dir) == 2
    assert victim.name in caplog.text
    first, code, logs = spawn(_run, 1, str(run_dir))[0]
    assert (first, code) == (2, 0)
    assert any(victim.name in line for line in logs)
    assert _losses(run_dir) == _losses(trained)  # steps 3 and 4 retrained from 2, exactly


@pytest.mark.parametrize("target", [".metadata", "distcp"])
def test_overwritten_header_bytes_fall_back(trained, tmp_path, target):
    from pmp_megatron.train import checkpoint

    run_dir = _copy(trained, tmp_path)
    folder = run_dir / "iter_0000004"
    victim = folder / target if target == ".metadata" else _tensor_file(folder)
    data = victim.read_bytes()
    victim.write_bytes(b"\xde\xad\xbe\xef" + data[4:])
    with pytest.raises(checkpoint.CheckpointError, match=victim.name):
        checkpoint.verify(folder)
    first, code, logs = spawn(_run, 1, str(run_dir))[0]
    assert (first, code) == (2, 0)
    assert any(victim.name in line for line in logs)


@pytest.mark.parametrize("target", [".metadata", "distcp"])
def test_old_manifest_without_hashes_loads_and_a_failing_load_falls_back(trained, tmp_path, target):
    from pmp_megatron.train import checkpoint

    run_dir = _copy(trained, tmp_path)
    for it in (2, 4):  # as written before content hashes
        path = checkpoint.iter_dir(run_dir, it) / checkpoint.MANIFEST
        manifest = json.loads(path.read_text())
        del manifest["sha256"]
        path.write_text(json.dumps(manifest))
    folder = run_dir / "iter_0000004"
    victim = folder / target if target == ".metadata" else _tensor_file(folder)
    victim.write_bytes(b"\xde\xad\xbe\xef" + victim.read_bytes()[4:])
    checkpoint.verify(folder)  # sizes match: only reading it can tell
    first, code, logs = spawn(_run, 1, str(run_dir))[0]
    assert (first, code) == (2, 0)
    assert any("no content hashes" in line for line in logs)
    assert any("could not" in line and "iter_0000004" in line for line in logs)


def test_latest_chooses_the_resume_point(trained, tmp_path):
    from pmp_megatron.train import checkpoint

    run_dir = _copy(trained, tmp_path)
    (run_dir / "latest").write_text("2\n")  # a manual rollback
    assert checkpoint.latest_valid(run_dir) == 2
    first, code, _ = spawn(_run, 1, str(run_dir))[0]
    assert (first, code) == (2, 0)
    assert (run_dir / "latest").read_text().strip() == "4"
    assert _losses(run_dir) == _losses(trained)
    checkpoint.verify(run_dir / "iter_0000004")  # saved again over the old one


def test_damaged_checkpoints_are_never_restarted_over(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    for it in (2, 4):
        _flip_floats(_tensor_file(run_dir / f"iter_{it:07d}"))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match=r"none at or below 'latest' \(4\) verifies"):
        spawn(_run, 1, str(run_dir))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("how", ["chained", "dcp", "message"])
def test_full_disk_during_save_keeps_the_previous_checkpoint(trained, tmp_path, how):
    run_dir = _copy(trained, tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, message, filename = spawn(_save_full_disk, 1, str(run_dir), how)[0]
    assert code == errno.ENOSPC
    assert "iter_0000006" in message and filename == str(run_dir / "iter_0000006")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # no partial left
