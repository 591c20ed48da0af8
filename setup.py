"""Build hook (everything else is in pyproject.toml): a wheel carries the repo's ``configs/`` and ``slurm/``
as ``pmp_megatron/_data/``, where ``pmp_megatron/resources.py`` finds them. They stay at the repo root so
that the ``configs/...`` paths of the docs and tests work in a checkout; an editable install reads them
there and gets no copy."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("configs", "slurm")


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for name in SHIPPED:
            for src in sorted((ROOT / name).rglob("*")):
                if src.is_file() and "__pycache__" not in src.parts:
                    dst = Path(self.build_lib, "pmp_megatron", "_data", src.relative_to(ROOT))
                    self.mkpath(str(dst.parent))
                    self.copy_file(str(src), str(dst))


setup(cmdclass={"build_py": BuildPyWithData})
