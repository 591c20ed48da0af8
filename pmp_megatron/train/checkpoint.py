"""Checkpoints: megatron-core dist_checkpointing (torch_dist) of model, PMP masks, optimizer, scheduler,
data position and PMP stage -- reshardable to any TP/PP/DP layout, published atomically, content-hashed.

Layout of a checkpoint root (``checkpoint.dir``, and ``checkpoint.dir/stage1`` for Stage I)::

    iter_0000100/          a dist checkpoint (one folder per saved iteration)
      pmp_manifest.json    every file of the folder with its size and sha256 (written last: a folder
                           without it is partial; a size or hash mismatch names the file)
    latest                 the iteration to resume from, replaced atomically

A save writes ``iter_N.tmp/``; the ranks hash its files (each a share), rank 0 writes the manifest,
renames the folder into place, updates ``latest`` and keeps the newest ``keep_last``. The resume point
is the newest checkpoint that verifies at or below the iteration in ``latest`` (so editing ``latest``
rolls a run back); a checkpoint that fails verification is skipped with the file named in the log.
A full disk during a save raises ``OSError(ENOSPC)`` naming the folder and leaves the previous
checkpoint and ``latest`` as they were.

Iteration 0 with ``checkpoint.save_init`` is W0 (the rewind point), masks included in PMP mode.
No RNG state is saved because training draws no random numbers: there is no dropout, and the data order
is a function of the consumed-sample count. That is why a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from pmp_megatron import mcore
from pmp_megatron.atomic import write_text_atomic
from pmp_megatron.config import Config, config_from_dict
from pmp_megatron.pmp import masks as pmp_masks

logger = logging.getLogger(__name__)

MANIFEST = "pmp_manifest.json"
LATEST = "latest"
_BLOCK = 1 << 20  # bytes read at a time when hashing


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


def read_latest(root: str | os.PathLike) -> int | None:
    """The iteration in ``root/latest``, or None when there is none (or it is not a number: logged)."""
    path = Path(root) / LATEST
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        logger.error("%s holds %r, not an iteration: ignoring it", path, text[:40])
        return None
    return int(text)


def candidates(root: str | os.PathLike) -> list[int]:
    """Published iterations at or below the one in ``latest`` (all of them without it), newest first:
    the resume points in order of preference, before verification."""
    limit = read_latest(root)
    return [it for it in complete_iterations(root) if limit is None or it <= limit]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _read_manifest(folder: Path) -> dict:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder} is partial: {MANIFEST} is missing")
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{manifest} is corrupted: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"{manifest} is corrupted: no 'files' mapping")
    return data


def _check_files(folder: Path, manifest: dict, names: list[str]) -> None:
    """Size and (when the manifest has them) sha256 of ``names``; CheckpointError naming the first bad one."""
    hashes = manifest.get("sha256") or {}
    for name in names:
        path = folder / name
        size = manifest["files"][name]
        try:
            actual = path.stat().st_size if path.is_file() else None
            if actual is None:
                raise CheckpointError(f"checkpoint file {path} is missing")
            if actual != size:
                raise CheckpointError(f"checkpoint file {path} is truncated or modified "
                                      f"({actual} bytes, expected {size})")
            if name in hashes and file_sha256(path) != hashes[name]:
                raise CheckpointError(f"checkpoint file {path} is corrupted (its sha256 differs from the "
                                      f"manifest's, same size {size})")
        except OSError as e:
            raise CheckpointError(f"checkpoint file {path} is unreadable: {e}") from e


def verify(folder: Path) -> None:
    """Check every file of a checkpoint folder against its manifest (size and sha256); raise
    CheckpointError naming the missing, truncated, corrupted or unreadable file. A manifest written
    before hashes were recorded gets the size check only (logged)."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if "sha256" not in manifest:
        logger.warning("%s has no content hashes (saved by an older version): checking sizes only", folder)
    _check_files(folder, manifest, sorted(manifest["files"]))


def verify_collective(folder: Path) -> None:
    """``verify`` shared by every rank (each hashes its share of the files); the same CheckpointError, if
    any, on every rank. All ranks must call it."""
    folder = Path(folder)
    try:
        manifest = _read_manifest(folder)
        names = sorted(manifest["files"])
        rank, world = dist.get_rank(), dist.get_world_size()
        _check_files(folder, manifest, names[rank::world])
        error = None
    except CheckpointError as e:
        error = str(e)
    errors = [e for e in mcore.all_gather_object(error) if e is not None]
    if errors:
        raise CheckpointError(errors[0])
    if "sha256" not in manifest and dist.get_rank() == 0:
        logger.warning("%s has no content hashes (saved by an older version): checked sizes only", folder)


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


