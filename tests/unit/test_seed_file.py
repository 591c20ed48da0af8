"""model.seed_file: a secret W0 seed shared by runs that must start from one W0 (a PMP run, its controls)."""

from __future__ import annotations

import os

import pytest

from pmp_megatron.config import config_from_dict
from pmp_megatron.train import resume


def _cfg(seed_file=None, seed=None):
    return config_from_dict({"model": {"seed": seed, "seed_file": seed_file}, "pmp": {"mode": "dense"}})


def test_seed_file_gives_a_secret_seed(tmp_path):
    path = tmp_path / "w0_seed"
    path.write_text(f"{2**100 + 7}\n")
    os.chmod(path, 0o600)
    cfg = _cfg(str(path))
    assert resume.resolve_seed(cfg, None) is True
    assert cfg.model.seed == 2**100 + 7
    assert resume.public_config(cfg, True).model.seed is None  # what config.yaml shows


@pytest.mark.parametrize("text, mode, words", [
    ("12345\n", 0o644, "readable by others"),
    ("0x1f\n", 0o600, "decimal integer"),
    ("", 0o600, "decimal integer"),
])
def test_bad_seed_files_are_named(tmp_path, text, mode, words):
    path = tmp_path / "w0_seed"
    path.write_text(text)
    os.chmod(path, mode)
    with pytest.raises(ValueError, match=words) as err:
        resume.resolve_seed(_cfg(str(path)), None)
    assert str(path) in str(err.value)


def test_missing_seed_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        resume.resolve_seed(_cfg(str(tmp_path / "nope")), None)


def test_seed_and_seed_file_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="exclude each other"):
        _cfg(str(tmp_path / "w0_seed"), seed=3)
