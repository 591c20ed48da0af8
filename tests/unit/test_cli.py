"""One dispatcher for every command, and the user-error contract: one line naming the file or field, exit 2,
the traceback only with --debug."""

from __future__ import annotations

import errno
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pmp_megatron import cli

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "model" / "debug.yaml"


def _fake(exc: BaseException):
    def command(argv):
        raise exc

    return command


@pytest.fixture
def fake_command(monkeypatch):
    def install(exc):
        monkeypatch.setitem(cli.COMMANDS, "fake", "fake:command")
        monkeypatch.setattr(cli, "_resolve", lambda name: _fake(exc))

    return install


@pytest.mark.parametrize("exc, words", [
    (ValueError("train.lr must be finite, got nan"), "train.lr must be finite"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/config.yaml"), "/x/config.yaml"),
    (OSError(errno.ENOSPC, "No space left on device", "/ckpt/iter_0000010"), "no space left on device"),
    (FileExistsError("private/mask.safetensors exists; use --force"), "use --force"),
])
def test_user_errors_are_one_line_exit_2(fake_command, capsys, exc, words):
    fake_command(exc)
    assert cli.run("fake", []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pmp-fake: error: ") and words in err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(fake_command):
    fake_command(ValueError("bad value"))
    with pytest.raises(ValueError, match="bad value"):
        cli.run("fake", ["--debug"])


def test_bugs_are_not_hidden(fake_command):
    fake_command(KeyError("internal"))
    with pytest.raises(KeyError):
        cli.run("fake", [])


def test_every_command_resolves_and_every_console_script_goes_through_the_dispatcher():
    for name in cli.COMMANDS:
        assert callable(cli._resolve(name)), name
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {f"pmp-{name}" for name in cli.COMMANDS}
    for script, target in scripts.items():
        module, func = target.split(":")
        assert module == "pmp_megatron.cli", script
        assert getattr(cli, func).__doc__ == f"Console script {script}."


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pmp_megatron", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_unknown_command_lists_the_commands():
    proc = _run("nonsense")
    assert proc.returncode == 2 and "pretrain" in proc.stderr and "attack" in proc.stderr


@pytest.mark.parametrize("argv, words", [
    (["pretrain", "--config", str(DEBUG), "optim.lr=nan"], "optim.lr"),
    (["pretrain", "--config", "missing.yaml"], "missing.yaml"),
    (["release", "--checkpoint", "no/such/ckpt", "--out", "out_release"], "no/such/ckpt"),
    (["export-mask", "--checkpoint", "no/such/ckpt", "--out", "key.safetensors"], "no/such/ckpt"),
    (["attack", "--suite", "no/such/suite.yaml", "--model", "no/such/model"], "no/such"),
    (["launch", "--config", str(DEBUG), "--nodes", "0", "--gpus-per-node", "1", "--dry-run"], "nodes"),
])
def test_console_commands_turn_user_errors_into_one_line(argv, words):
    proc = _run(*argv)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if "error" in x.lower()]
    assert len(lines) == 1 and words in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_print_config_prints_the_resolved_config():
    proc = _run("pretrain", "--config", str(DEBUG), "pmp.rho=0.25", "--print-config")
    assert proc.returncode == 0, proc.stderr
    import yaml

    resolved = yaml.safe_load(proc.stdout)
    assert resolved["pmp"]["rho"] == 0.25 and resolved["model"]["num_layers"] >= 1


@pytest.mark.parametrize("seed_args, secret", [([], True), (["model.seed_file=SEED_FILE"], True),
                                               (["model.seed=7"], False)])
def test_print_config_is_the_runs_config_yaml_and_starts_no_distributed(tmp_path, monkeypatch, capsys,
                                                                        seed_args, secret):
    import torch.distributed

    from pmp_megatron import mcore
    from pmp_megatron.config import load_config, save_config
    from pmp_megatron.train.resume import public_config

    def no_distributed(*args, **kwargs):
        raise AssertionError("--print-config started torch.distributed")

    monkeypatch.setattr(mcore, "init_distributed", no_distributed)
    monkeypatch.setattr(torch.distributed, "init_process_group", no_distributed)
    seed_file = tmp_path / "w0_seed"
    seed_file.write_text("318807613923851212730947329547802371\n")
    seed_file.chmod(0o600)
    overrides = ["pmp.rho=0.25", *(a.replace("SEED_FILE", str(seed_file)) for a in seed_args)]
    assert cli.run("pretrain", ["--config", str(DEBUG), *overrides, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "318807613923851212730947329547802371" not in printed
    save_config(public_config(load_config(str(DEBUG), overrides), secret), tmp_path / "config.yaml")
    assert printed == (tmp_path / "config.yaml").read_text()  # what the run dir's config.yaml holds
    assert load_config(tmp_path / "config.yaml").model.seed == (None if secret else 7)
