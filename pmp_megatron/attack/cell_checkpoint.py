"""The saved state of an attack cell interrupted on the megatron engine (``attack.megatron_engine``), so the
requeued job resumes it and writes its record once.

A cell folder ``<results>.cells/<cell id>/`` holds one file per rank (``rank00000.pt``: this rank's
parameter shards, its optimizer state, the cell's ``cell_loop.Progress``), each written atomically, and,
once every rank has written, ``complete.json`` (the cell, its step and the layout). A folder without it
is partial and ignored (the cell starts again). The state is per rank, so it resumes at the layout it was
saved at; another layout is refused by name. It is transient: the folder goes once the cell's record is
in the results (``remove``), and a rerun removes those of cells already there (``remove_finished``).

The masks and the frozen complement are not saved: the attacker's mask is recomputed from its inputs, and
the complement still holds the release's values (``MaskedUpdate`` keeps them bit for bit).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import torch

from pmp_megatron import mcore
from pmp_megatron.atomic import write_bytes_atomic, write_text_atomic
from pmp_megatron.attack.cell_loop import Progress
from pmp_megatron.attack.suite import Cell
from pmp_megatron.model.params import shard_infos

logger = logging.getLogger(__name__)

COMPLETE = "complete.json"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _layout() -> list[int]:
    return [mcore.tp_size(), mcore.pp_size(), mcore.dp_size()]


def exists(cell_dir: Path) -> bool:
    """Whether ``cell_dir`` holds a complete saved state (every rank checks the same shared folder)."""
    return (cell_dir / COMPLETE).is_file()


def save(cell_dir: Path, cell: Cell, progress: Progress, chunks, vocab_size: int, optimizer) -> None:
    """Every rank writes its state; then rank 0 marks the folder complete (collective)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    params = {name: p.detach().cpu() for name, (p, _) in shard_infos(chunks, vocab_size).items()}
    state = {"cell": cell.id, "ran": progress.ran, "losses": progress.losses.cpu(), "curve": progress.curve,
             "score_curve": progress.score_curve, "params": params, "optimizer": optimizer.state_dict()}
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(cell_dir / f"rank{_rank():05d}.pt", buf.getvalue())
    mcore.barrier()
    if _rank() == 0:
        write_text_atomic(cell_dir / COMPLETE, json.dumps(
            {"cell": cell.id, "step": progress.ran, "world": _world(), "layout": _layout()}) + "\n")
    mcore.barrier()
    logger.warning("cell %s: state saved at step %d in %s", cell.id, progress.ran, cell_dir)


@torch.no_grad()
def load(cell_dir: Path, cell: Cell, chunks, vocab_size: int, optimizer) -> Progress:
    """Put this rank's saved shards and optimizer state back; return the cell's progress."""
    meta = json.loads((cell_dir / COMPLETE).read_text())
    if meta["cell"] != cell.id or meta["world"] != _world() or meta["layout"] != _layout():
        raise ValueError(f"cell state {cell_dir} was saved by {meta['world']} processes at TP, PP, DP "
                         f"{meta['layout']}; this job runs {_world()} at {_layout()}: rerun at that layout "
                         "or delete the folder (the cell then starts again)")
    state = torch.load(cell_dir / f"rank{_rank():05d}.pt", map_location="cpu", weights_only=False)
    for name, (param, _) in shard_infos(chunks, vocab_size).items():
        param.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    logger.warning("cell %s: resumed from step %d (%s)", cell.id, state["ran"], cell_dir)
    return Progress(state["losses"], state["curve"], state["score_curve"], state["ran"])


def remove(cell_dir: Path) -> None:
    shutil.rmtree(cell_dir, ignore_errors=True)


def remove_finished(root: Path, done: set[str]) -> None:
    """Remove the saved states of cells whose record is already in the results."""
    if root.is_dir():
        for cell_dir in root.iterdir():
            if cell_dir.name in done:
                remove(cell_dir)
