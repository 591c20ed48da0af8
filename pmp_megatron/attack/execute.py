"""Run a grid of attack cells: in-process, on a local process pool, or as a Slurm job array.

Results are one JSON line per finished cell, appended (flush + fsync) to a JSONL file by a single
writer. A rerun reads the file first and skips every cell whose id is already there, so an interrupted
grid resumes where it stopped. A cell that raises is logged and NOT written (a rerun retries it); the
run then ends with a ``RuntimeError`` naming the failed cells.

- ``run_cells(..., workers=1)``: sequential, in this process (tiny models, tests, debugging).
- ``run_cells(..., workers=N)``: a ``spawn`` process pool; each worker uses one torch thread and, when
  GPUs are visible, its own GPU (round robin). Workers return records; the parent writes them.
- ``run_cells_slurm``: submitit ``AutoExecutor`` job array: the pending cells, grouped by release, are cut
  into chunks of ``cells_per_task``; each array task (``array_task.ChunkTask``) runs its chunk
  sequentially with each release loaded once, appends to its own shard ``<results>.shards/NNNNN.jsonl``,
  and requeues itself on Slurm's time-limit signal or a preemption, resuming after the cells its shard
  holds; ``slurm_array_parallelism`` caps the concurrency, and the shards are gathered into the results
  file at the end (and at the start of a rerun).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from pmp_megatron.attack.runner import AttackContext, run_cell
from pmp_megatron.attack.suite import Cell

logger = logging.getLogger(__name__)


def read_results(path: str | Path) -> list[dict]:
    """All records of a results JSONL (a torn last line from a killed writer is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d: skipping an unreadable (torn) line", path, line_no)
    return records


def done_ids(path: str | Path) -> set[str]:
    return {r["id"] for r in read_results(path) if "id" in r}


def pending_cells(cells: Iterable[Cell], results_path: str | Path) -> list[Cell]:
    """The cells whose id is not yet in the results file."""
    done = done_ids(results_path)
    return [c for c in cells if c.id not in done]


def append_record(path: str | Path, record: dict) -> None:
    """Append one JSON line and make it durable (flush + fsync). A torn last line (a killed writer) is
    closed with a newline first, so it cannot swallow the new record."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        torn = False
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((("\n" if torn else "") + json.dumps(record, sort_keys=True) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


class _Progress:
    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()

    def tick(self, cell: Cell, record: dict | None) -> None:
        self.done += 1
        elapsed = time.time() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        what = "FAILED" if record is None else (f"gain {record['gain']:.4f}" if record.get("gain") is not None
                                                else record["status"])
        logger.info("cell %d/%d %s %s %s %s seed=%d: %s | elapsed %.0fs, ETA %.0fs", self.done, self.total,
                    cell.role, cell.attacker, cell.task_name, cell.adversary.label, cell.seed, what, elapsed,
                    eta)


def run_cells(cells: list[Cell], ctx: AttackContext, results_path: str | Path,
              workers: int = 1) -> list[dict]:
    """Run every pending cell; return the new records. ``workers`` > 1 uses a spawn process pool."""
    _refuse_megatron(ctx, "run_cells")
    todo = pending_cells(cells, results_path)
    logger.info("%d cells, %d already in %s, %d to run", len(cells), len(cells) - len(todo), results_path,
                len(todo))
    progress, new, failed = _Progress(len(todo)), [], []

    def finish(cell: Cell, record: dict | None, error: str | None) -> None:
        if record is not None:
            append_record(results_path, record)
            new.append(record)
        else:
            failed.append((cell, error))
        progress.tick(cell, record)

    if workers <= 1:
        for cell in todo:
            try:
                finish(cell, run_cell(cell, ctx), None)
            except Exception as err:  # noqa: BLE001 - one broken cell must not stop the grid
                logger.exception("cell %s failed", cell.id)
                finish(cell, None, f"{type(err).__name__}: {err}")
    elif todo:
        spawn = mp.get_context("spawn")
        devices = spawn.Queue()
        for i in range(workers):
            devices.put(i)
        with ProcessPoolExecutor(max_workers=workers, mp_context=spawn, initializer=_init_worker,
                                 initargs=(devices, logging.getLogger().level)) as pool:
            futures = {pool.submit(run_cell, cell, ctx): cell for cell in todo}
            for fut in as_completed(futures):
                try:
                    finish(futures[fut], fut.result(), None)
                except Exception as err:  # noqa: BLE001
                    logger.error("cell %s failed: %s", futures[fut].id, err)
                    finish(futures[fut], None, f"{type(err).__name__}: {err}")
    _raise_failed(failed)
    return new


def _refuse_megatron(ctx: AttackContext, what: str) -> None:
    if ctx is not None and ctx.suite.engine != "hf":  # (tests drive the executors without a context)
        raise ValueError(f"suite {ctx.suite.name!r} has engine {ctx.suite.engine}: its cells run on the "
                         "job's processes together (attack.megatron_engine.run_cells, pmp-attack under "
                         f"torchrun or srun; slurm/README.md), not through {what}")


def _init_worker(devices, level: int) -> None:
    import torch

    logging.basicConfig(level=level, format="%(asctime)s %(processName)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    index = devices.get()
    if torch.cuda.is_available():
        torch.cuda.set_device(index % torch.cuda.device_count())


def _raise_failed(failed: list[tuple[Cell, str]]) -> None:
    if failed:
        listing = "; ".join(f"{c.id} ({c.attacker} {c.adversary.label}): {e}" for c, e in failed[:10])
        raise RuntimeError(f"{len(failed)} cell(s) failed (not written; a rerun retries them): {listing}")


# ----------------------------------------------------------------------------- Slurm


SLURM_KEYS = {
    "partition": str, "time": str, "max_concurrent": int, "cells_per_task": int, "gpus_per_node": int,
    "cpus_per_task": int, "mem_gb": int, "account": str, "qos": str, "constraint": str, "folder": str,
    "cluster": str,  # submitit cluster: slurm (default); "debug" runs the array in-process (tests)
}


def parse_slurm_options(text: str) -> dict:
    """``partition=gpu,time=2:00:00,max_concurrent=8`` -> typed dict; ValueError naming a bad key."""
    out: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--slurm item {item!r} must look like key=value")
        if key not in SLURM_KEYS:
            raise ValueError(f"unknown --slurm key {key!r}; known: {', '.join(SLURM_KEYS)}")
        try:
            out[key] = SLURM_KEYS[key](value)
        except ValueError:
            raise ValueError(f"--slurm {key} expects an integer, got {value!r}") from None
    return out


def _minutes(value: str) -> int:
    """Slurm time (``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``) -> minutes (rounded up)."""
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    else:
        parts = [0] * (3 - len(parts)) + parts if len(parts) < 3 else parts
        minutes = parts[0] * 60 + parts[1] + math.ceil(parts[2] / 60)
    return minutes + (int(days) * 24 * 60 if days else 0)


def _shard_dir(results_path: Path) -> Path:
    return results_path.with_name(results_path.name + ".shards")


def gather_shards(results_path: str | Path) -> int:
    """Append every shard record not yet in the results file; return how many were added."""
    results_path = Path(results_path)
    shard_dir = _shard_dir(results_path)
    if not shard_dir.is_dir():
        return 0
    done, added = done_ids(results_path), 0
    for shard in sorted(shard_dir.glob("*.jsonl")):
        for record in read_results(shard):
            if record.get("id") not in done:
                append_record(results_path, record)
                done.add(record["id"])
                added += 1
    return added


def run_cells_slurm(cells: list[Cell], ctx: AttackContext, results_path: str | Path,
                    slurm_options: dict, wait: bool = True) -> list:
    """Run the pending cells as a submitit job array and gather the shards; returns the jobs.

    ``slurm_options``: ``partition``, ``time`` (Slurm syntax or minutes), ``max_concurrent`` (the array
    parallelism), ``cells_per_task`` (default 1), ``gpus_per_node`` (default 1), ``cpus_per_task``,
    ``mem_gb``, ``account``, ``qos``, ``constraint``, ``folder`` (logs; default beside the results),
    ``cluster`` (submitit's; ``debug`` runs the array in this process, for tests).
    """
    _refuse_megatron(ctx, "--slurm job arrays")
    try:
        import submitit
    except ImportError as err:
        raise NotImplementedError("Slurm execution needs submitit (pip install submitit)") from err
    results_path = Path(results_path).resolve()
    gather_shards(results_path)
    todo = pending_cells(cells, results_path)
    if not todo:
        logger.info("every cell is already in %s", results_path)
        return []
    from pmp_megatron.attack.array_task import ChunkTask

    todo.sort(key=lambda cell: cell.role)  # stable: a chunk's cells share a release, loaded once per task
    opts = dict(slurm_options)
    per_task = max(1, int(opts.pop("cells_per_task", 1)))
    chunks = [todo[i: i + per_task] for i in range(0, len(todo), per_task)]
    shard_dir = _shard_dir(results_path)
    shard_dir.mkdir(parents=True, exist_ok=True)
    folder = opts.pop("folder", str(results_path.with_name(results_path.name + ".slurm")) + "/%j")
    executor = submitit.AutoExecutor(folder=folder, cluster=opts.pop("cluster", None))
    params = {"slurm_array_parallelism": int(opts.pop("max_concurrent", len(chunks))),
              "gpus_per_node": int(opts.pop("gpus_per_node", 1)), "nodes": 1, "tasks_per_node": 1,
              "name": f"pmp-attack-{ctx.suite.name}"}
    if "time" in opts:
        params["timeout_min"] = _minutes(str(opts.pop("time")))
    for key, target in (("partition", "slurm_partition"), ("cpus_per_task", "cpus_per_task"),
                        ("mem_gb", "mem_gb"), ("account", "slurm_account"), ("qos", "slurm_qos"),
                        ("constraint", "slurm_constraint")):
        if key in opts:
            params[target] = opts.pop(key)
    executor.update_parameters(**params)
    shards = [str(shard_dir / f"{i:05d}.jsonl") for i in range(len(chunks))]
    jobs = executor.map_array(ChunkTask(), chunks, [ctx] * len(chunks), shards)
    logger.info("submitted %d array tasks (%d cells, %d per task, at most %d at once): job %s", len(jobs),
                len(todo), per_task, params["slurm_array_parallelism"], jobs[0].job_id.split("_")[0])
    if not wait:
        return jobs
    from pmp_megatron.launch import gather

    try:  # on Slurm, wait via scontrol: a task that dies without a result cannot hang it without sacct
        if executor.cluster == "slurm":
            gather(jobs)
        else:  # submitit's in-process debug/local executors
            for job in jobs:
                job.result()
    finally:
        added = gather_shards(results_path)
        logger.info("gathered %d new records into %s (rerun to retry cells of failed tasks)", added,
                    results_path)
    return jobs
