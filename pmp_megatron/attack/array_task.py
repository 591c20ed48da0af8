"""One Slurm array task of an attack grid, as submitit runs it: a chunk of cells, in order, each record
appended to the task's own shard.

``ChunkTask`` is submitit ``Checkpointable``: when Slurm signals the task before its time limit (submitit
asks for ``--signal=USR2@90``) or preempts it, submitit calls ``checkpoint`` for the call to requeue, and
requeues the task. The call is the same chunk; its shard already holds the cells that finished, so the
requeued task runs only the rest (a cell cut off mid-run starts again). Without this, a task that reached
its time limit ended there and its remaining cells waited for a rerun of the whole grid.
"""

from __future__ import annotations

import logging

import submitit

from pmp_megatron.attack.runner import AttackContext
from pmp_megatron.attack.suite import Cell


class ChunkTask(submitit.helpers.Checkpointable):
    """``ChunkTask()(cells, ctx, shard_path)``: run the cells of a chunk not yet in its shard; return how
    many ran. ``checkpoint`` (inherited) resubmits the same call."""

    def __call__(self, cells: list[Cell], ctx: AttackContext, shard_path: str) -> int:
        from pmp_megatron.attack.execute import run_cells

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        return len(run_cells(cells, ctx, shard_path, workers=1))
