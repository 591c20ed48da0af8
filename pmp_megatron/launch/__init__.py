"""Run pmp_megatron steps on Slurm.

- ``sbatch``: render ``slurm/pretrain.sbatch`` for a pretraining job, record the run directory and
  submit it (``pmp-launch``, ``cli/launch.py``).
- ``rendezvous``: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from the Slurm environment.
- ``submit_array`` / ``gather`` (here): a submitit job array that runs one Python call per element with a
  concurrency cap, and a wait for its results that needs no Slurm accounting, as used for attack grids.

Importing this package pulls in neither torch nor submitit.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pmp_megatron.launch.sbatch import Launch, SlurmOptions, launch, render_sbatch

__all__ = ["Launch", "SlurmOptions", "launch", "render_sbatch", "submit_array", "gather"]

_FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
             "DEADLINE", "PREEMPTED")


def submit_array(fn: Callable[[Any], Any], items: Sequence[Any], folder: str | Path, *,
                 partition: str | None = None, max_parallel: int | None = None, timeout_min: int = 60,
                 cpus_per_task: int = 1, gpus_per_node: int = 0, job_name: str = "pmp-array",
                 setup: Sequence[str] = (), **slurm_parameters: Any) -> list:
    """Submit ``fn(item)`` for each item as one Slurm job array (at most ``max_parallel`` at once).

    ``fn`` and the items are pickled by submitit into ``folder`` (which every node must see); ``setup``
    lines run in the job's shell before Python starts (e.g. ``source venv/bin/activate``). Extra keyword
    arguments are passed to submitit as ``slurm_<name>`` parameters. Returns the submitit jobs.
    """
    if not items:
        raise ValueError("submit_array needs at least one item")
    if max_parallel is not None and max_parallel < 1:
        raise ValueError(f"max_parallel must be >= 1, got {max_parallel}")
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params = {"slurm_partition": partition, "slurm_array_parallelism": max_parallel,
              "slurm_setup": list(setup) or None, "slurm_gpus_per_node": gpus_per_node or None}
    params.update({f"slurm_{k}": v for k, v in slurm_parameters.items()})
    executor.update_parameters(name=job_name, timeout_min=timeout_min, nodes=1, tasks_per_node=1,
                               cpus_per_task=cpus_per_task,
                               **{k: v for k, v in params.items() if v is not None})
    return executor.map_array(fn, list(items))


def _slurm_state(job_id: str) -> str | None:
    """JobState from ``scontrol show job`` (works without slurmdbd/sacct); None once Slurm forgot it."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\bJobState=(\S+)", proc.stdout) if proc.returncode == 0 else None
    return match.group(1) if match else None


def gather(jobs: Sequence, timeout_s: float | None = None, poll_s: float = 1.0) -> list:
    """Wait for the jobs and return their results in order; re-raises a job's error with its log.

    A job counts as finished when its result file exists or Slurm reports a final state (read with
    ``scontrol``, so clusters without accounting work too). ``timeout_s`` bounds the whole wait.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    ended: dict[str, str] = {}  # job id -> final Slurm state, for jobs that left no result file
    pending = list(jobs)
    while pending:
        still = []
        for job in pending:
            if job.paths.result_pickle.exists():
                continue
            state = _slurm_state(job.job_id) or ""
            if state.startswith(_FINISHED):
                ended[job.job_id] = state
            else:
                still.append(job)
        pending = still
        if not pending:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} array job(s) still running after {timeout_s} s: "
                               f"{', '.join(j.job_id for j in pending[:10])}")
        time.sleep(poll_s)
    results = []
    for job in jobs:
        if not _wait_for(job.paths.result_pickle, 10.0):
            _raise_lost(job, ended)
        results.append(job.result())
    return results


def _wait_for(path: Path, seconds: float) -> bool:
    """True once ``path`` exists (a shared filesystem may show it late), False after ``seconds``."""
    end = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
    return True


def _raise_lost(job, ended: dict[str, str]) -> None:
    log = job.paths.stderr.read_text()[-2000:] if job.paths.stderr.exists() else "(no log)"
    raise RuntimeError(f"array job {job.job_id} ended {ended.get(job.job_id, 'unknown')} without a "
                       f"result; end of its stderr:\n{log}")
