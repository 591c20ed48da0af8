"""pmp-launch passes cluster specifics through: --qos/--constraint/--exclusive/--mem/--reservation/--exclude
and --sbatch-option reach sbatch's own reading of the #SBATCH block, --srun-option and --container-mount
reach the trainer's srun as bash builds its arguments, and a bad value fails in one line naming the flag.
Without any of them the script is the golden one (tests/unit/test_launch_render.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_launch_safety import CONTRACT, sbatch_argv  # sbatch's parser, emulated

from pmp_megatron.cli import run
from pmp_megatron.launch.sbatch import SlurmOptions, render_sbatch

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "model" / "debug.yaml"
BASE = ["--config", str(DEBUG), "--nodes", "2", "--gpus-per-node", "4", "--dry-run"]
IMAGE = "nvcr.io/nvidia/pytorch:25.01-py3"


def srun_args(script: str, run_dir: str = "/runs/x") -> list[str]:
    """The arguments the script gives the trainer's srun (bash runs the part that builds them)."""
    start = script.index("SRUN_ARGS=()")
    end = script.index('echo "[$(date', start)
    body = f"unset SLURM_CPUS_PER_TASK\nRUN_DIR='{run_dir}'\nPWD=/work\n{script[start:end]}"
    prefix = next((line for line in script.splitlines() if line.startswith("CONTAINER_IMAGE=")), "")
    show = 'echo "${#SRUN_ARGS[@]}"; printf "%s\\n" "${SRUN_ARGS[@]}"'
    count, *shown = subprocess.run(["bash", "-c", f"{prefix}\n{body}\n{show}"], capture_output=True,
                                   text=True, check=True).stdout.splitlines()
    return shown[:int(count)]


def test_sbatch_passthrough_reaches_sbatch(capsys):
    argv = [*BASE, "--qos", "high", "--constraint", "a100&ib", "--exclusive", "--mem", "0",
            "--reservation", "res1", "--exclude", "node[01-02]", "--sbatch-option", "mail-type=END",
            "--sbatch-option=--comment=a b #c", "--sbatch-option", "hint=nomultithread", "pmp.rho=0.5"]
    assert run("launch", argv) == 0
    script = capsys.readouterr().out
    parsed = sbatch_argv(script)
    for flag in ("--qos=high", "--constraint=a100&ib", "--exclusive", "--mem=0", "--reservation=res1",
                 "--exclude=node[01-02]", "--mail-type=END", "--comment=a b #c", "--hint=nomultithread",
                 "--nodes=2", *CONTRACT):
        assert flag in parsed, flag
    assert sorted(parsed[-len(CONTRACT):]) == sorted(CONTRACT)  # the requeue contract still closes it
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_srun_options_and_mounts_reach_srun():
    options = SlurmOptions(nodes=1, gpus_per_node=2, job_name="j", container_image=IMAGE,
                           container_mounts=("/data:/data", "/my scratch:/scratch:ro+rprivate"),
                           srun_options=("mpi=pmix", "--kill-on-bad-exit=1", "export=ALL,X=$(id)"))
    assert srun_args(render_sbatch(options, "/runs/x")) == [
        f"--container-image={IMAGE}", "--container-mounts=/runs/x", "--container-workdir=/work",
        "--container-mounts=/data:/data,/my scratch:/scratch:ro+rprivate",
        "--mpi=pmix", "--kill-on-bad-exit=1", "--export=ALL,X=$(id)"]
    plain = SlurmOptions(nodes=1, gpus_per_node=2, job_name="j")
    assert srun_args(render_sbatch(plain, "/runs/x")) == []
    assert srun_args(render_sbatch(SlurmOptions(nodes=1, gpus_per_node=2, job_name="j",
                                                srun_options=("exclusive",)), "/runs/x")) == ["--exclusive"]


def test_no_passthrough_renders_no_extra_line():
    script = render_sbatch(SlurmOptions(nodes=1, gpus_per_node=2, job_name="j"), "/runs/x")
    for text in ("--qos", "--exclusive", "--mem", "--reservation", "--exclude", "--constraint",
                 "pmp-launch --srun-option", "pmp-launch --container-mount", "#SBATCH \n", "#SBATCH  "):
        assert text not in script, text


@pytest.mark.parametrize("flags, words", [
    (["--sbatch-option", "x y"], "--sbatch-option 'x y' must look like KEY=VALUE or KEY"),
    (["--sbatch-option", "=END"], "--sbatch-option '=END' must look like"),
    (["--sbatch-option", "m"], "--sbatch-option 'm' must look like"),
    (["--sbatch-option", "mail-type="], "--sbatch-option 'mail-type=' must look like"),
    (["--sbatch-option", "comment=a\n#SBATCH --partition=evil"], "--sbatch-option must not contain control"),
    (["--sbatch-option", "output=/elsewhere"], "renders --output itself (use --run-dir)"),
    (["--sbatch-option", "requeue"], "renders --requeue itself (the requeue contract sets it)"),
    (["--sbatch-option", "partition=gpu"], "renders --partition itself (use --partition)"),
    (["--srun-option=-N2"], "--srun-option '-N2' must look like"),
    (["--srun-option", "container-image=other"], "--srun-option 'container-image=other': pmp-launch renders"),
    (["--container-image", IMAGE, "--container-mount", "/data"], "--container-mount '/data' must look like "
                                                                 "SRC:DST[:FLAGS]"),
    (["--container-image", IMAGE, "--container-mount", ":/data"], "--container-mount ':/data' must look"),
    (["--container-image", IMAGE, "--container-mount", "/a:/b,/c:/d"], "no ','"),
    (["--container-mount", "/data:/data"], "--container-mount needs --container-image"),
    (["--qos", "a b"], "qos must be a non-empty word"),
    (["--mem", ""], "mem must be a non-empty word"),
])
def test_bad_passthrough_fails_in_one_line_naming_the_flag(capsys, flags, words):
    assert run("launch", [*BASE, *flags, "pmp.rho=0.5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and words in captured.err, captured.err
