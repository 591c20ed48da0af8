"""The ``dense-matched`` control: a dense run from the PMP run's W0 whose base loss matches the PMP release's.

A gain ratio between a PMP release and the dense baseline is confounded by PMP's worse start (a weaker
dense model would also gain more). The control is a dense run with the PMP run's exact config (model,
data, optimizer, schedule shape, eval settings) and the SAME W0, trained for fewer steps ``s`` -- the whole
LR schedule spans ``s`` steps ("full schedule, fewer tokens") -- with ``s`` chosen so that its final
validation loss is within ``tolerance`` (relative) of the target: the PMP run's final validation loss, or
an explicit one.

Each attempt is a real ``pmp-pretrain`` run (a torchrun subprocess: a clean state per run) with the
PMP run's checkpointed config and these overrides:

- ``pmp.mode=dense``, ``train.train_steps=s``;
- warmup rule: the schedule is the PMP run's stretched to ``s`` steps, so the warmup keeps its share of the
  run: ``round(W * s / S)`` steps (W, S: the PMP run's warmup and steps), at least 1 when W > 0 and at most
  ``s - 1``. A fixed W would take a growing share of shorter runs and bend the loss-vs-steps curve;
- eval rule: the run evaluates as many times as the PMP run, ``n = S // E`` (E: its eval interval), every
  ``s / n`` steps, with ``s`` a multiple of ``n``. The trainer sizes the validation split by the number of
  evaluations, so the dense run scores the very samples the PMP run was scored on, and its last
  evaluation is at its last step;
- W0: a public seed is passed as ``model.seed``; a secret one (``w0_seed_secret`` in the checkpoint) is
  written once to ``OUT/w0_seed`` (mode 0600) and passed as ``model.seed_file``: it reaches no command
  line, config.yaml or log;
- ``checkpoint.dir=OUT/steps_<s>`` (every attempt's run dir is kept), the attempt's log in
  ``OUT/logs/steps_<s>.log``, then the caller's overrides (e.g. the parallel layout, ``data.num_workers``).

The search on ``s`` assumes the final loss decreases with ``s`` (monotone-ish): it starts at the PMP run's
steps, steps by factors of 2 (or a secant extrapolation in log s) until the target is bracketed, then
interpolates in log s inside the bracket (bisecting in log s when an end stalls) until an attempt is
within tolerance or ``max_runs`` attempts were made. The search is a function of the attempts' losses
only, so a rerun into the same OUT replays it and reuses every finished attempt (an unfinished one resumes
from its checkpoint). ``OUT/dense_matched.json`` records every attempt (steps, warmup, final valid loss,
relative error) and the chosen one; its run dir is the control's checkpoint (``pmp-release`` makes it a
Hugging Face release; ``pmp-dense-matched --release DIR`` does it after the search).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pmp_megatron.atomic import write_text_atomic
from pmp_megatron.config import Config, config_to_dict, load_config, save_config

logger = logging.getLogger(__name__)

SUMMARY = "dense_matched.json"
SEED_FILE = "w0_seed"
BASE_CONFIG = "pmp_config.yaml"  # the PMP run's checkpointed config, a secret seed removed
# A caller that read a checkpoint holds a world of one; torchrun sets these for its own workers.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RunFailed(RuntimeError):
    """A dense attempt's ``pmp-pretrain`` exited non-zero (``returncode``; 42: preempted, rerun to resume)."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


@dataclass
class Attempt:
    steps: int  # train.train_steps of this dense run
    warmup: int  # its optim.lr_warmup_steps
    eval_interval: int  # its train.eval_interval
    valid_loss: float  # its final validation loss (at its last step)
    rel_error: float  # (valid_loss - target) / target
    dir: str  # its checkpoint / run dir


# ----------------------------------------------------------------------------- the PMP run


