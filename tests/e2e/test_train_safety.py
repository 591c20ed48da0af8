"""The training side of key and data safety, through ``Trainer.run`` on the debug model (synthetic batches):

- W0's seed is SECRET by default: drawn from OS entropy on rank 0, shared by every rank, W0 generated from
  it, kept in the checkpoints' common state only (config.yaml says null; metrics, logs and tensorboard
  never hold it); a resumed run keeps it. A given int is public and logged as such.
- A resumed run whose model.* / pmp.* settings or seed differ from its checkpoint's is refused with ONE
  ValueError naming the fields, before it writes anything (the run dir stays byte-identical);
  ``checkpoint.allow_changes`` lets a named field change on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pmp_megatron.testing import spawn

PMP = ["pmp.mode=pmp", "pmp.rho=0.5", "pmp.projection=true", "pmp.projection_interval=2",
       "pmp.discovery.max_steps=2", "pmp.discovery.lr=1e-3"]
BASE = ["model.seed=null", "train.train_steps=2", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.eval_interval=0", "optim.lr=1e-3", "checkpoint.save_interval=2", "logging.log_interval=1"]


def _train(run_dir, overrides, world):
    """``Trainer.run``; (exit code, this rank's W0 seed, whether secret, log lines)."""
    import logging

    from pmp_megatron import mcore
    from pmp_megatron.testing import capture_log_messages, debug_config, synthetic_batches
    from pmp_megatron.train.trainer import Trainer

    lines = capture_log_messages(logging.DEBUG)
    cfg = debug_config([*BASE, f"checkpoint.dir={run_dir}", *overrides], world)

    def source(split, consumed):
        step = consumed // cfg.train.global_batch_size
        while True:
            step += 1
            batch = synthetic_batches(cfg, cfg.num_microbatches(world) * mcore.dp_size(),
                                      cfg.train.micro_batch_size, seed=step)
            yield batch[mcore.dp_rank()::mcore.dp_size()]

    trainer = Trainer(cfg, batches=source)
    code = trainer.run()
    return code, cfg.model.seed, trainer.seed_secret, lines


def _common(run_dir, iteration):
    from pmp_megatron.train import checkpoint

    return checkpoint.read_common(run_dir, iteration)


def _w0_embedding(run_dir):
    from pmp_megatron import mcore

    mcore.init_distributed()
    tensors = mcore.dist_checkpointing.load_plain_tensors(str(Path(run_dir) / "iter_0000000"))
    return tensors["embedding.word_embeddings.weight"]


def _files(run_dir) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in Path(run_dir).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    """A PMP run at TP=2 with the default (secret) seed and tensorboard on."""
    run_dir = tmp_path_factory.mktemp("secret")
    out = spawn(_train, 2, str(run_dir), [*PMP, "parallel.tensor_model_parallel_size=2",
                                         f"logging.tensorboard_dir={run_dir / 'tb'}"], 2)
    assert [o[0] for o in out] == [0, 0]
    return run_dir, out


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dense")
    assert spawn(_train, 1, str(run_dir), [], 1)[0][0] == 0
    return run_dir


@pytest.mark.e2e
def test_secret_seed_is_shared_and_kept_only_in_the_checkpoint(secret_run):
    import torch

    from pmp_megatron.config import load_config
    from pmp_megatron.model.w0 import w0_tensor

    run_dir, out = secret_run
    seeds = {o[1] for o in out}
    assert len(seeds) == 1 and all(o[2] for o in out)  # one seed on every rank, secret
    seed = seeds.pop()
    assert isinstance(seed, int) and seed.bit_length() > 64  # 128 random bits
    for it in (0, 2):
        common = _common(run_dir, it)
        assert common["config"]["model"]["seed"] == seed and common["w0_seed_secret"] is True
    assert load_config(run_dir / "config.yaml").model.seed is None
    # W0 is generated from that seed, exactly as from a public one.
    w0 = spawn(_w0_embedding, 1, str(run_dir))[0]
    assert torch.equal(w0[:500], w0_tensor("embedding.word_embeddings.weight", (500, 64), seed, 0.02))
    # Nowhere in the run dir but the checkpoints' own state, and never in a log line.
    spellings = [str(seed).encode(), f"{seed:x}".encode(), f"{seed:X}".encode()]
    outside = {p: data for p, data in _files(run_dir).items()
               if not p.relative_to(run_dir).parts[0].startswith("iter_")}
    assert any("tb" in p.parts for p in outside) and (run_dir / "metrics.jsonl") in outside
    for path, data in outside.items():
        assert not any(s in data for s in spellings), path
    logs = "\n".join(line for o in out for line in o[3])
    assert "secret" in logs and not any(s.decode() in logs for s in spellings)


@pytest.mark.e2e
def test_resumed_secret_run_keeps_its_seed(secret_run, tmp_path):
    import shutil

    from pmp_megatron.config import load_config

    src, out = secret_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    code, seed, secret, _ = spawn(_train, 1, str(run_dir), [*PMP, "train.train_steps=4"], 1)[0]
    assert (code, seed, secret) == (0, out[0][1], True)
    assert _common(run_dir, 4)["config"]["model"]["seed"] == seed and _common(run_dir, 4)["w0_seed_secret"]
    assert load_config(run_dir / "config.yaml").model.seed is None


@pytest.mark.e2e
def test_public_seed_is_said_to_be_public(tmp_path):
    from pmp_megatron.config import load_config

    code, seed, secret, logs = spawn(_train, 1, str(tmp_path), ["model.seed=42"], 1)[0]
    assert (code, seed, secret) == (0, 42, False)
    assert _common(tmp_path, 2)["w0_seed_secret"] is False
    assert load_config(tmp_path / "config.yaml").model.seed == 42
    assert any("model.seed=42 is PUBLIC" in line for line in logs)


@pytest.mark.e2e
@pytest.mark.parametrize("change,expected", [
    (["pmp.rho=0.1"], [r"pmp\.rho \(0\.5 -> 0\.1\)", "pmp.rho cannot change"]),
    (["pmp.mode=dense"], [r"pmp\.mode \('pmp' -> 'dense'\)", "train the complement"]),
    (["pmp.projection_interval=5", "pmp.complement=frozen"],
     [r"pmp\.projection_interval \(2 -> 5\)", r"pmp\.complement \('decay' -> 'frozen'\)",
      r"checkpoint\.allow_changes=\[pmp\.complement,pmp\.projection_interval\]"]),
    (["model.seed=7"], [r"model\.seed \(<secret> -> 7\)"]),
    (["model.hidden_size=128", "model.ffn_hidden_size=352"], [r"model\.hidden_size \(64 -> 128\)"]),
], ids=["rho", "dense", "two-fields", "seed", "shape"])
def test_changed_settings_are_refused_before_writing(secret_run, tmp_path, change, expected):
    import re
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(secret_run[0], run_dir)
    before = _files(run_dir)
    with pytest.raises(RuntimeError, match="ValueError: cannot resume") as err:
        spawn(_train, 1, str(run_dir), [*PMP, "train.train_steps=4", *change], 1)
    for pattern in expected:
        assert re.search(pattern, str(err.value)), pattern
    assert "<secret>" in str(err.value) or "model.seed" not in str(err.value)
    assert _files(run_dir) == before  # no config.yaml rewrite, no metrics, no checkpoint


@pytest.mark.e2e
def test_dense_checkpoint_resumed_in_pmp_mode_is_refused(dense_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(dense_run, run_dir)
    before = _files(run_dir)
    with pytest.raises(RuntimeError, match=r"pmp\.mode \('dense' -> 'pmp'\).*dense run"):
        spawn(_train, 1, str(run_dir), [*PMP, "train.train_steps=4"], 1)
    assert _files(run_dir) == before


@pytest.mark.e2e
def test_allow_changes_lets_a_named_field_change(secret_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(secret_run[0], run_dir)
    change = ["pmp.projection_interval=3", "checkpoint.allow_changes=[pmp.projection_interval]"]
    code, _, _, logs = spawn(_train, 1, str(run_dir), [*PMP, "train.train_steps=4", *change], 1)[0]
    assert code == 0
    assert any("pmp.projection_interval changed on purpose" in line and "2 -> 3" in line for line in logs)
    assert _common(run_dir, 4)["config"]["pmp"]["projection_interval"] == 3
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "train"][-2:] == [3, 4]