# ----------------------------------------------------------------------------- save


def _errno(exc: BaseException, _seen: set | None = None) -> int | None:
    """The errno of an OSError anywhere in ``exc``'s chain, including the per-rank failures that
    torch.distributed.checkpoint wraps (``CheckpointException.failures``), or ENOSPC when only its
    message survived (a writer process's error passed back as text)."""
    seen = set() if _seen is None else _seen
    if exc is None or id(exc) in seen:
        return None
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    nested = [exc.__cause__, exc.__context__]
    failures = exc.failures.values() if isinstance(exc, CheckpointException) else ()
    nested += [f[0] if isinstance(f, tuple) else f for f in failures]  # (exception, traceback) per rank
    nested += [a for a in exc.args if isinstance(a, BaseException)]
    for inner in nested:
        if isinstance(inner, BaseException) and (code := _errno(inner, seen)):
            return code
    return errno.ENOSPC if "No space left on device" in str(exc) else None


def _agree(error: BaseException | None, final: Path, tmp: Path) -> None:
    """Collective: if any rank failed, remove the partial ``tmp`` (rank 0) and raise on every rank --
    ``OSError(ENOSPC)`` naming the folder when a disk was full, else the failing rank's own error (a
    CheckpointError quoting it on the others)."""
    codes = mcore.all_gather_object(None if error is None else (_errno(error), f"{type(error).__name__}: "
                                                                             f"{error}"))
    failed = [(rank, c) for rank, c in enumerate(codes) if c is not None]
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if any(code == errno.ENOSPC for _, (code, _) in failed):
        raise OSError(errno.ENOSPC, f"no space left on device while saving checkpoint {final} (the previous "
                                    f"checkpoint and '{LATEST}' are unchanged)", str(final)) from error
    if error is not None:
        raise error
    rank, (_, message) = failed[0]
    raise CheckpointError(f"saving checkpoint {final} failed on rank {rank}: {message}")


def save(root: str | os.PathLike, iteration: int, chunks, optimizer, cfg, common: dict,
         keep_last: int | None = None) -> Path:
    """Save a checkpoint of ``iteration`` and publish it (every rank calls this)."""
    root = Path(root)
    final = iter_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    error = None
    if dist.get_rank() == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    _agree(error, final, tmp)
    common = dict(common, iteration=iteration, has_masks=pmp_masks.has_masks(chunks))
    state = build_sharded_state_dict(chunks, optimizer, cfg, common, is_loading=False)
    error = None
    try:
        mcore.dist_checkpointing.save(state, str(tmp))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank must learn of any failure
        error = e
    _agree(error, final, tmp)
    # Every file is written now; each rank hashes a share of them.
    error, mine = None, {}
    try:
        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        mine = {n: ((tmp / n).stat().st_size, file_sha256(tmp / n))
                for n in names[dist.get_rank()::dist.get_world_size()]}
    except OSError as e:
        error = e
    _agree(error, final, tmp)
    entries = {}
    for part in mcore.all_gather_object(mine):
        entries.update(part)
    error = None
    if dist.get_rank() == 0:
        try:
            _publish(root, iteration, tmp, final, dict(sorted(entries.items())), keep_last)
        except OSError as e:
            error = e
    _agree(error, final, tmp)
    return final


