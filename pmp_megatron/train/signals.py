"""Preemption: SIGTERM / SIGUSR2 set a flag; all ranks agree on it at the next step boundary, then the
trainer saves a checkpoint and exits with ``REQUEUE_EXIT_CODE`` so a launcher (Slurm ``--requeue``,
``slurm/pretrain.sbatch``) can requeue the job, which resumes from that checkpoint."""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

from pmp_megatron import mcore

logger = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 42
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
    from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue

    sigs = (signal.SIGTERM, signal.SIGUSR2)
    previous = [signal.signal(sig, signal.SIG_IGN) for sig in sigs]
    try:
        get_write_results_queue()
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
