"""Preemption: SIGTERM / SIGUSR2 set a flag; all ranks agree on it at the next step boundary, then the
trainer saves a checkpoint and exits with ``REQUEUE_EXIT_CODE`` so a launcher (Slurm ``--requeue``,
``slurm/pretrain.sbatch``) can requeue the job, which resumes from that checkpoint."""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 42
_requested = False


def _handler(signum, frame):
    global _requested
    _requested = True
    logger.warning("received %s: will checkpoint and exit at the next step boundary",
                   signal.Signals(signum).name)


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, _handler)


def stop_agreed() -> bool:
    """True on every rank if any rank received a preemption signal (one all-reduce)."""
    flag = torch.tensor([1 if _requested else 0], dtype=torch.int32)
    if torch.cuda.is_available():
        flag = flag.cuda()
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
