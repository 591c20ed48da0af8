"""The device contract: every torch.distributed collective of the package goes through the helpers in
``pmp_megatron/mcore.py``, which put the tensor on the device the group's backend needs (NCCL rejects
host tensors with "No backend type associated with device type cpu"; gloo rejects CUDA ones).

Each .py under pmp_megatron/ is parsed with ``ast``; a call whose target resolves to a collective of
``torch.distributed`` (or any module under it) fails the test, however torch or torch.distributed was
imported or aliased (``import torch``, ``import torch.distributed as d``, ``from torch import
distributed``, ``from torch.distributed import all_reduce as ar``, relative imports of ``mcore`` and its
re-exported ``dist``, function-local imports, ``x = torch.distributed``)."""

from __future__ import annotations

import ast
from pathlib import Path

from pmp_megatron.testing import REPO

PACKAGE = REPO / "pmp_megatron"
HOME = "pmp_megatron/mcore.py"
COLLECTIVES = frozenset({
    "all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
    "reduce", "reduce_scatter", "all_to_all", "gather", "scatter", "send", "recv", "isend", "irecv",
    "all_gather_into_tensor", "reduce_scatter_tensor", "monitored_barrier",
})
ALLOWED: set[str] = set()  # files allowed to call torch.distributed directly besides mcore.py: none


def _module_name(path: str) -> str:
    """``pmp_megatron/pmp/select.py`` -> ``pmp_megatron.pmp.select`` (``__init__`` -> the package)."""
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _aliases(tree: ast.AST, module: str, is_package: bool) -> dict[str, str]:
    """Local name -> the dotted path it stands for, from every import and plain ``x = a.b`` of the file
    (all scopes together: a function-local import counts like a top-level one)."""
    package = module if is_package else module.rpartition(".")[0]
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = a.name
                else:  # ``import torch.distributed`` binds ``torch``
                    head = a.name.split(".")[0]
                    out[head] = head
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                out[a.asname or a.name] = f"{base}.{a.name}" if a.name != "*" else f"{base}.*"
    for node in ast.walk(tree):  # second pass: ``d = torch.distributed`` style aliases
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target = _dotted(node.value, out)
            if target is not None:
                out[node.targets[0].id] = target
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The dotted path an expression ``a.b.c`` stands for, with ``a`` resolved through ``aliases``."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(attrs)])


def _mcore_reexports() -> dict[str, str]:
    """What ``mcore.<name>`` stands for (``mcore.dist`` is torch.distributed), from mcore's own imports."""
    tree = ast.parse((REPO / HOME).read_text())
    return _aliases(tree, "pmp_megatron.mcore", is_package=False)


def collective_calls(source: str, path: str, reexports: dict[str, str] | None = None) -> list[str]:
    """``path:line name`` of every call of a torch.distributed collective in ``source``."""
    tree = ast.parse(source, filename=path)
    aliases = _aliases(tree, _module_name(path), path.endswith("__init__.py"))
    reexports = _mcore_reexports() if reexports is None else reexports
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = _dotted(node.func, aliases)
        if target is None:
            continue
        prefix = "pmp_megatron.mcore."
        if target.startswith(prefix):  # a name mcore imported, reached through mcore
            head, _, rest = target[len(prefix):].partition(".")
            if head in reexports:
                target = ".".join(filter(None, [reexports[head], rest]))
        parts = target.split(".")
        if parts[:2] == ["torch", "distributed"] and parts[-1] in COLLECTIVES:
            found.append(f"{path}:{node.lineno} {target}")
    return found


def _package_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py"))


def test_collectives_only_in_mcore():
    reexports = _mcore_reexports()
    bad = []
    for path in _package_files():
        if path == HOME or path in ALLOWED:
            continue
        bad += collective_calls((REPO / path).read_text(), path, reexports)
    assert not bad, ("torch.distributed collectives outside pmp_megatron/mcore.py (use mcore.all_reduce, "
                     "mcore.all_gather_object, mcore.barrier, ...; NCCL rejects host tensors):\n"
                     + "\n".join(bad))


def test_the_scan_finds_mcores_own_collectives():
    found = collective_calls((REPO / HOME).read_text(), HOME)
    names = {f.rsplit(".", 1)[-1] for f in found}
    assert {"all_reduce", "all_gather_object", "barrier"} <= names, found


SYNTHETIC = '''
import torch
import torch as th
import torch.distributed as dist
from torch import distributed
from torch.distributed import all_gather_object as gather_objects, distributed_c10d
from .. import mcore
from pmp_megatron import mcore as m

d = torch.distributed


def f(t, group):
    dist.all_reduce(t, group=group)  # collective
    torch.distributed.barrier()  # collective
    th.distributed.broadcast(t, 0)  # collective
    distributed.send(t, 1)  # collective
    gather_objects([None], t)  # collective
    distributed_c10d.reduce_scatter_tensor(t, t)  # collective
    d.monitored_barrier()  # collective
    mcore.dist.all_gather_into_tensor(t, t)  # collective
    m.dist.isend(t, 1)  # collective

    def inner():
        import torch.distributed as local_dist
        from torch.distributed import recv

        local_dist.irecv(t, 0)  # collective
        recv(t, 0)  # collective

    # Not collectives: queries, mcore's helpers, other functions of the same name.
    dist.get_rank(), dist.is_initialized(), dist.ReduceOp.MAX
    mcore.all_reduce(t, group=group)
    m.barrier()
    t.gather(0, t)
    torch.gather(t, 0, t)
    other.barrier()
    return inner
'''


def test_self_check_on_a_synthetic_source():
    found = collective_calls(SYNTHETIC, "pmp_megatron/pmp/example.py")
    expected = [i for i, line in enumerate(SYNTHETIC.splitlines(), 1) if line.endswith("# collective")]
    assert len(expected) == 11
    assert sorted(int(f.split(":")[1].split()[0]) for f in found) == expected, "\n".join(found)
    assert collective_calls("import torch\n\ntorch.cat([])\n", "pmp_megatron/x.py") == []
