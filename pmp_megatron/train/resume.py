"""Where a run starts, whether this config may continue it, and its W0 seed.

- ``find_start``: the newest Stage II checkpoint of the run dir that verifies; else the newest Stage I
  checkpoint (``run_dir/stage1``, written while Stage I runs); else None, a fresh run. A run dir whose
  Stage II checkpoints all fail verification is refused, never restarted over.
- ``check_compatible``: a resumed run's ``model.*`` and ``pmp.*`` settings and W0 seed must be its
  checkpoint's, else ONE ValueError naming every differing field (old -> new), raised before the run
  writes anything. ``checkpoint.allow_changes`` lets named fields change on purpose (logged); ``pmp.mode``,
  ``pmp.rho``, the seed and the tensor shapes never change (``config.RESUME_FIXED``).
- ``resolve_seed``: the W0 seed, set in the config in memory: the checkpoint's on resume; a fresh secret
  128-bit one drawn from OS entropy on rank 0 and shared when ``model.seed`` is None; else the given,
  public, int. A secret seed lives only in the checkpoints' common state (``public_config`` is what the
  run dir's config.yaml shows).
- ``load_with_fallback``: load a checkpoint into freshly built objects, falling back to the next older
  valid one when a load fails.

Every function here is collective: all ranks call it and get the same answer.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pmp_megatron import mcore
from pmp_megatron.config import RESUME_FIXED, Config, resume_differences
from pmp_megatron.train import checkpoint

logger = logging.getLogger(__name__)

STAGE1_DIR = "stage1"  # Stage I checkpoints, inside the run dir; removed once iteration 0 is saved
SECRET = "<secret>"  # how a secret seed is shown


@dataclass(frozen=True)
class Start:
    """A checkpoint to resume from."""

    root: Path  # the checkpoint root: the run dir, or its ``stage1`` folder
    iteration: int  # the optimizer step (Stage II) or Stage-I step it was saved at
    common: dict  # its common state (config, scheduler, data position, ...)

    @property
    def stage1(self) -> bool:
        return self.root.name == STAGE1_DIR


def _rank0_log(level: int, msg: str, *args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.log(level, msg, *args)


def _common(root: Path, iteration: int) -> dict:
    """The checkpoint's common state, read on rank 0 and shared (CheckpointError on every rank)."""
    result: Any = None
    if dist.get_rank() == 0:
        try:
            result = checkpoint.read_common(root, iteration)
        except checkpoint.CheckpointError as e:
            result = e
    result = mcore.broadcast_object(result if isinstance(result, dict) else str(result))
    if isinstance(result, str):
        raise checkpoint.CheckpointError(result)
    return result


def valid_checkpoints(root: Path, below: int | None = None):
    """Yield (iteration, common state) of every checkpoint of ``root`` at or below ``latest`` (and below
    ``below``) that verifies, newest first, logging each one skipped with the file at fault."""
    for it in checkpoint.candidates(root):
        if below is not None and it >= below:
            continue
        try:
            checkpoint.verify_collective(checkpoint.iter_dir(root, it))
            common = _common(root, it)
        except checkpoint.CheckpointError as e:
            _rank0_log(logging.ERROR, "skipping checkpoint: %s; falling back to the previous one", e)
            continue
        yield it, common


def find_start(run_dir: Path) -> Start | None:
    """The resume point of ``run_dir`` (see the module docstring), or None for a fresh run."""
    run_dir = Path(run_dir)
    for it, common in valid_checkpoints(run_dir):
        return Start(run_dir, it, common)
    published = checkpoint.complete_iterations(run_dir)
    if published:
        raise checkpoint.CheckpointError(
            f"checkpoint.dir {run_dir} holds checkpoints {sorted(published)} but none at or below "
            f"'{checkpoint.LATEST}' ({checkpoint.read_latest(run_dir)}) verifies (see the errors above); "
            f"refusing to start afresh over them: repair or move them, or point '{checkpoint.LATEST}' at "
            f"a good one")
    for it, common in valid_checkpoints(run_dir / STAGE1_DIR):
        return Start(run_dir / STAGE1_DIR, it, common)
    return None


def check_compatible(cfg: Config, start: Start) -> None:
    """ValueError naming every model.* / pmp.* field (and the seed) in which ``cfg`` differs from the
    checkpoint's config, unless ``checkpoint.allow_changes`` names it; allowed changes are logged."""
    folder = checkpoint.iter_dir(start.root, start.iteration)
    saved = start.common.get("config")
    if saved is None:
        raise ValueError(f"checkpoint {folder} has no 'config' in its common state (not written by "
                         f"pmp-pretrain?): it cannot be resumed")
    secret = start.common.get("w0_seed_secret", False)
    allowed = set(cfg.checkpoint.allow_changes)
    refused = []
    for name, old, new in resume_differences(saved, cfg):
        shown = SECRET if name == "model.seed" and secret else repr(old)
        if name in allowed:
            _rank0_log(logging.WARNING, "resuming %s with %s changed on purpose (checkpoint.allow_changes): "
                                        "%s -> %r", folder, name, shown, new)
        else:
            refused.append((name, shown, new))
    if not refused:
        return
    names = {name for name, _, _ in refused}
    lines = [f"cannot resume checkpoint {folder}: this config differs from the checkpoint's in "
             + ", ".join(f"{name} ({old} -> {new!r})" for name, old, new in refused) + "."]
    mode = saved.get("pmp", {}).get("mode", "pmp")
    if "pmp.mode" in names and mode == "pmp":
        lines.append("A PMP checkpoint resumed with pmp.mode=dense would train the complement (the weights "
                     "outside the private mask) freely.")
    elif "pmp.mode" in names:
        lines.append("The checkpoint is a dense run: it has no Stage-I mask, so PMP mode cannot continue it; "
                     "start PMP in a new checkpoint.dir.")
    fixed = sorted(names & set(RESUME_FIXED))
    if fixed:
        lines.append(f"{', '.join(fixed)} cannot change in a resumed run: use the checkpoint's value or a "
                     "new checkpoint.dir.")
    free = sorted(names - set(RESUME_FIXED))
    if free:
        lines.append(f"To change {', '.join(free)} on purpose, set checkpoint.allow_changes="
                     f"[{','.join(free)}]; else resume with the checkpoint's values.")
    raise ValueError(" ".join(lines))


