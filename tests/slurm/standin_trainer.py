"""A tiny stand-in for ``pmp-pretrain`` with the same contract, for testing the Slurm machinery.

    python tests/slurm/standin_trainer.py --config RUN_DIR/config.yaml [key=value ...]

Like the real trainer it reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from the environment (set by
``pmp_megatron.launch.rendezvous`` under srun), loads the config with ``load_config``, resumes from
``checkpoint.dir``, runs ``train.train_steps`` steps, and on SIGUSR2/SIGTERM saves a checkpoint and
exits 42. A "step" all-reduces a number over gloo and folds it into a float64 state, so the final
state is identical whether or not the run was interrupted and resumed.

Files in ``checkpoint.dir``: ``state.pt`` (the checkpoint), ``progress`` (last step, rank 0),
``result-rank<R>.json`` (per rank, at the end), ``preempted-<restart>`` (written on each preemption).
``STANDIN_STEP_SECONDS`` (default 0.1) sets the time per step.

Also importable: ``array_cell`` is the trivial function the job-array test maps over.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

REQUEUE_EXIT_CODE = 42


def array_cell(x: int) -> dict:
    """One job-array element: a trivial computation plus where and when it ran."""
    start = time.time()
    time.sleep(float(os.environ.get("STANDIN_CELL_SECONDS", "2")))
    return {"x": x, "square": x * x, "node": os.environ.get("SLURMD_NODENAME"),
            "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"), "start": start, "end": time.time()}


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from pmp_megatron.config import load_config

    cfg = load_config(args.config, args.overrides)
    ckpt_dir = Path(cfg.checkpoint.dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    step_seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.1"))

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGUSR2, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()

    step, value = 0, torch.zeros(1, dtype=torch.float64)
    state_path = ckpt_dir / "state.pt"
    if state_path.exists():
        saved = torch.load(state_path)
        step, value = saved["step"], saved["value"]

    def save() -> None:
        dist.barrier()
        if rank == 0:
            _atomic_save({"step": step, "value": value}, state_path)
        dist.barrier()

    while step < cfg.train.train_steps:
        flag = torch.tensor([0.0 if stop["signal"] is None else 1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if flag.item():
            save()
            if rank == 0:
                (ckpt_dir / f"preempted-{os.environ.get('SLURM_RESTART_COUNT', '0')}").write_text(f"{step}\n")
            dist.destroy_process_group()
            return REQUEUE_EXIT_CODE
        contrib = torch.tensor([math.sin(0.1 * step + rank)], dtype=torch.float64)
        dist.all_reduce(contrib)
        value = value * 0.9 + contrib
        step += 1
        if step % cfg.checkpoint.save_interval == 0:
            save()
        if rank == 0:
            (ckpt_dir / "progress").write_text(f"{step}\n")
        time.sleep(step_seconds)

    save()
    result = {"rank": rank, "world_size": world, "step": step, "value": value.item(),
              "node": os.environ.get("SLURMD_NODENAME"), "master_addr": os.environ.get("MASTER_ADDR"),
              "master_port": os.environ.get("MASTER_PORT"), "local_rank": os.environ.get("LOCAL_RANK"),
              "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
              "hostname": socket.gethostname()}
    (ckpt_dir / f"result-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