def read_pmp_run(run_dir: str | os.PathLike) -> tuple[Config, bool]:
    """(the PMP run's config with its W0 seed, whether the seed is secret) from its final checkpoint;
    ValueError naming the directory when it is not a finished PMP run."""
    from pmp_megatron.train import checkpoint

    run_dir = Path(run_dir)
    iteration = checkpoint.latest_valid(run_dir) if run_dir.is_dir() else None
    if iteration is None:
        raise ValueError(f"PMP run {str(run_dir)!r} has no valid checkpoint (not a pmp-pretrain run dir?)")
    cfg, common = checkpoint.checkpoint_config(run_dir, iteration)
    if cfg.pmp.mode != "pmp":
        raise ValueError(f"run {str(run_dir)!r} is a {cfg.pmp.mode} run, not a PMP run: give the PMP run "
                         f"whose base loss the control must match")
    if iteration != cfg.train.train_steps:
        raise ValueError(f"PMP run {str(run_dir)!r} has not finished: its newest valid checkpoint is "
                         f"iteration {iteration} of train.train_steps={cfg.train.train_steps}")
    if cfg.train.eval_interval == 0:
        raise ValueError(f"PMP run {str(run_dir)!r} never evaluated (train.eval_interval=0): there is no "
                         f"validation loss to match nor a validation split to score the control on")
    return cfg, bool(common.get("w0_seed_secret", False))


def final_valid_loss(run_dir: str | os.PathLike) -> float:
    """The last ``valid_loss`` in ``run_dir/metrics.jsonl``; ValueError naming the file when there is none."""
    path = Path(run_dir) / "metrics.jsonl"
    losses = []
    if path.is_file():
        for line in path.read_text().splitlines():
            loss = json.loads(line).get("valid_loss") if line.strip() else None
            if loss is not None:
                losses.append(float(loss))
    if not losses:
        raise ValueError(f"no valid_loss records in {path}: the target loss is the PMP run's final "
                         f"validation loss (or give it explicitly)")
    return losses[-1]


# ----------------------------------------------------------------------------- one attempt


def num_evals(pmp_cfg: Config) -> int:
    """``n``: the PMP run's number of evaluations; an attempt's steps are a multiple of it."""
    return max(1, pmp_cfg.train.train_steps // pmp_cfg.train.eval_interval)


def warmup_steps(pmp_cfg: Config, steps: int) -> int:
    """The warmup rule: the PMP run's warmup share of ``steps``, >= 1 when it had one, <= steps - 1."""
    warmup, total = pmp_cfg.optim.lr_warmup_steps, pmp_cfg.train.train_steps
    if warmup == 0:
        return 0
    return max(1, min(steps - 1, round(warmup * steps / total)))


def attempt_dir(out: Path, steps: int) -> Path:
    return out / f"steps_{steps:07d}"


def attempt_overrides(pmp_cfg: Config, secret: bool, out: Path, steps: int,
                      extra: Sequence[str] = ()) -> list[str]:
    """The dotted overrides of the dense run of ``steps`` steps on top of ``OUT/pmp_config.yaml``."""
    n = num_evals(pmp_cfg)
    assert steps % n == 0 and steps > 0, (steps, n)
    run = attempt_dir(out, steps)
    seed = f"model.seed_file={out / SEED_FILE}" if secret else f"model.seed={pmp_cfg.model.seed}"
    args = ["pmp.mode=dense", f"train.train_steps={steps}",
            f"optim.lr_warmup_steps={warmup_steps(pmp_cfg, steps)}", f"train.eval_interval={steps // n}",
            seed, f"checkpoint.dir={run}"]
    if pmp_cfg.logging.tensorboard_dir:  # not into the PMP run's event files
        args.append(f"logging.tensorboard_dir={run / 'tensorboard'}")
    return [*args, *extra]


def _write_base(pmp_cfg: Config, secret: bool, out: Path) -> Path:
    """``OUT/pmp_config.yaml`` (no secret seed, no seed file) and, for a secret seed, ``OUT/w0_seed``."""
    import dataclasses

    public_seed = None if secret else pmp_cfg.model.seed
    model = dataclasses.replace(pmp_cfg.model, seed=public_seed, seed_file=None)
    save_config(dataclasses.replace(pmp_cfg, model=model), out / BASE_CONFIG)
    if secret:
        seed_path = out / SEED_FILE
        text = f"{pmp_cfg.model.seed}\n"
        if not seed_path.is_file() or seed_path.read_text() != text:
            write_text_atomic(seed_path, text, mode=0o600)
    return out / BASE_CONFIG


def _finished_loss(run: Path, steps: int, expected: Config) -> float | None:
    """The final valid loss of a finished attempt dir, None when it has not finished; ValueError when
    it was made with another config."""
    from pmp_megatron.train import checkpoint

    if not (run / "config.yaml").is_file():
        return None
    saved = config_to_dict(load_config(run / "config.yaml"))
    want = config_to_dict(expected)
    diffs = [name for name, a, b in _leaves(saved, want, "") if a != b]
    if diffs:
        raise ValueError(f"attempt dir {str(run)!r} was made with another config ({', '.join(diffs[:5])}): "
                         f"remove it or use another output directory")
    if checkpoint.latest_valid(run) != steps:
        return None
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["valid_loss"] for r in records if r.get("step") == steps and r.get("valid_loss") is not None]
    return float(losses[-1]) if losses else None


