"""Checkpoints: megatron-core dist_checkpointing (torch_dist) of model, PMP masks, optimizer, scheduler,
data position and PMP stage -- reshardable to any TP/PP/DP layout, published atomically.

Layout of ``checkpoint.dir``::

    iter_0000100/          a dist checkpoint (one folder per saved iteration)
      pmp_manifest.json    every file of the folder with its size (written last: a folder without it is
                           partial; a size mismatch names the truncated file)
    latest                 the newest complete iteration, replaced atomically

A save writes ``iter_N.tmp/``, then rank 0 writes the manifest, renames the folder into place, updates
``latest`` and keeps the newest ``keep_last``. A load tries ``latest`` and, if that checkpoint is partial
or corrupted, logs which file is wrong and falls back to the previous complete one.

Iteration 0 with ``checkpoint.save_init`` is W0 (the rewind point), masks included in PMP mode.
No RNG state is saved because training draws no random numbers: there is no dropout, and the data order
is a function of the consumed-sample count. That is why a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from pmp_megatron import mcore
from pmp_megatron.pmp import masks as pmp_masks

logger = logging.getLogger(__name__)

MANIFEST = "pmp_manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint folder is partial or corrupted (the message names the file)."""


def iter_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def complete_iterations(root: str | os.PathLike) -> list[int]:
    """Iterations with a published folder, newest first (validity is checked at load)."""
    root = Path(root)
    if not root.is_dir():
        return []
    its = [int(p.name[5:]) for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(its, reverse=True)


def verify(folder: Path) -> None:
    """Raise CheckpointError naming the missing or truncated file."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder} is partial: {MANIFEST} is missing")
    try:
        sizes = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{manifest} is corrupted: {e}") from e
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {path} is truncated or modified "
                                  f"({path.stat().st_size} bytes, expected {size})")


def model_sharded_state_dict(chunks) -> dict:
    chunks = [mcore.unwrap(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _optimizer_sharded_state_dict(optimizer, model_sd, cfg, is_loading: bool):
    metadata = {"distrib_optim_sharding_type": cfg.parallel.data_parallel_sharding}
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)


def build_sharded_state_dict(chunks, optimizer, cfg, common: dict, is_loading: bool) -> dict:
    model_sd = model_sharded_state_dict(chunks)
    state = dict(model_sd)
    if optimizer is not None:
        state["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, cfg, is_loading)
    if pmp_masks.has_masks(chunks) or (is_loading and common.get("has_masks")):
        state["pmp_masks"] = pmp_masks.sharded_state_dict(chunks, empty=is_loading)
    state["common"] = common
    return state


def save(root: str | os.PathLike, iteration: int, chunks, optimizer, cfg, common: dict,
         keep_last: int | None = None) -> Path:
    """Save a checkpoint of ``iteration`` and publish it (every rank calls this)."""
    root = Path(root)
    final = iter_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    mcore.barrier()
    common = dict(common, iteration=iteration, has_masks=pmp_masks.has_masks(chunks))
    state = build_sharded_state_dict(chunks, optimizer, cfg, common, is_loading=False)
    mcore.dist_checkpointing.save(state, str(tmp))
    mcore.barrier()
    if dist.get_rank() == 0:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"iteration": iteration, "files": files}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(root, iteration)
        if keep_last:
            for old in complete_iterations(root)[keep_last:]:
                if old != 0:  # W0 (the rewind point) is kept
                    shutil.rmtree(iter_dir(root, old), ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    mcore.barrier()
    return final


def _write_latest(root: Path, iteration: int) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, root / LATEST)


def latest_valid(root: str | os.PathLike) -> int | None:
    """The newest iteration that passes ``verify`` (logging why newer ones were skipped), else None."""
    for it in complete_iterations(root):
        try:
            verify(iter_dir(root, it))
            return it
        except CheckpointError as e:
            logger.error("skipping checkpoint: %s; falling back to the previous one", e)
    return None


def read_common(root: str | os.PathLike, iteration: int) -> dict:
    """The non-sharded state (iteration, stage, scheduler, data position) without loading tensors."""
    return mcore.dist_checkpointing.load_common_state_dict(str(iter_dir(root, iteration)))["common"]


def load(root: str | os.PathLike, iteration: int, chunks, optimizer, cfg) -> dict:
    """Load ``iteration`` into ``chunks`` (and their masks) and ``optimizer``; return the common state.

    Works at any TP/PP/DP layout: weights and masks are resharded by dist_checkpointing.
    """
    folder = iter_dir(root, iteration)
    verify(folder)
    common = read_common(root, iteration)
    if common.get("iteration", iteration) == 0:
        optimizer = None  # W0 (the rewind point) is saved before any step: Adam has no state yet
    state = build_sharded_state_dict(chunks, optimizer, cfg, common, is_loading=True)
    template = state.get("pmp_masks")
    try:
        loaded = mcore.dist_checkpointing.load(state, str(folder))
    except Exception as e:  # noqa: BLE001 - name the folder whatever the backend raised
        raise CheckpointError(f"could not load checkpoint {folder}: {e}") from e
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        mcore.unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if template is not None:
        pmp_masks.attach_loaded(loaded["pmp_masks"], template)
    return loaded["common"]

