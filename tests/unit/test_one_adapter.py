"""megatron-core is reached through ONE adapter, ``pmp_megatron/mcore.py`` (plus the CPU shim it activates,
``compat/cpu.py``, which patches megatron's GPU assumptions): an upstream move then touches one file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pmp_megatron"
ADAPTER = {"mcore.py", "compat/cpu.py"}


def megatron_imports(source: str) -> list[int]:
    """Lines importing ``megatron`` (module level or inside a function, any form)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "megatron" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == \
                "megatron":
            lines.append(node.lineno)
    return lines


def test_megatron_only_through_the_adapter():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in ADAPTER:
            bad += [f"pmp_megatron/{rel}:{line}" for line in megatron_imports(path.read_text())]
    assert not bad, "megatron-core imported outside mcore.py (add the name to mcore):\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("import megatron.core\n", [1]),
    ("def f():\n    from megatron.core.datasets import x\n", [2]),
    ("from pmp_megatron import mcore\nimport megatronish\n", []),
])
def test_the_scan_can_fail(source, expected):
    assert megatron_imports(source) == expected
