"""torch.distributed rendezvous from the Slurm environment.

Inside an allocation every task knows its place from Slurm (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``, ``SLURM_JOB_NODELIST``, ``SLURM_JOB_ID``); torch wants ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. This module maps one onto the other:

- ``MASTER_ADDR`` is the address of the first host of the allocation: the hostnames come from
  ``scontrol show hostnames`` (or, without scontrol, from ``expand_nodelist``, a parser of the
  compressed syntax ``node[01-03,07]``), and the address is that node's ``NodeAddr`` from
  ``scontrol show node`` (falling back to the hostname itself).
- ``MASTER_PORT`` is ``20000 + job_id % 20000``: the same for every task of a job and across requeues
  of it, different for jobs that share a node.

Used from the sbatch template (``slurm/pretrain.sbatch``) in two ways::

    eval "$(python -m pmp_megatron.launch.rendezvous --export)"   # batch shell: MASTER_ADDR/PORT once
    srun python -m pmp_megatron.launch.rendezvous pmp-pretrain ...  # each task: set RANK etc., exec

The exec form keeps ``MASTER_ADDR``/``MASTER_PORT`` that are already exported (so the 1000 tasks of a
big job do not each ask slurmctld) and replaces itself with the command, which then receives Slurm's
signals (USR2/TERM) directly. Stdlib only: no torch import, starts in milliseconds.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping

__all__ = ["expand_nodelist", "hostnames", "node_address", "master_port", "rendezvous_env", "main"]

BASE_PORT = 20000
PORT_SPAN = 20000


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,2],b`` -> ``['a[1,2]', 'b']``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm nodelist {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in Slurm nodelist {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range(spec: str, nodelist: str) -> list[str]:
    """``01-03,07`` -> ``['01', '02', '03', '07']`` (zero padding kept from the lower bound)."""
    out = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise ValueError(f"bad range {item!r} in Slurm nodelist {nodelist!r}")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in Slurm nodelist {nodelist!r}")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed hostlist: ``gpu[01-02,07],login1`` -> ``[gpu01, gpu02, gpu07, login1]``.

    Several bracket groups in one name (``rack[1-2]-n[1-2]``) expand as a product, in Slurm's order.
    """
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        if not part:
            continue
        pieces = re.split(r"\[([^\]]*)\]", part)  # literal, range, literal, range, ..., literal
        choices = [[p] if i % 2 == 0 else _expand_range(p, nodelist) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise ValueError(f"empty Slurm nodelist {nodelist!r}")
    return hosts


def _scontrol(*args: str) -> str | None:
    """stdout of ``scontrol ARGS``, or None when scontrol is missing or fails."""
    try:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def hostnames(nodelist: str) -> list[str]:
    """The hosts of a nodelist, via ``scontrol show hostnames`` when available, else ``expand_nodelist``."""
    out = _scontrol("show", "hostnames", nodelist)
    hosts = out.split() if out else []
    return hosts or expand_nodelist(nodelist)


def node_address(host: str) -> str:
    """The node's ``NodeAddr`` as slurmctld knows it (often the hostname itself); ``host`` if unknown."""
    out = _scontrol("show", "node", host)
    match = re.search(r"\bNodeAddr=(\S+)", out or "")
    return match.group(1) if match else host


def master_port(job_id: int | str) -> int:
    """Rendezvous port for a job: ``20000 + job_id % 20000`` (stable across requeues)."""
    return BASE_PORT + int(job_id) % PORT_SPAN


def _require(env: Mapping[str, str], name: str) -> str:
    if name not in env:
        raise ValueError(f"{name} is not set: run this inside a Slurm allocation (sbatch/srun)")
    return env[name]


def rendezvous_env(env: Mapping[str, str] | None = None, *, per_task: bool = True) -> dict[str, str]:
    """torch.distributed variables for this Slurm task.

    ``MASTER_ADDR``/``MASTER_PORT`` already present in ``env`` are kept; otherwise they are computed
    from ``SLURM_JOB_NODELIST`` and ``SLURM_JOB_ID``. With ``per_task`` also ``RANK``, ``WORLD_SIZE``
    and ``LOCAL_RANK`` from ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID`` (set by srun).
    """
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    if "MASTER_ADDR" in env:
        out["MASTER_ADDR"] = env["MASTER_ADDR"]
    else:
        first = hostnames(_require(env, "SLURM_JOB_NODELIST"))[0]
        out["MASTER_ADDR"] = node_address(first)
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(master_port(_require(env, "SLURM_JOB_ID")))
    if per_task:
        out["RANK"] = _require(env, "SLURM_PROCID")
        out["WORLD_SIZE"] = _require(env, "SLURM_NTASKS")
        out["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    return out


_USAGE = """usage: python -m pmp_megatron.launch.rendezvous --export
       python -m pmp_megatron.launch.rendezvous COMMAND [ARGS...]

--export   print 'export MASTER_ADDR=... MASTER_PORT=...' for the batch shell to eval
COMMAND    set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from Slurm and exec COMMAND
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring. Returns an exit code (``exec`` does not return)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_USAGE)
        return 0 if argv else 2
    if argv[0] == "--export":
        # Recompute in the batch shell: a MASTER_ADDR inherited from the submitting shell is stale.
        fresh = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
        env = rendezvous_env(fresh, per_task=False)
        sys.stdout.write("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
        return 0
    os.environ.update(rendezvous_env())
    os.execvp(argv[0], argv)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