def _leaves(a: dict, b: dict, prefix: str):
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            yield from _leaves(x, y, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", x, y


def run_attempt(pmp_cfg: Config, secret: bool, out: Path, steps: int, extra: Sequence[str] = (),
                nproc_per_node: int | None = None) -> float:
    """Train (or reuse) the dense run of ``steps`` steps; return its final validation loss."""
    from pmp_megatron.mcore import free_port

    overrides = attempt_overrides(pmp_cfg, secret, out, steps, extra)
    base = out / BASE_CONFIG
    expected = load_config(base, overrides)  # what the run's config.yaml shows (a secret seed as null)
    run = attempt_dir(out, steps)
    loss = _finished_loss(run, steps, expected)
    if loss is not None:
        logger.info("dense run of %d steps: finished before (valid loss %.4f), reused", steps, loss)
        return loss
    p = expected.parallel
    nproc = nproc_per_node or p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "pmp_megatron", "pretrain", "--config", str(base),
           *overrides]
    log = out / "logs" / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    logger.info("dense run of %d steps (warmup %d): %s; log %s", steps, warmup_steps(pmp_cfg, steps), run,
                log)
    with open(log, "a") as f:
        env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        why = "preempted: rerun to resume it" if proc.returncode == 42 else f"see {log}"
        raise RunFailed(f"dense run of {steps} steps exited {proc.returncode} ({why})", proc.returncode)
    loss = _finished_loss(run, steps, expected)
    if loss is None:
        raise RunFailed(f"dense run of {steps} steps ended without a final validation loss (see {log})", 1)
    return loss


# ----------------------------------------------------------------------------- the search


def next_steps(results: dict[int, float], target: float, start: int, grid: int) -> int:
    """The next number of steps to try, given ``results`` (steps -> final valid loss, none within
    tolerance), on multiples of ``grid``. Assumes the loss decreases with steps; ValueError when no
    untried multiple of ``grid`` can reach ``target``."""
    if not results:
        return _on_grid(start, grid)
    short = {s: v for s, v in results.items() if v > target}  # too few steps: loss above the target
    long = {s: v for s, v in results.items() if v <= target}
    if short and long:
        lo, hi = max(short), min(long)
        if lo > hi:
            raise ValueError(f"the final validation loss is not monotone in the steps: {lo} steps give "
                             f"{short[lo]:.4f} > target {target:.4f} but {hi} steps give {long[hi]:.4f}")
        if hi - lo <= grid:
            raise ValueError(f"no number of steps reaches the target loss {target:.4f} within tolerance: "
                             f"{lo} steps give {short[lo]:.4f}, {hi} steps give {long[hi]:.4f} (the steps "
                             f"are multiples of {grid}, the PMP run's number of evaluations; relax the "
                             f"tolerance)")
        x_lo, x_hi = math.log(lo), math.log(hi)
        x = x_lo + (short[lo] - target) / (short[lo] - long[hi]) * (x_hi - x_lo)
        # Regula falsi stalls at one end of a curved bracket: bisect (in log s) after two steps on one side.
        last_two = list(results)[-2:]
        if len(last_two) == 2 and (all(s in short for s in last_two) or all(s in long for s in last_two)):
            x = (x_lo + x_hi) / 2
        return min(max(_on_grid(math.exp(x), grid), lo + grid), hi - grid)
    side, sign = (long, -1) if long else (short, 1)  # fewer steps (all below the target), or more
    s0 = min(side) if sign < 0 else max(side)
    if sign < 0 and s0 <= grid:
        raise ValueError(f"the target loss {target:.4f} is above the final validation loss of the shortest "
                         f"dense run ({s0} steps: {side[s0]:.4f}): no dense run matches it")
    factor = 2.0
    if len(side) >= 2:  # secant extrapolation in log s through the two nearest attempts
        others = sorted(set(side) - {s0})
        s1 = others[0] if sign < 0 else others[-1]  # the attempt next to s0
        slope = (side[s0] - side[s1]) / (math.log(s0) - math.log(s1))
        if slope < 0:
            factor = min(max(math.exp(abs((side[s0] - target) / slope)), 1.25), 8.0)
    guess = s0 / factor if sign < 0 else s0 * factor
    step = _on_grid(guess, grid)
    if step == s0:
        step = s0 + sign * grid
    return max(step, grid)


