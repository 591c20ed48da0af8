"""Values rendered into the sbatch script cannot change its meaning: control characters are refused
(a newline in --run-dir used to end the #SBATCH block, dropping --requeue/--signal/--dependency, and run
a shell command), and paths with spaces, quotes, '#' or '%' reach sbatch's --output intact.

``sbatch_argv`` reimplements how sbatch reads a script's options (src/sbatch/opt.c: ``_opt_batch_script``
and ``_get_argument``), so the tests check what Slurm would see without a Slurm installation.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pmp_megatron.cli import run
from pmp_megatron.launch.sbatch import SlurmOptions, launch, render_sbatch, sbatch_escape

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "model" / "debug.yaml"
OPTIONS = SlurmOptions(nodes=1, gpus_per_node=2, job_name="pmp-debug", time="01:00:00")
CONTRACT = ["--requeue", "--signal=USR2@300", "--dependency=singleton", "--open-mode=append"]


def _get_argument(line: str) -> tuple[str | None, int]:
    """One argument of an #SBATCH line and the characters consumed, as sbatch parses it."""
    i = 0
    while i < len(line) and line[i].isspace():
        i += 1
    out, quote, escape = [], None, False
    while i < len(line) and (quote or not line[i].isspace()):
        ch = line[i]
        if escape:
            escape = False
        elif ch == "\\":
            escape, i = True, i + 1
            continue
        elif quote:
            if ch == quote:
                quote, i = None, i + 1
                continue
        elif ch in "\"'":
            quote, i = ch, i + 1
            continue
        elif ch == "#":
            break
        out.append(ch)
        i += 1
    assert quote is None, f"sbatch: unmatched {quote} in {line!r}"
    return ("".join(out) if out else None), i


def sbatch_argv(script: str) -> list[str]:
    """The options sbatch takes from ``script``'s #SBATCH lines (it stops at the first command line)."""
    argv = []
    for line in script.split("\n")[1:]:
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.lstrip().startswith("#"):
                break
            continue
        rest = line[len("#SBATCH"):]
        while True:
            arg, used = _get_argument(rest)
            if arg is None:
                break
            argv.append(arg)
            rest = rest[used:]
    return argv


def _output(argv: list[str]) -> str:
    [value] = [a.removeprefix("--output=") for a in argv if a.startswith("--output=")]
    return value


def test_the_emulated_parser_reads_what_sbatch_reads():
    # a backslash makes the next character literal, but an escaped space still ends the argument
    assert sbatch_argv("#!/bin/bash\n#SBATCH --a=1 --b='x y'  # note\n#SBATCH -c \"p q\"\\ r \"\\#\\\"\"\n"
                       "echo hi\n#SBATCH --late\n") == ["--a=1", "--b=x y", "-c", "p q", "r", '#"']


@pytest.mark.parametrize("run_dir", ["/runs/with space", "/runs/it's \"q\"",
                                     "/runs/#hash", "/runs/50%/x", "/runs/$HOME/`id`"])
def test_run_dir_reaches_output_intact(run_dir):
    script = render_sbatch(OPTIONS, run_dir)
    argv = sbatch_argv(script)
    assert _output(argv) == run_dir.replace("%", "%%") + "/logs/%x-%j.out"
    assert all(flag in argv for flag in CONTRACT), argv
    assigned = subprocess.run(["bash", "-c", script.split("# Network.")[0] + 'printf "%s" "$RUN_DIR"'],
                              capture_output=True, text=True, check=True).stdout
    assert assigned == run_dir


@pytest.mark.parametrize("run_dir", ["/runs/x\n#SBATCH --partition=evil", "/runs/x\ntouch /tmp/pwned\n",
                                     "/runs/x\r", "/runs/nul\x00", "/runs/tab\there"])
def test_run_dir_with_control_characters_is_refused(run_dir):
    with pytest.raises(ValueError, match=r"^run_dir must not contain control characters") as err:
        render_sbatch(OPTIONS, run_dir)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="run_dir"):
        launch([DEBUG], OPTIONS, ["pmp.rho=0.5"], run_dir=run_dir, dry_run=True)


def test_cli_refuses_a_newline_in_run_dir_in_one_line(capsys, tmp_path):
    run_dir = str(tmp_path / "run\n#SBATCH --partition=evil")
    assert run("launch", ["--config", str(DEBUG), "--nodes", "1", "--gpus-per-node", "2",
                          "--run-dir", run_dir, "--dry-run", "pmp.rho=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run_dir must not contain control characters" in err
    assert not (tmp_path / "run").exists()


def test_backslash_in_run_dir_is_refused():
    with pytest.raises(ValueError, match="run_dir must not contain a backslash"):
        render_sbatch(OPTIONS, "/runs/a\\b")


def test_container_mount_separators_in_run_dir_are_refused():
    image = SlurmOptions(nodes=1, gpus_per_node=2, job_name="j", container_image="nvcr.io/nv/pytorch:25.01")
    with pytest.raises(ValueError, match=r"run_dir must not contain ',' or ':' with container_image"):
        render_sbatch(image, "/runs/a:b")
    assert render_sbatch(OPTIONS, "/runs/a:b,c")  # no container: nothing splits it


@pytest.mark.parametrize("field", ["partition", "account", "time", "job_name", "container_image"])
@pytest.mark.parametrize("bad", ["gpu\x00", "gpu\x1b[31m", "a\nb"])
def test_word_options_with_control_characters_are_refused(field, bad):
    options = SlurmOptions(nodes=1, gpus_per_node=1, **{"job_name": "j", field: bad})
    with pytest.raises(ValueError, match=rf"^{field} must") as err:
        render_sbatch(options)
    assert "\n" not in str(err.value)


def test_word_options_are_escaped_for_sbatch():
    options = SlurmOptions(nodes=1, gpus_per_node=1, job_name="a#b'c", partition='p"q', account="x\\y")
    argv = sbatch_argv(render_sbatch(options))
    assert {"--job-name=a#b'c", '--partition=p"q', "--account=x\\y"} <= set(argv)
    assert all(flag in argv for flag in CONTRACT)


def test_trainer_and_overrides_with_control_characters_are_refused():
    with pytest.raises(ValueError, match="^trainer must not contain control characters"):
        render_sbatch(SlurmOptions(nodes=1, gpus_per_node=1, job_name="j", trainer="pmp-pretrain\x00"))
    with pytest.raises(ValueError, match=r"^override 'model.num_layers=2\\n' must not contain"):
        render_sbatch(OPTIONS, "/runs/x", ["model.num_layers=2\n"])


def test_escape_is_identity_on_plain_values():
    for value in ("pmp-tinyllama-1.1b", "04:00:00", "<run-dir>", "/scratch/u/runs/pmp-2024_01"):
        assert sbatch_escape(value) == value
