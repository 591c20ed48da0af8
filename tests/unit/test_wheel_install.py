"""A NON-editable install works without the checkout: the wheel built from a copy of the source is installed
into a fresh venv (torch and the other dependencies are borrowed from this interpreter's site-packages
through a ``.pth`` line, not reinstalled) and its console scripts run from a directory outside the source
tree: ``pmp-launch --dry-run`` (the sbatch template and a ``configs/...`` recipe come from the wheel),
``pmp-preprocess`` (.bin/.idx from a tiny JSONL), ``pmp-pretrain --print-config``, ``pmp-quickstart --help``
and ``pmp-import-hf --help``; and the CPU gradient-mask kernel builds from the C source the wheel carries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pmp_megatron.data import indexed
from pmp_megatron.data.tokenizer import Tokenizer
from pmp_megatron.testing import tiny_sentencepiece

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SOURCE = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "pmp_megatron", "configs", "slurm"]


def _sh(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{tail}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel (no pip, no source path), dependencies borrowed by ``.pth``."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # a copy: building in place would leave build/ and stale files in the checkout
    src.mkdir()
    for name in SOURCE:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "_data"))
        else:
            shutil.copy2(path, src / name)
    env = _clean_env()
    _sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(root / "dist"), str(src)], root, env)
    [wheel] = (root / "dist").glob("pmp_megatron-*.whl")
    venv = root / "venv"
    _sh([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    python = venv / "bin" / "python"
    purelib = _sh([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root,
                  env).stdout.strip()
    # appended after the venv's own site-packages: the wheel's pmp_megatron is found first, and this
    # directory's .pth files (an editable pmp_megatron's finder among them) are not run
    (Path(purelib) / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)], root, env)
    shutil.rmtree(src)  # nothing of the source tree is left to fall back on
    return venv


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory outside the source tree, without a configs/ or slurm/ of its own."""
    assert not tmp_path.is_relative_to(REPO)
    return tmp_path


def test_the_installed_package_is_the_wheel(venv, elsewhere):
    out = _sh([str(venv / "bin" / "python"), "-c", "import json, pmp_megatron, pmp_megatron.resources as r; "
               "print(json.dumps([pmp_megatron.__file__, str(r.data_root()), str(r.source_tree())]))"],
              elsewhere, _clean_env()).stdout
    package, data_root, source_tree = json.loads(out)
    assert Path(package).is_relative_to(venv) and Path(data_root).is_relative_to(venv), out
    assert source_tree == "None"
    assert (Path(data_root) / "slurm" / "pretrain.sbatch").is_file()
    assert (Path(data_root) / "configs" / "model" / "debug.yaml").is_file()


def test_the_wheel_carries_the_cpu_mask_kernel_and_it_builds(venv, elsewhere):
    env = {**_clean_env(), "PMP_NATIVE_CACHE": str(elsewhere / "native")}
    out = _sh([str(venv / "bin" / "python"), "-c", "from pmp_megatron.pmp import native; "
               "print(native._SOURCE, native.library() is not None)"], elsewhere, env).stdout.split()
    assert Path(out[0]).is_relative_to(venv) and out[1] == "True", out
    assert len(list((elsewhere / "native").glob("masked_mul-*.so"))) == 1


def test_launch_dry_run_renders_from_the_wheel(venv, elsewhere):
    proc = _sh([str(venv / "bin" / "pmp-launch"), "--config", "configs/model/debug.yaml", "--nodes", "1",
                "--gpus-per-node", "2", "--partition", "debug", "--dry-run", "pmp.rho=0.5"],
               elsewhere, _clean_env())
    script = proc.stdout
    for line in ("#SBATCH --job-name=pmp-debug", "#SBATCH --nodes=1", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --partition=debug", "#SBATCH --requeue", "OVERRIDES=(pmp.rho=0.5)",
                 'pmp-pretrain --config "$RUN_DIR/config.yaml"'):
        assert line in script, line
    assert not list(elsewhere.iterdir())  # a dry run writes nothing


def test_preprocess_writes_an_indexed_dataset(venv, elsewhere):
    model = tiny_sentencepiece(elsewhere)
    docs = ["Kalo mine rusa tivo.", "Zen qua bredor felgim hup!", "Sati vone kalo, 42."]
    (elsewhere / "tiny.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    proc = _sh([str(venv / "bin" / "pmp-preprocess"), "--input", "tiny.jsonl", "--output-prefix", "out/tiny",
                "--tokenizer-model", model, "--workers", "1", "--no-progress"], elsewhere, _clean_env())
    assert "out/tiny: 3 documents" in proc.stdout
    assert (elsewhere / "out" / "tiny.bin").is_file() and (elsewhere / "out" / "tiny.idx").is_file()
    data, tok = indexed.read_indexed(elsewhere / "out" / "tiny"), Tokenizer(model)
    assert [tok.decode(data[i][:-1]) for i in range(len(data))] == docs


def test_pretrain_print_config_and_quickstart_help(venv, elsewhere):
    env = _clean_env()
    printed = _sh([str(venv / "bin" / "pmp-pretrain"), "--config", "configs/model/debug.yaml",
                   "--print-config", "pmp.mode=dense"], elsewhere, env).stdout
    assert "num_layers: 4" in printed and "mode: dense" in printed
    usage = _sh([str(venv / "bin" / "pmp-quickstart"), "--help"], elsewhere, env).stdout
    assert "--out" in usage and "usage: pmp-quickstart" in usage
    usage = _sh([str(venv / "bin" / "pmp-import-hf"), "--help"], elsewhere, env).stdout
    assert "usage: pmp-import-hf" in usage and "--tp" in usage
