"""``pmp-attack``: run an attack suite against a PMP release (and its dense baseline), or report on results
(the library side is ``attack/run.py``).

    pmp-attack --suite configs/attacks/smoke.yaml --model PMP_HF_DIR [--dense-model DENSE_HF_DIR]
               [--mask MASK_FILE] [--seed-for-regeneration N [--model-config YAML]] [--rho R]
               [--out RESULTS.jsonl] [--workers N | --slurm partition=P,time=60,max_concurrent=8]
               [--dense-matched-model DIR]
    pmp-attack report RESULTS.jsonl [MORE.jsonl ...] --out DIR [--suite SUITE.yaml]

A suite with ``engine: megatron`` runs under torchrun or srun (every rank runs this command; global rank
0 writes the results and the report); a preemption signal (SIGTERM / SIGUSR2) saves the running cell and
exits 42 for a requeue, and the rerun resumes that cell.

The report leads with the verdict of the suite's pre-registered decision rule (``decision:``) and the
intervals that decided it; ``report`` needs ``--suite`` for it.

Attackers whose inputs are missing (``authorized`` without ``--mask``, ``recovery_init`` without a v2 key
that carries the W0 seed or ``--seed-for-regeneration``) are dropped with a warning unless named in
``--attackers``. Without
``--model-config`` the init-regeneration attacker reads the architecture (and init std =
``initializer_range``) from the release's ``config.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pmp_megatron.attack.run import format_summary, prepare, run_suite

_EPILOG = "Report mode: pmp-attack report RESULTS.jsonl [MORE.jsonl ...] --out DIR [--suite YAML]"


def _attack_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pmp-attack", epilog=_EPILOG,
                                description="Run a grid of fine-tuning attacks on a PMP release.")
    p.add_argument("--suite", required=True, help="suite YAML (configs/attacks/*.yaml)")
    p.add_argument("--model", required=True, help="the PMP release (HF directory)")
    p.add_argument("--dense-model", help="the dense baseline's release (HF directory), for gain ratios")
    p.add_argument("--dense-matched-model",
                   help="a dense release whose base loss matches the PMP release's (matched-start control)")
    p.add_argument("--mask", help="the owner's private mask file (authorized attacker, recovery IoU)")
    p.add_argument("--seed-for-regeneration", type=int,
                   help="a known public W0 seed, when no v2 key is given (enables recovery_init)")
    p.add_argument("--model-config", help="config YAML with the model section (default: from config.json)")
    p.add_argument("--rho", type=float, help="rho tag of the PMP model for reports (default: the mask's)")
    p.add_argument("--out", default="attack_results.jsonl", help="results JSONL (appended; resumable)")
    p.add_argument("--workers", type=int, default=1, help="local processes (spawn; 1 = in-process)")
    p.add_argument("--slurm", help="run as a Slurm job array: partition=P,time=HH:MM:SS,max_concurrent=N"
                                   "[,cells_per_task=K,gpus_per_node=G,cpus_per_task=C,mem_gb=M,account=A,qos=Q]")
    p.add_argument("--attackers", help="comma list restricting the suite's attackers")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--report", help="write report.md + PNGs into this directory after the run")
    p.add_argument("--dry-run", action="store_true", help="list the pending cells and exit")
    p.add_argument("--log-level", default="INFO")
    return p


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pmp-attack report", description="Tables and plots from results JSONL.")
    p.add_argument("results", nargs="+", help="results JSONL file(s)")
    p.add_argument("--out", required=True, help="output directory (report.md + PNGs)")
    p.add_argument("--suite", help="the suite YAML whose decision rule gives the verdict")
    p.add_argument("--log-level", default="INFO")
    return p


def _attack(argv: list[str]) -> int:
    args = _attack_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    inputs = {"dense_model": args.dense_model, "dense_matched_model": args.dense_matched_model,
              "mask": args.mask,
              "seed_for_regeneration": args.seed_for_regeneration, "model_config": args.model_config,
              "rho": args.rho, "device": args.device,
              "attackers": [a.strip() for a in args.attackers.split(",") if a.strip()] if args.attackers
              else None}
    if args.dry_run:
        from pmp_megatron.attack import execute

        cells, _ = prepare(args.suite, args.model, **inputs)
        for cell in execute.pending_cells(cells, args.out):
            sys.stdout.write(f"{cell.id} {cell.role} {cell.attacker} {cell.task_name} {cell.adversary.label} "
                             f"{cell.seed}\n")
        return 0
    from pmp_megatron.attack.cell_loop import Preempted

    try:
        summary = run_suite(args.suite, args.model, args.out, args.workers, args.slurm, args.report, **inputs)
    except Preempted as stop:
        logging.getLogger("pmp_megatron.attack").warning("%s", stop)
        return stop.exit_code
    if summary is not None:  # engine megatron: global rank 0 reports
        sys.stdout.write(format_summary(summary) + "\n")
    return 0


def _report(argv: list[str]) -> int:
    args = _report_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    from pmp_megatron.attack import execute, report

    records = []
    for path in args.results:
        if not Path(path).is_file():
            raise ValueError(f"results file {path} does not exist")
        records += execute.read_results(path)
    suite = None
    if args.suite:
        from pmp_megatron.attack.suite import load_suite

        suite = load_suite(args.suite)
    summary = report.write_report(records, args.out, suite)
    sys.stdout.write(format_summary(summary) + "\n")
    sys.stdout.write(f"wrote {Path(args.out) / 'report.md'}\n")
    return 0


def main(argv: list[str]) -> int:
    """``pmp-attack ...`` or ``pmp-attack report ...``."""
    argv = list(argv)
    if argv and argv[0] == "report":
        return _report(argv[1:])
    return _attack(argv)
