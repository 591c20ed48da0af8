"""``pmp-attack``: run an attack suite against a PMP release (and its dense baseline), or report on results.

    pmp-attack --suite configs/attacks/smoke.yaml --model PMP_HF_DIR [--dense-model DENSE_HF_DIR]
               [--mask MASK_FILE] [--seed-for-regeneration N [--model-config YAML]] [--rho R]
               [--out RESULTS.jsonl] [--workers N | --slurm partition=P,time=60,max_concurrent=8]
    pmp-attack report RESULTS.jsonl [MORE.jsonl ...] --out DIR

Attackers whose inputs are missing (``authorized`` without ``--mask``, ``recovery_init`` without
``--seed-for-regeneration``) are dropped with a warning unless named in ``--attackers``. Without
``--model-config`` the init-regeneration attacker reads the architecture (and init std =
``initializer_range``) from the release's ``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("pmp_megatron.attack")

_EPILOG = "Report mode: pmp-attack report RESULTS.jsonl [MORE.jsonl ...] --out DIR"


def _attack_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pmp-attack", epilog=_EPILOG,
                                description="Run a grid of fine-tuning attacks on a PMP release.")
    p.add_argument("--suite", required=True, help="suite YAML (configs/attacks/*.yaml)")
    p.add_argument("--model", required=True, help="the PMP release (HF directory)")
    p.add_argument("--dense-model", help="the dense baseline's release (HF directory), for gain ratios")
    p.add_argument("--mask", help="the owner's private mask file (authorized attacker, recovery IoU)")
    p.add_argument("--seed-for-regeneration", type=int, help="init seed: enables the recovery_init attacker")
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
    p.add_argument("--log-level", default="INFO")
    return p


def format_summary(summary: dict) -> str:
    """A short plain-text table of the summary (printed by the CLI)."""
    def f(x):
        return "n/a" if x is None else f"{x:.4f}"

    lines = [f"base loss ratio PMP/dense: {f(summary['base_loss_ratio'])}",
             f"{'task':<24} {'gain ratio':>12} {'authorized ratio':>18}"]
    for task, ratio in summary["gain_ratio"].items():
        lines.append(f"{task:<24} {f(ratio):>12} {f(summary['authorized_gain_ratio'].get(task)):>18}")
    for attacker, iou in summary["recovery_iou"].items():
        lines.append(f"recovery IoU {attacker:<22} {f(iou)}")
    return "\n".join(lines)


def _check_mask_file(mask_path: str, model_dir: Path) -> float:
    """Verify the mask matches the release's parameters; return its rho."""
    from pmp_megatron.attack.runner import load_true_mask
    from pmp_megatron.release.audit import check_mask_names
    from pmp_megatron.release.reader import read_shapes

    masks, meta = load_true_mask(mask_path)
    shapes = read_shapes(model_dir)
    if shapes is not None:
        check_mask_names(masks, shapes, f"mask file {mask_path}")
    return meta["rho"]


def _regen_config(seed: int | None, model_config: str | None, model_dir: Path):
    from pmp_megatron.release.audit import model_config_for_audit

    if seed is None:
        if model_config:
            raise ValueError("--model-config is only used with --seed-for-regeneration")
        return None
    return model_config_for_audit(model_dir, seed, model_config)


