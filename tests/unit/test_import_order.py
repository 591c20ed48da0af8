"""The package's imports point one way, lowest first (docs/architecture.md).

Every ``import`` of a ``pmp_megatron`` module -- at module level or inside a function -- is checked against
``ORDER``: a module may import its own package and any package of a LOWER layer, never a higher one or
another package of its own layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pmp_megatron"

# Lowest first; the packages of one layer may not import each other.
ORDER: list[set[str]] = [
    {"atomic", "resources"},
    {"config", "compat"},
    {"mcore"},
    {"data", "model"},
    {"pmp"},
    {"train"},
    {"release"},
    {"launch"},
    {"attack"},
    {"testing"},
    {"quickstart"},
    {"cli"},
    {"__main__"},
]
LAYER = {name: i for i, layer in enumerate(ORDER) for name in layer}


def _unit(module: str) -> str:
    """``pmp_megatron.pmp.masks`` -> ``pmp``; ``pmp_megatron`` itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every pmp_megatron import in ``path``, however nested."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                base_mod = ".".join(base + ([node.module] if node.module else []))
            else:
                base_mod = node.module or ""
            if base_mod == "pmp_megatron":  # `from pmp_megatron import mcore`: the names are modules
                out += [(node.lineno, f"pmp_megatron.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base_mod))
    return [(line, m) for line, m in out if m == "pmp_megatron" or m.startswith("pmp_megatron.")]


def violations(root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        src = _unit(module)
        if src not in LAYER:
            if src:  # the top-level __init__ may import nothing of ours but its version
                bad.append(f"{path}: package {src!r} is not in ORDER")
            continue
        for line, target in imported_modules(path, module):
            dst = _unit(target)
            if dst == src:
                continue
            if dst not in LAYER or LAYER[dst] >= LAYER[src]:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {src} imports {target} "
                           f"({dst or 'the package root'} is not below {src})")
    return bad


def test_imports_point_one_way():
    bad = violations()
    assert not bad, "imports against the package order:\n" + "\n".join(bad)


def test_every_package_has_a_layer():
    units = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert units <= set(LAYER), f"packages without a layer: {sorted(units - set(LAYER))}"


@pytest.mark.parametrize("source, expect_bad", [
    ("from pmp_megatron.train import trainer\n", True),                     # pmp -> train: upward
    ("def f():\n    from pmp_megatron.release import audit\n", True),         # function-local, upward
    ("from pmp_megatron import mcore\nfrom pmp_megatron.model import params\n", False),
    ("from ..train.step import train_step\n", True),                         # relative, upward
    ("from . import select\n", False),                                       # own package
])
def test_the_check_can_fail(tmp_path, source, expect_bad):
    root = tmp_path / "pmp_megatron"
    (root / "pmp").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "pmp" / "__init__.py").write_text("")
    (root / "pmp" / "masks.py").write_text(source)
    assert bool(violations(root)) == expect_bad, violations(root)
