"""``pmp-launch``: submit PMP pretraining to Slurm (or print the sbatch script with ``--dry-run``).

    pmp-launch --config configs/model/tinyllama-1.1b.yaml configs/pmp/reference.yaml \\
        --nodes 4 --gpus-per-node 8 --partition gpu --time 04:00:00 \\
        model.fp8=hybrid model.transformer_impl=transformer_engine train.micro_batch_size=1

Several config files merge in order; ``key=value`` overrides apply last. The config is resolved and
validated for the job's world size before anything is written or queued.

Cluster specifics pass through: ``--qos``, ``--constraint``, ``--exclusive``, ``--mem``, ``--reservation``,
``--exclude``; any other ``#SBATCH`` option with ``--sbatch-option KEY=VALUE`` (or ``KEY``), options of the
trainer's ``srun`` with ``--srun-option KEY=VALUE``, and bind mounts into the container besides the run dir
with ``--container-mount SRC:DST[:FLAGS]``; each repeatable.
"""

from __future__ import annotations

import argparse
import sys

from pmp_megatron.launch.sbatch import SlurmOptions, launch

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The pmp-launch argument parser."""
    p = argparse.ArgumentParser(
        prog="pmp-launch", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See slurm/README.md for multi-node runs, resuming, release and attacks.")
    p.add_argument("--config", nargs="+", action="extend", required=True, metavar="YAML",
                   help="config file(s), merged in order (repeatable)")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True,
                   help="GPUs per node; one rank per GPU (0: CPU-only, then give --ntasks-per-node)")
    p.add_argument("--ntasks-per-node", type=int, help="ranks per node (default: --gpus-per-node)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--time", help="time limit of each job segment, e.g. 04:00:00")
    p.add_argument("--container-image", help="pyxis/enroot image to run the tasks in")
    p.add_argument("--container-mount", action="append", default=[], metavar="SRC:DST[:FLAGS]",
                   help="a bind mount into the container besides the run dir (repeatable)")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per rank")
    p.add_argument("--qos", help="Slurm quality of service")
    p.add_argument("--constraint", help="node features the job needs, e.g. a100&ib")
    p.add_argument("--exclusive", action="store_true", help="whole nodes, shared with no other job")
    p.add_argument("--mem", help="memory per node, e.g. 500G (0: all of it)")
    p.add_argument("--reservation", help="run inside this Slurm reservation")
    p.add_argument("--exclude", help="nodes never to run on, e.g. node[01-04]")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="KEY[=VALUE]",
                   help="any other #SBATCH option, e.g. mail-type=END (repeatable)")
    p.add_argument("--srun-option", action="append", default=[], metavar="KEY[=VALUE]",
                   help="an option of the trainer's srun, e.g. mpi=pmix (repeatable)")
    p.add_argument("--job-name", help="Slurm job name, also the singleton chain key (default: pmp-<config>)")
    p.add_argument("--run-dir", help="run directory (default: runs/<job name>-<timestamp>)")
    p.add_argument("--requeue-signal-seconds", type=int, default=300,
                   help="send USR2 (checkpoint + requeue) this many seconds before the time limit")
    p.add_argument("--chain", type=int, default=1, help="queue this many back-to-back job segments")
    p.add_argument("--trainer", default="pmp-pretrain", help="command each rank runs (default: pmp-pretrain)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; write and submit nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, launch, print the script (dry run) or the job ids and run dir."""
    args = build_parser().parse_args(argv)
    options = SlurmOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, ntasks_per_node=args.ntasks_per_node,
        partition=args.partition, account=args.account, time=args.time,
        container_image=args.container_image, cpus_per_task=args.cpus_per_task, job_name=args.job_name,
        requeue_signal_seconds=args.requeue_signal_seconds, chain=args.chain, trainer=args.trainer,
        qos=args.qos, constraint=args.constraint, exclusive=args.exclusive, mem=args.mem,
        reservation=args.reservation, exclude=args.exclude, sbatch_options=tuple(args.sbatch_option),
        srun_options=tuple(args.srun_option), container_mounts=tuple(args.container_mount))
    result = launch(args.config, options, args.overrides, run_dir=args.run_dir, dry_run=args.dry_run)
    if args.dry_run:
        sys.stdout.write(result.script)
        return 0
    sys.stdout.write(f"run dir: {result.run_dir}\nsubmitted job(s): {' '.join(result.job_ids)}\n"
                     f"logs: {result.run_dir}/logs/\n")
    return 0