def _publish(root: Path, iteration: int, tmp: Path, final: Path, entries: dict,
             keep_last: int | None) -> None:
    """Rank 0: manifest, rename into place, ``latest``, pruning."""
    manifest = {"iteration": iteration, "files": {n: size for n, (size, _) in entries.items()},
                "sha256": {n: digest for n, (_, digest) in entries.items()}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    old = final.with_name(final.name + ".old")
    if final.exists():  # a rolled-back run saving an iteration again: the new one replaces it
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    write_text_atomic(root / LATEST, f"{iteration}\n")
    if keep_last:
        # Only iterations up to this one count: newer folders left by a rollback are not ours to prune.
        for it in [i for i in complete_iterations(root) if i <= iteration][keep_last:]:
            if it != 0:  # W0 (the rewind point) is kept
                shutil.rmtree(iter_dir(root, it), ignore_errors=True)
    logger.info("saved checkpoint %s", final)


# ----------------------------------------------------------------------------- load


def latest_valid(root: str | os.PathLike) -> int | None:
    """The newest iteration at or below ``latest`` that passes ``verify`` (logging, with the file, why
    newer ones were skipped), else None. One process; see ``verify_collective`` for a world."""
    for it in candidates(root):
        try:
            verify(iter_dir(root, it))
            return it
        except CheckpointError as e:
            logger.error("skipping checkpoint: %s; falling back to the previous one", e)
    return None


def read_common(root: str | os.PathLike, iteration: int) -> dict:
    """The non-sharded state (iteration, stage, scheduler, data position) without loading tensors."""
    folder = iter_dir(root, iteration)
    try:
        return mcore.dist_checkpointing.load_common_state_dict(str(folder))["common"]
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a corrupted common state, whatever raised
        raise CheckpointError(f"could not read the common state of checkpoint {folder}: "
                              f"{type(e).__name__}: {e}") from e


def load(root: str | os.PathLike, iteration: int, chunks, optimizer, cfg, verify_files: bool = True,
         weights_only: bool = False) -> dict:
    """Load ``iteration`` into ``chunks`` (and their masks) and ``optimizer``; return the common state.

    Works at any TP/PP/DP layout: weights and masks are resharded by dist_checkpointing. ``verify_files``
    False skips ``verify`` (the caller ran ``verify_collective``). ``weights_only`` reads the model weights
    alone (no masks; pass no optimizer). Any failure is a CheckpointError naming the folder.
    """
    folder = iter_dir(root, iteration)
    if verify_files:
        verify(folder)
    common = read_common(root, iteration)
    if common.get("iteration", iteration) == 0:
        optimizer = None  # W0 (the rewind point) is saved before any step: Adam has no state yet
    wanted = dict(common, has_masks=False) if weights_only else common
    state = build_sharded_state_dict(chunks, optimizer, cfg, wanted, is_loading=True)
    template = state.get("pmp_masks")
    try:
        loaded = mcore.dist_checkpointing.load(state, str(folder))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - name the folder whatever the backend raised
        raise CheckpointError(f"could not load checkpoint {folder}: {e}") from e
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        mcore.unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if template is not None:
        pmp_masks.attach_loaded(loaded["pmp_masks"], template)
    return loaded["common"]


def resolve_iteration(ckpt_root: str | Path, iteration: int | None = None) -> int:
    """The iteration to read: ``iteration`` if its folder is complete, else the newest valid one."""
    root = Path(ckpt_root)
    if not root.is_dir():
        raise ValueError(f"checkpoint directory {str(root)!r} does not exist")
    if iteration is None:
        iteration = latest_valid(root)
        if iteration is None:
            raise ValueError(f"no valid iteration in checkpoint directory {str(root)!r} "
                             f"(no complete iter_* folder)")
    folder = iter_dir(root, iteration)
    if not folder.is_dir():
        found = complete_iterations(root)
        raise ValueError(f"checkpoint {str(folder)!r} does not exist (iterations present: {found})")
    try:
        verify(folder)
    except CheckpointError as e:
        raise ValueError(f"checkpoint iteration {iteration} is not valid: {e}") from e
    return iteration


def checkpoint_config(ckpt_root: str | Path, iteration: int) -> tuple[Config, dict]:
    """(the run's Config, the checkpoint's common state) of a resolved iteration."""
    mcore.init_distributed()
    common = read_common(ckpt_root, iteration)
    if "config" not in common:
        raise ValueError(f"checkpoint {str(iter_dir(ckpt_root, iteration))!r} has no 'config' "
                         f"in its common state (not written by pmp-pretrain?)")
    return config_from_dict(saved_config_dict(common)), common


def saved_config_dict(common: dict) -> dict:
    """A copy of a checkpoint's config dict that ``config_from_dict`` accepts: a ``model.seed_file`` run
    saved both the seed it read and the file's path, which exclude each other in a config; the checkpoint's
    seed is the one that counts, so the path is dropped."""
    d = copy.deepcopy(common["config"])
    if d.get("model", {}).get("seed") is not None:
        d["model"]["seed_file"] = None
    return d
