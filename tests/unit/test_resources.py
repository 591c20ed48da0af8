"""The shipped configs/ and slurm/ are found through ``pmp_megatron.resources``: the checkout's own in a
checkout, the wheel's ``pmp_megatron/_data`` copies in an install (tests/unit/test_wheel_install.py builds
a real wheel); ``configs/...`` paths resolve from any directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from pmp_megatron import resources
from pmp_megatron.config import load_config
from pmp_megatron.launch import sbatch

REPO = Path(__file__).resolve().parents[2]


def test_a_checkout_reads_its_own_configs_and_template():
    assert not resources.DATA_DIR.exists()  # setup.py adds it to wheels only; never commit one
    assert resources.data_root() == REPO and resources.source_tree() == REPO
    assert sbatch.TEMPLATE == REPO / "slurm" / "pretrain.sbatch"
    assert resources.shipped("configs", "model", "debug.yaml").read_text() == \
        (REPO / "configs" / "model" / "debug.yaml").read_text()


def test_an_install_reads_the_packaged_copies(tmp_path, monkeypatch):
    data = tmp_path / "_data"
    (data / "configs" / "model").mkdir(parents=True)
    (data / "configs" / "model" / "tiny.yaml").write_text("model:\n  num_layers: 3\n")
    monkeypatch.setattr(resources, "DATA_DIR", data)
    assert resources.data_root() == data and resources.source_tree() is None
    monkeypatch.chdir(tmp_path)
    assert resources.recipe("configs/model/tiny.yaml") == data / "configs" / "model" / "tiny.yaml"
    assert load_config("configs/model/tiny.yaml", ["pmp.mode=dense"]).model.num_layers == 3


def test_configs_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resources.recipe("configs/model/debug.yaml") == REPO / "configs" / "model" / "debug.yaml"
    assert load_config("configs/model/debug.yaml", ["pmp.mode=dense"]).model.num_layers == 4
    own = tmp_path / "configs" / "model" / "debug.yaml"  # a file of that name here wins
    own.parent.mkdir(parents=True)
    own.write_text("model:\n  num_layers: 2\n")
    assert resources.recipe("configs/model/debug.yaml") == Path("configs/model/debug.yaml")
    assert load_config("configs/model/debug.yaml", ["pmp.mode=dense"]).model.num_layers == 2
    for path in ("configs/model/nope.yaml", "other/debug.yaml", "/abs/configs/model/debug.yaml"):
        assert resources.recipe(path) == Path(path)
    with pytest.raises(ValueError, match="config file configs/model/nope.yaml does not exist"):
        sbatch.resolve_config(["configs/model/nope.yaml"], [], world_size=1)


def test_provenance_of_an_installed_package_names_its_version(tmp_path, monkeypatch):
    monkeypatch.setattr(sbatch, "source_tree", lambda: None)
    monkeypatch.setattr(sbatch, "_git", lambda *a: pytest.fail("git must not run outside a checkout"))
    sbatch.write_provenance(tmp_path)
    lines = (tmp_path / "git.txt").read_text().splitlines()
    assert lines[:2] == ["commit unknown", "dirty unknown"] and lines[2].startswith("package pmp_megatron ")
    assert not (tmp_path / "git.diff").exists()
