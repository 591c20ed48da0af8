"""Preemption: SIGTERM / SIGUSR2 set a flag; all ranks agree on it at the next step boundary, then the
trainer saves a checkpoint and exits with ``REQUEUE_EXIT_CODE`` so a launcher (Slurm ``--requeue``,
``slurm/pretrain.sbatch``) can requeue the job, which resumes from that checkpoint.

An exit code does not survive every launcher: under torchrun a worker that exits 42 makes torchrun exit 1,
like any crash. So ``requeue_exit`` also leaves a marker file (``MARKER_NAME``) that the launcher reads
when the step fails; ``slurm/pretrain.sbatch`` removes it before each step, so an old one never turns a
crash into a requeue."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pmp_megatron import mcore
from pmp_megatron.atomic import write_text_atomic

logger = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 42
MARKER_NAME = ".requeue"
MARKER_ENV = "PMP_REQUEUE_MARKER"  # where the launcher wants the marker (set by slurm/pretrain.sbatch)
_requested = False


def _handler(signum, frame):
    global _requested
    _requested = True
    logger.warning("received %s: will checkpoint and exit at the next step boundary",
                   signal.Signals(signum).name)


def install() -> None:
    """Install the handlers. First start dist_checkpointing's writer-results manager process with the
    signals ignored: Slurm signals every process of a step, and that helper (a multiprocessing Manager)
    would otherwise die on SIGUSR2, breaking the very checkpoint the signal asks for."""
    sigs = (signal.SIGTERM, signal.SIGUSR2)
    previous = [signal.signal(sig, signal.SIG_IGN) for sig in sigs]
    try:
        mcore.get_write_results_queue()
    finally:
        for sig, handler in zip(sigs, previous, strict=True):
            signal.signal(sig, handler)
    for sig in sigs:
        signal.signal(sig, _handler)


def stop_agreed() -> bool:
    """True on every rank if any rank received a preemption signal (one all-reduce)."""
    flag = torch.tensor([1 if _requested else 0], dtype=torch.int32)
    if dist.is_initialized():
        mcore.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def requeue_exit(run_dir: str | os.PathLike | None, iteration: int | None = None) -> int:
    """Call on every rank once the preemption checkpoint is saved; returns ``REQUEUE_EXIT_CODE``.

    Global rank 0 atomically writes the marker, holding the iteration and the time, to ``$PMP_REQUEUE_MARKER``
    when that is set, else to ``run_dir/.requeue`` (no marker without either). A barrier then holds every
    rank until it exists, so no rank's exit can end the step (torchrun, srun) before the marker is there.
    """
    marker = os.environ.get(MARKER_ENV) or (Path(run_dir) / MARKER_NAME if run_dir else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and marker is not None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_text_atomic(marker, f"iteration {iteration} time {stamp}\n")
        logger.warning("preemption checkpoint saved: requeue marker %s", marker)
    if dist.is_initialized():
        mcore.barrier()
    return REQUEUE_EXIT_CODE
