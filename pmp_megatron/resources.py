"""The files that ship with the package: the YAML recipes (``configs/``) and the Slurm template
(``slurm/pretrain.sbatch``).

In a checkout (or an editable install) they are the repository's own ``configs/`` and ``slurm/``. A wheel
has no repository beside it, so ``setup.py`` copies both into the wheel as ``pmp_megatron/_data/configs``
and ``pmp_megatron/_data/slurm``; everything that reads them goes through ``shipped`` and finds them in
either place. ``configs/...`` paths in commands and docs keep working from a wheel install through
``recipe``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_DIR", "data_root", "shipped", "recipe", "source_tree"]

_PACKAGE = Path(__file__).resolve().parent
DATA_DIR = _PACKAGE / "_data"  # a wheel's copies of configs/ and slurm/ (setup.py); absent in a checkout


def data_root() -> Path:
    """The directory holding ``configs/`` and ``slurm/``: the wheel's ``_data``, else the checkout root."""
    return DATA_DIR if DATA_DIR.is_dir() else _PACKAGE.parent


def shipped(*parts: str) -> Path:
    """A shipped file or directory, e.g. ``shipped("configs", "model", "debug.yaml")``."""
    return data_root().joinpath(*parts)


def recipe(path: str | os.PathLike) -> Path:
    """``path`` itself when it exists; else, for a relative ``configs/...`` path, the recipe shipped with the
    package (so ``--config configs/model/debug.yaml`` works from any directory after ``pip install``);
    else ``path`` unchanged, for the caller to report missing."""
    path = Path(path)
    if path.exists() or path.is_absolute() or path.parts[:1] != ("configs",):
        return path
    packaged = shipped(*path.parts)
    return packaged if packaged.exists() else path


def source_tree() -> Path | None:
    """The checkout the package is imported from (its git state is a run's provenance); None for a wheel."""
    return None if DATA_DIR.is_dir() else _PACKAGE.parent