def resolve_seed(cfg: Config, start: Start | None) -> bool:
    """Set ``cfg.model.seed`` (in memory) to the run's W0 seed; return whether it is secret."""
    from_file = read_seed_file(cfg.model.seed_file) if cfg.model.seed_file else None
    if start is not None:
        cfg.model.seed = start.common["config"]["model"].get("seed")
        if from_file is not None and from_file != cfg.model.seed:
            raise ValueError(f"model.seed_file {cfg.model.seed_file} holds another W0 seed than the "
                             f"checkpoint it resumes")
        secret = bool(start.common.get("w0_seed_secret", False))
        _rank0_log(logging.INFO, "W0 seed: %s, from the checkpoint", "secret" if secret else
                   f"public ({cfg.model.seed})")
        return secret
    if from_file is not None:
        cfg.model.seed = from_file
        _rank0_log(logging.INFO, "W0 seed: secret, from model.seed_file")
        return True
    if cfg.model.seed is None:
        cfg.model.seed = mcore.broadcast_object(secrets.randbits(128) if dist.get_rank() == 0 else None)
        _rank0_log(logging.INFO, "W0 seed: secret (128 bits from OS entropy), kept only in the checkpoints")
        return True
    _rank0_log(logging.WARNING, "W0 seed: model.seed=%d is PUBLIC: anyone who knows it regenerates W0 and "
                                "with it the private mask; leave model.seed unset for a secret seed",
               cfg.model.seed)
    return False


def read_seed_file(path: str) -> int:
    """The secret W0 seed in ``path`` (a decimal integer); ValueError naming the file otherwise."""
    import os
    import stat

    try:
        text = open(path, encoding="ascii").read().strip()  # noqa: SIM115 - read at once
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"model.seed_file {path}: cannot read it ({err})") from err
    if not text.isdigit():
        raise ValueError(f"model.seed_file {path}: expected one non-negative decimal integer")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"model.seed_file {path} is readable by others (mode {stat.S_IMODE(mode):o}): "
                         f"chmod 600 it")
    return int(text)


def public_config(cfg: Config, secret: bool) -> Config:
    """``cfg`` as the run dir may show it: a secret seed replaced by None."""
    if not secret:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, seed=None))


def load_with_fallback(cfg: Config, start: Start, make: Callable[[], tuple[list, Any]],
                       load_cfg: Config | None = None) -> tuple[Start, list, Any]:
    """Load ``start`` into the model chunks and optimizer ``make()`` builds; when that fails on any rank,
    log why and try the next older valid checkpoint of the same root (checked with ``check_compatible``)
    in newly built objects. Returns (the checkpoint loaded, model, optimizer); CheckpointError when none
    loads. ``load_cfg``: the config the objects were built with (default ``cfg``)."""
    errors = []
    tried = start
    while True:
        model, optimizer = make()
        error = None
        try:
            common = checkpoint.load(tried.root, tried.iteration, model, optimizer, load_cfg or cfg,
                                     verify_files=False)
        except checkpoint.CheckpointError as e:
            error = str(e)
        failed = [e for e in mcore.all_gather_object(error) if e is not None]
        if not failed:
            return Start(tried.root, tried.iteration, common), model, optimizer
        errors.append(failed[0])
        _rank0_log(logging.ERROR, "%s; falling back to the previous checkpoint", failed[0])
        del model, optimizer
        older = next(valid_checkpoints(tried.root, below=tried.iteration), None)
        if older is None:
            raise checkpoint.CheckpointError(f"no checkpoint in {start.root} could be loaded: "
                                             + "; ".join(errors))
        tried = Start(tried.root, *older)
        check_compatible(cfg, tried)


# model.* fields that fix the weights' shapes and tying: they must match checkpoint.init_from's
INIT_ARCH = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
             "vocab_size", "untie_embeddings")


def init_weights(cfg: Config, chunks) -> int:
    """Load the model weights of ``checkpoint.init_from``'s newest valid iteration into ``chunks`` (this
    rank's shards at this run's layout, resharded by dist_checkpointing; no optimizer state, no masks);
    return that iteration. ValueError naming ``checkpoint.init_from`` for a missing or mismatched one."""
    root = Path(cfg.checkpoint.init_from)
    iteration = checkpoint.latest_valid(root) if root.is_dir() else None
    if iteration is None:
        raise ValueError(f"checkpoint.init_from {str(root)!r} holds no valid checkpoint (an iter_* folder "
                         f"written by pmp-pretrain or pmp-import-hf)")
    saved = _common(root, iteration).get("config", {}).get("model", {})
    differ = [f"model.{f} ({saved.get(f)!r} there, {getattr(cfg.model, f)!r} here)" for f in INIT_ARCH
              if saved.get(f) != getattr(cfg.model, f)]
    if differ:
        raise ValueError(f"checkpoint.init_from {str(root)!r} has another architecture: {', '.join(differ)}")
    checkpoint.load(root, iteration, chunks, None, cfg, weights_only=True)
    _rank0_log(logging.INFO, "initialised the weights from %s (weights only)",
               checkpoint.iter_dir(root, iteration))
    return iteration
