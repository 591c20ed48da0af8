"""The dense-matched control (``train/matched.py``, ``pmp-dense-matched``): on the debug model, a short PMP
run with a SECRET W0 seed, then the search for the dense run whose final validation loss is within 1% of the
PMP run's. Checks: the chosen run's loss is within 1%, it starts from the PMP run's W0 (iteration-0
weights equal), it is dense with the schedule rules (fewer steps, warmup share, as many evaluations), the
secret seed is only in OUT/w0_seed (0600), a rerun trains nothing, and bad input gives one line. The
search policy itself is checked on synthetic loss curves (no training)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pmp_megatron.train.matched import SEED_FILE, SUMMARY, final_valid_loss, match, next_steps


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """match() and checkpoint_config() open a world of one in this process; later tests start without one."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

REPO = Path(__file__).resolve().parents[2]
STEPS, EVAL, WARMUP = 80, 40, 8  # the PMP run: 2 evaluations, so the dense runs' steps are even
SECRET_SEED = 0xA5C3_19E7_4D2B_F086_3E91_C0D7_58A4_B26F  # secret to the run (a seed file), fixed for the test


def _env() -> dict:
    """This process's environment, less the world of one that reading a checkpoint here set up."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1"}


def _pmp_run(work: Path) -> Path:
    from pmp_megatron.data.prepare import prepare_builtin
    from pmp_megatron.mcore import free_port

    data = work / "data"
    prepare_builtin(data, 512, max_docs=60, max_chars=4000)
    run = work / "pmp"
    # A secret W0 seed from a 0600 file, fixed so the run is the same every time: a drawn one made the
    # PMP-dense gap vary from run to run, and at rho 0.5 it sometimes fell under the 1% tolerance (then the
    # full dense run itself matched and nothing was searched). rho 0.25 keeps PMP clearly behind dense.
    seed_file = work / "private" / "w0_seed"
    seed_file.parent.mkdir(mode=0o700)
    seed_file.write_text(f"{SECRET_SEED}\n")
    seed_file.chmod(0o600)
    args = [f"model.seed_file={seed_file}", f"data.data_path=[0.5,{data / 'prose'},0.5,{data / 'code'}]",
            f"data.tokenizer_model={data / 'tokenizer.model'}", "data.split=90,10,0", "data.num_workers=0",
            "model.vocab_size=512", f"train.train_steps={STEPS}", "train.micro_batch_size=8",
            "train.global_batch_size=8", f"train.eval_interval={EVAL}", "train.eval_steps=4", "optim.lr=3e-3",
            f"optim.lr_warmup_steps={WARMUP}", f"checkpoint.dir={run}", f"checkpoint.save_interval={STEPS}",
            "logging.log_interval=40", "pmp.mode=pmp", "pmp.rho=0.25", "pmp.complement=decay",
            "pmp.projection=true", "pmp.projection_interval=20", "pmp.discovery.max_steps=5",
            "pmp.discovery.lr=3e-3"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                    f"--master_port={free_port()}", "-m", "pmp_megatron", "pretrain", "--config",
                    str(REPO / "configs" / "model" / "debug.yaml"), *args], env=_env(), check=True,
                   capture_output=True)
    return run


@pytest.fixture(scope="module")
def matched(tmp_path_factory):
    work = tmp_path_factory.mktemp("dense_matched")
    t0 = time.time()
    pmp = _pmp_run(work)
    out = work / "matched"
    proc = subprocess.run([sys.executable, "-m", "pmp_megatron", "dense-matched", str(pmp), "--out", str(out),
                           "--nproc-per-node=1", "--max-runs=6", "checkpoint.save_init=true",
                           "data.num_workers=0"], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / SUMMARY).read_text())
    print(f"\ndense-matched search ({time.time() - t0:.0f} s with the PMP run):\n{proc.stdout}")
    return pmp, out, summary


@pytest.mark.e2e
def test_chosen_run_matches_the_pmp_base_loss_within_1_percent(matched):
    pmp, _, summary = matched
    target = final_valid_loss(pmp)
    assert summary["target_loss"] == target
    chosen = summary["chosen"]
    assert chosen is not None and chosen == summary["attempts"][-1]
    assert abs(chosen["valid_loss"] - target) / target <= 0.01
    assert final_valid_loss(chosen["dir"]) == chosen["valid_loss"]  # the run's own record, not a copy
    assert chosen["steps"] < STEPS  # PMP's base loss is worse than the full dense run's: fewer tokens
    assert [a["steps"] for a in summary["attempts"]][0] == STEPS  # the search starts at the PMP run's steps
    for a in summary["attempts"]:
        assert a["rel_error"] == pytest.approx((a["valid_loss"] - target) / target)


@pytest.mark.e2e
def test_chosen_run_is_dense_from_the_pmp_w0_with_the_schedule_rules(matched):
    from pmp_megatron.config import load_config
    from pmp_megatron.release.from_checkpoint import iter_canonical_tensors

    pmp, out, summary = matched
    chosen = Path(summary["chosen"]["dir"])
    steps = summary["chosen"]["steps"]
    w0_pmp = dict(iter_canonical_tensors(pmp, 0))
    w0_dense = dict(iter_canonical_tensors(chosen, 0))
    assert w0_pmp.keys() == w0_dense.keys()
    for name, w in w0_pmp.items():
        assert torch.equal(w, w0_dense[name]), name
    trained = dict(iter_canonical_tensors(chosen, steps))
    assert any(not torch.equal(w, w0_dense[name]) for name, w in trained.items())  # and it did train

    cfg, ref = load_config(chosen / "config.yaml"), load_config(pmp / "config.yaml")
    assert cfg.pmp.mode == "dense" and cfg.train.train_steps == steps
    assert cfg.optim.lr_warmup_steps == max(1, round(WARMUP * steps / STEPS))
    assert cfg.train.eval_interval * (STEPS // EVAL) == steps  # as many evaluations as the PMP run
    assert cfg.model.seed_file == str(out / SEED_FILE) and ref.model.seed_file.endswith("private/w0_seed")
    assert dataclasses.replace(cfg.model, seed_file=None) == dataclasses.replace(ref.model, seed_file=None)
    assert cfg.data == ref.data
    assert (cfg.train.global_batch_size, cfg.train.eval_steps, cfg.train.seed) == \
        (ref.train.global_batch_size, ref.train.eval_steps, ref.train.seed)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay, cfg.optim.lr_decay_style) == \
        (ref.optim.lr, ref.optim.min_lr, ref.optim.weight_decay, ref.optim.lr_decay_style)


@pytest.mark.e2e
def test_secret_seed_only_in_the_0600_seed_file(matched):
    from pmp_megatron.train.checkpoint import checkpoint_config

    pmp, out, _ = matched
    cfg, common = checkpoint_config(pmp, STEPS)
    assert common["w0_seed_secret"]
    seed_file = out / SEED_FILE
    assert seed_file.read_text().strip() == str(cfg.model.seed)
    assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600
    texts = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".jsonl", ".log")]
    assert any(p.suffix == ".log" for p in texts)
    for path in texts:
        assert str(cfg.model.seed) not in path.read_text(errors="replace"), path


@pytest.mark.e2e
def test_rerun_trains_nothing_and_an_unreachable_target_fails(matched):
    pmp, out, summary = matched
    logs = {p: p.stat().st_size for p in (out / "logs").iterdir()}
    again = match(pmp, out, overrides=["checkpoint.save_init=true", "data.num_workers=0"], nproc_per_node=1,
                  max_runs=6)
    assert again["attempts"] == summary["attempts"] and again["chosen"] == summary["chosen"]
    assert {p: p.stat().st_size for p in (out / "logs").iterdir()} == logs  # no run was started
    # (last test of the module: this overwrites OUT/dense_matched.json)
    with pytest.raises(ValueError, match="no dense run within 1.00% of the target loss 0.5000"):
        match(pmp, out, target_loss=0.5, max_runs=1, nproc_per_node=1,
              overrides=["checkpoint.save_init=true", "data.num_workers=0"])


@pytest.mark.e2e
def test_bad_runs_fail_with_one_line(matched, tmp_path):
    pmp, _, summary = matched
    proc = subprocess.run([sys.executable, "-m", "pmp_megatron", "dense-matched", summary["chosen"]["dir"],
                           "--out", str(tmp_path / "x")], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("pmp-dense-matched: error: run ")
    assert "is a dense run, not a PMP run" in proc.stderr

    no_eval = tmp_path / "pmp_copy"
    shutil.copytree(pmp, no_eval)
    metrics = no_eval / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "valid_loss"}) + "\n"
                               for r in records))
    with pytest.raises(ValueError, match=r"no valid_loss records in .*metrics\.jsonl"):
        match(no_eval, tmp_path / "y")


def _search(loss, target: float, start: int, grid: int, max_runs: int = 10) -> tuple[int | None, dict]:
    results: dict[int, float] = {}
    while len(results) < max_runs:
        steps = next_steps(results, target, start, grid)
        assert steps not in results and steps % grid == 0
        results[steps] = loss(steps)
        if abs(results[steps] - target) / target <= 0.01:
            return steps, results
    return None, results


@pytest.mark.parametrize(("true_steps", "start", "grid"),
                         [(30, 80, 2), (5, 80, 1), (300, 80, 2), (1300, 20000, 20), (19000, 20000, 20)])
def test_search_finds_the_matching_steps_in_few_runs(true_steps, start, grid):
    def loss(s):
        return 3.0 + 4.0 / math.sqrt(s)

    steps, results = _search(loss, loss(true_steps), start, grid)
    assert steps is not None and len(results) <= 5, results


def test_search_names_an_unreachable_or_non_monotone_target():
    with pytest.raises(ValueError, match="above the final validation loss of the shortest dense run"):
        _search(lambda s: 3.0 + 4.0 / math.sqrt(s), 10.0, 80, 2)
    with pytest.raises(ValueError, match="not monotone"):
        next_steps({80: 3.0, 40: 3.5, 60: 2.0}, 2.5, 80, 2)
    with pytest.raises(ValueError, match="relax the tolerance"):
        next_steps({40: 3.0, 42: 2.0}, 2.5, 80, 2)