def _on_grid(steps: float, grid: int) -> int:
    return max(grid, grid * round(steps / grid))


def match(pmp_run: str | os.PathLike, out: str | os.PathLike, target_loss: float | None = None,
          tolerance: float = 0.01, max_runs: int = 8, overrides: Sequence[str] = (),
          nproc_per_node: int | None = None) -> dict:
    """Find the dense-matched control of ``pmp_run`` under ``out``; return the summary (also written to
    ``OUT/dense_matched.json``), whose ``chosen.dir`` is the control's checkpoint. ValueError (one line) for
    a run that is not a finished PMP run, no valid_loss records, or a target no attempt reaches within
    ``max_runs``."""
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
    if max_runs < 1:
        raise ValueError(f"max_runs must be >= 1, got {max_runs}")
    pmp_cfg, secret = read_pmp_run(pmp_run)
    target = final_valid_loss(pmp_run) if target_loss is None else float(target_loss)
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"the target loss must be a positive number, got {target}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True, mode=0o700 if secret else 0o777)  # the runs hold the seed
    _write_base(pmp_cfg, secret, out)
    grid = num_evals(pmp_cfg)
    summary = dict(pmp_run=str(Path(pmp_run).resolve()), target_loss=target,
                   target_source="given" if target_loss is not None else "the PMP run's final valid_loss",
                   tolerance=tolerance, max_runs=max_runs, pmp_steps=pmp_cfg.train.train_steps,
                   steps_multiple_of=grid, w0_seed="secret (OUT/w0_seed)" if secret else "public",
                   warmup_rule="round(W * s / S), >= 1 when W > 0, <= s - 1",
                   overrides=list(overrides), attempts=[], chosen=None)
    results: dict[int, float] = {}
    while len(results) < max_runs:
        try:
            steps = next_steps(results, target, pmp_cfg.train.train_steps, grid)
        except ValueError:
            _write_summary(out, summary)
            raise
        loss = run_attempt(pmp_cfg, secret, out, steps, overrides, nproc_per_node)
        results[steps] = loss
        attempt = Attempt(steps, warmup_steps(pmp_cfg, steps), steps // grid, loss, (loss - target) / target,
                          str(attempt_dir(out, steps)))
        summary["attempts"].append(asdict(attempt))
        logger.info("dense run of %d steps: valid loss %.4f vs target %.4f (%+.2f%%)", steps, loss, target,
                    100 * attempt.rel_error)
        if abs(attempt.rel_error) <= tolerance:
            summary["chosen"] = asdict(attempt)
            break
        _write_summary(out, summary)
    _write_summary(out, summary)
    if summary["chosen"] is None:
        best = min(summary["attempts"], key=lambda a: abs(a["rel_error"]))
        raise ValueError(f"no dense run within {tolerance:.2%} of the target loss {target:.4f} after "
                         f"max_runs={max_runs} attempts (closest: {best['steps']} steps, valid loss "
                         f"{best['valid_loss']:.4f}, {best['rel_error']:+.2%}); see {out / SUMMARY}")
    return summary


def _write_summary(out: Path, summary: dict) -> None:
    write_text_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