def prepare(suite: str, model: str, dense_model: str | None = None, mask: str | None = None,
            seed_for_regeneration: int | None = None, model_config: str | None = None,
            rho: float | None = None, device: str = "auto", attackers: list[str] | None = None):
    """Validate the inputs and expand the grid; return ``(cells, AttackContext)``."""
    from pmp_megatron.attack import runner
    from pmp_megatron.attack import suite as suite_mod
    from pmp_megatron.attack.tasks import ReleaseTokenizer, resolve_source
    from pmp_megatron.release.reader import check_model_dir

    spec = suite_mod.load_suite(suite)
    models = {"pmp": str(Path(model).resolve())}
    if dense_model:
        models["dense"] = str(Path(dense_model).resolve())
    for path in models.values():
        check_model_dir(path)
    for task in [*spec.tasks, *([spec.pretraining_eval] if spec.pretraining_eval else [])]:
        resolve_source(task)  # ValueError for an unknown task, before any cell runs
    if "dense" in models and (ReleaseTokenizer(models["pmp"]).sha256
                              != ReleaseTokenizer(models["dense"]).sha256):
        raise ValueError("the PMP and dense releases have different tokenizers: their gains are not "
                         "comparable")
    mask_sha = None
    if mask:
        mask_rho = _check_mask_file(mask, Path(models["pmp"]))
        mask_sha = runner.load_true_mask(mask)[1]["sha256"]
        rho = mask_rho if rho is None else rho
    regen = _regen_config(seed_for_regeneration, model_config, Path(models["pmp"]))
    if attackers is not None:
        unknown = [a for a in attackers if a not in suite_mod.ATTACKERS]
        if unknown:
            raise ValueError(f"unknown attacker(s) {unknown}; known: {', '.join(suite_mod.ATTACKERS)}")
    else:
        attackers = list(spec.attackers)
        for name, missing, flag in (("authorized", mask_sha is None, "--mask"),
                                    ("recovery_init", regen is None, "--seed-for-regeneration")):
            if name in attackers and missing:
                logger.warning("dropping attacker %s: it needs %s", name, flag)
                attackers.remove(name)
    model_ids = {role: runner.model_identity(path) for role, path in models.items()}
    regen_id = None if regen is None else json.dumps(dataclasses.asdict(regen), sort_keys=True)
    cells = suite_mod.expand_cells(spec, model_ids, mask_sha, regen_id, attackers)
    ctx = runner.AttackContext(suite=spec, models=models, model_ids=model_ids, mask_path=mask,
                               regen_config=regen, rho=rho, device=device)
    return cells, ctx


def run_suite(suite: str, model: str, out: str, workers: int = 1, slurm: str | None = None,
              report_dir: str | None = None, **inputs) -> dict:
    """Run (or resume) a suite and return the report summary; ``inputs`` go to ``prepare``."""
    from pmp_megatron.attack import execute, report

    cells, ctx = prepare(suite, model, **inputs)
    if slurm:
        execute.run_cells_slurm(cells, ctx, out, execute.parse_slurm_options(slurm))
    else:
        execute.run_cells(cells, ctx, out, workers=workers)
    ids = {c.id for c in cells}
    records = [r for r in execute.read_results(out) if r.get("id") in ids]
    return report.write_report(records, report_dir) if report_dir else report.summarize(records)


def _attack(argv: list[str]) -> int:
    args = _attack_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    inputs = {"dense_model": args.dense_model, "mask": args.mask,
              "seed_for_regeneration": args.seed_for_regeneration, "model_config": args.model_config,
              "rho": args.rho, "device": args.device,
              "attackers": [a.strip() for a in args.attackers.split(",") if a.strip()] if args.attackers
              else None}
    if args.dry_run:
        from pmp_megatron.attack import execute

        cells, _ = prepare(args.suite, args.model, **inputs)
        for cell in execute.pending_cells(cells, args.out):
            print(cell.id, cell.role, cell.attacker, cell.task_name, cell.adversary.label, cell.seed)  # noqa: T201
        return 0
    summary = run_suite(args.suite, args.model, args.out, args.workers, args.slurm, args.report, **inputs)
    print(format_summary(summary))  # noqa: T201
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
    summary = report.write_report(records, args.out)
    print(format_summary(summary))  # noqa: T201
    print(f"wrote {Path(args.out) / 'report.md'}")  # noqa: T201
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pmp-attack``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        return _report(argv[1:])
    return _attack(argv)


if __name__ == "__main__":
    sys.exit(main())
