"""pmp-launch without Slurm: the dry-run script of a 4-node x 8-GPU FP8 TinyLlama-1.1B job equals the
golden file, options and configs are validated, and the rendezvous helpers map Slurm's environment.

After an intended template change regenerate the golden:
    UPDATE_GOLDEN=1 pytest tests/unit/test_launch_render.py
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pmp_megatron.cli import run
from pmp_megatron.launch import rendezvous
from pmp_megatron.launch.sbatch import SlurmOptions, launch, render_sbatch, render_template

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "pretrain_4x8_fp8_1.1b.sbatch"
FP8_1B_ARGS = ["--config", "configs/model/tinyllama-1.1b.yaml", "configs/pmp/reference.yaml",
               "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "04:00:00",
               "--dry-run",
               # the reference global batch of 32 sequences on 32 ranks needs micro-batches of 1
               "model.fp8=hybrid", "model.transformer_impl=transformer_engine", "train.micro_batch_size=1"]


def test_dry_run_matches_golden(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert run("launch", FP8_1B_ARGS) == 0
    script = capsys.readouterr().out
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), "rendered script changed; UPDATE_GOLDEN=1 if intended"


def test_golden_has_the_contract():
    text = GOLDEN.read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --dependency=singleton", "#SBATCH --job-name=pmp-tinyllama-1.1b",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", 'scontrol requeue "$SLURM_JOB_ID"',
                 "OVERRIDES=(model.fp8=hybrid model.transformer_impl=transformer_engine "
                 "train.micro_batch_size=1)", "RUN_DIR='<run-dir>'"):
        assert line in text, line
    for absent in ("#SBATCH --account", "#SBATCH --cpus-per-task", "CONTAINER_IMAGE=", "{{", "}}"):
        assert absent not in text, absent


def test_rendered_script_is_valid_bash():
    script = render_sbatch(SlurmOptions(nodes=2, gpus_per_node=0, ntasks_per_node=2, job_name="x",
                                        container_image="nvcr.io/nvidia/pytorch:25.01-py3"),
                           "/runs/with space", ["model.num_layers=2", "data.cache_dir=it's"])
    assert "CONTAINER_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3" in script
    assert "--gpus-per-node" not in script.split("set -uo")[0]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assigned = subprocess.run(["bash", "-c", script.split("# Network.")[0] + 'printf "%s\\n" "$RUN_DIR" '
                               '"${OVERRIDES[@]}"'], capture_output=True, text=True, check=True).stdout
    assert assigned.splitlines() == ["/runs/with space", "model.num_layers=2", "data.cache_dir=it's"]


def test_run_dir_written_without_submitting(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("pmp_megatron.launch.sbatch.submit", lambda path, chain: calls.append(chain) or ["7"])
    result = launch([REPO / "configs/model/debug.yaml"], SlurmOptions(nodes=1, gpus_per_node=2, chain=3),
                     ["pmp.rho=0.5"], run_dir=tmp_path / "run")
    run = tmp_path / "run"
    assert calls == [3] and result.job_ids == ["7"]
    assert (run / "pretrain.sbatch").read_text() == result.script
    assert "#SBATCH --job-name=pmp-debug" in result.script
    assert f"#SBATCH --output={run}/logs/%x-%j.out" in result.script
    assert (run / "logs").is_dir() and (run / "git.txt").read_text().startswith("commit ")
    from pmp_megatron.config import load_config

    saved = load_config(run / "config.yaml")
    assert saved.checkpoint.dir == str(run / "checkpoints") and saved.pmp.rho == 0.5
    assert saved.model.num_layers == 4


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0", "--gpus-per-node", "8"], "nodes must be >= 1"),
    (["--nodes", "1", "--gpus-per-node", "0"], "ntasks_per_node must be >= 1"),
    (["--nodes", "1", "--gpus-per-node", "8", "--partition", "a b"], "partition"),
    (["--nodes", "1", "--gpus-per-node", "8", "--chain", "0"], "chain must be >= 1"),
    (["--nodes", "4", "--gpus-per-node", "8"], "train.global_batch_size (32)"),  # 32 ranks x mbs 4
])
def test_bad_options_raise(argv, message, capsys):
    args = ["--config", str(REPO / "configs/model/tinyllama-1.1b.yaml"),
            str(REPO / "configs/pmp/reference.yaml"), "--dry-run", *argv]
    assert run("launch", args) == 2
    assert message in capsys.readouterr().err


def test_missing_config_raises_value_error():
    with pytest.raises(ValueError, match="does not exist"):
        launch(["configs/model/nope.yaml"], SlurmOptions(nodes=1, gpus_per_node=1), dry_run=True)
    with pytest.raises(ValueError, match="nodes must be >= 1"):
        launch([REPO / "configs/model/debug.yaml"], SlurmOptions(nodes=0, gpus_per_node=1), dry_run=True)


def test_template_fields():
    text = "a={{x}}\n#SBATCH --p={{p}}\nq={{y|sh}}\n"
    assert render_template(text, {"x": "1", "p": None, "y": "a b"}) == "a=1\nq='a b'\n"
    with pytest.raises(ValueError, match="'z'"):
        render_template("{{z}}", {"x": "1"})


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[8-10],login1", ["gpu8", "gpu9", "gpu10", "login1"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("a[1,3],b-[009-011]", ["a1", "a3", "b-009", "b-010", "b-011"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert rendezvous.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node]1[", "node[3-1]", "node[a-b]", ""])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(ValueError):
        rendezvous.expand_nodelist(bad)


def test_rendezvous_env_from_slurm(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the nodelist parser is used
    env = {"SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "123456", "SLURM_PROCID": "9",
           "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}
    assert rendezvous.rendezvous_env(env) == {
        "MASTER_ADDR": "gpu017", "MASTER_PORT": str(20000 + 123456 % 20000), "RANK": "9",
        "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    kept = rendezvous.rendezvous_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (kept["MASTER_ADDR"], kept["MASTER_PORT"]) == ("10.0.0.1", "29500")
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        rendezvous.rendezvous_env({"SLURM_JOB_NODELIST": "a", "SLURM_JOB_ID": "1"})


def test_rendezvous_exec_and_export():
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_NODELIST": "n[3-4]", "SLURM_JOB_ID": "20001",
           "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "MASTER_ADDR": "stale"}
    cmd = [sys.executable, "-m", "pmp_megatron.launch.rendezvous"]
    exported = subprocess.run([*cmd, "--export"], env=env, capture_output=True, text=True, check=True).stdout
    assert exported.splitlines() == ["export MASTER_ADDR=n3", "export MASTER_PORT=20001"]
    shown = subprocess.run([*cmd, "sh", "-c", 'echo "$RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR"'],
                           env=env, capture_output=True, text=True, check=True).stdout
    assert shlex.split(shown) == ["1", "2", "0", "stale"]  # the per-task form keeps an exported address
