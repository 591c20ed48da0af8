"""Run an attack suite against a release (and its dense baseline): validate the inputs, expand the grid,
execute the pending cells (in-process, a process pool or a Slurm array; resumable JSONL) and summarise.

``prepare`` checks everything before any cell runs: the releases, the tasks, the tokenizers (PMP and dense
must share one), the owner's key against the release's parameters. Attackers whose inputs are missing
(``authorized`` without a key; ``recovery_init`` without a v2 key or a known public seed) are dropped with
a warning unless asked for by name. ``pmp-attack`` (``cli/attack.py``) is the command line over this.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

logger = logging.getLogger("pmp_megatron.attack")


def format_summary(summary: dict) -> str:
    """Plain text for the CLI: the verdict and the intervals that decided it per task (``report``), then the
    recovered masks' IoU. Without a decision section (an older summary) the base-loss and gain ratios."""
    from pmp_megatron.attack.report import verdict_lines

    def f(x):
        return "n/a" if x is None else f"{x:.4f}"

    if "decision" in summary:
        lines = verdict_lines(summary["decision"])
    else:
        lines = [f"base loss ratio PMP/dense: {f(summary['base_loss_ratio'])}",
                 f"{'task':<24} {'gain ratio':>12} {'authorized ratio':>18}"]
        for task, ratio in summary["gain_ratio"].items():
            lines.append(f"{task:<24} {f(ratio):>12} {f(summary['authorized_gain_ratio'].get(task)):>18}")
    chance = summary.get("chance_iou")
    for attacker, iou in summary["recovery_iou"].items():
        note = " (given the W0 seed from the owner's key: the worst case if the seed leaks)" \
            if attacker == "recovery_init" else ""
        lines.append(f"recovery IoU {attacker:<22} {f(iou)}{note}")
    if chance is not None:
        lines.append(f"recovery IoU by chance               {f(chance)}")
    return "\n".join(lines)


def check_mask_file(mask_path: str, model_dir: Path) -> float:
    """Verify the mask matches the release's parameters; return its rho."""
    from pmp_megatron.attack.runner import load_true_mask
    from pmp_megatron.release.audit import check_mask_names
    from pmp_megatron.release.reader import read_shapes

    masks, meta = load_true_mask(mask_path)
    shapes = read_shapes(model_dir)
    if shapes is not None:
        check_mask_names(masks, shapes, f"mask file {mask_path}")
    return meta["rho"]


def scratch_identity(model_dir: str | Path) -> str:
    """The scratch control's identity: its architecture (config.json) and tokenizer, not the weights."""
    import hashlib

    from pmp_megatron.release.writer import TOKENIZER_FILES, file_sha256

    model_dir = Path(model_dir)
    h = hashlib.sha256(b"scratch\0")
    tokenizer = [model_dir / n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
    for path in [model_dir / "config.json", *tokenizer]:
        h.update(f"{path.name}\0{file_sha256(path)}\0".encode())
    return h.hexdigest()[:16]


def prepare(suite: str, model: str, dense_model: str | None = None, mask: str | None = None,
            seed_for_regeneration: int | None = None, model_config: str | None = None,
            rho: float | None = None, device: str = "auto", attackers: list[str] | None = None,
            dense_matched_model: str | None = None):
    """Validate the inputs and expand the grid; return ``(cells, AttackContext)``. The scratch control
    (suite ``scratch: true``) is built from the PMP release's config.json."""
    from pmp_megatron.attack import runner
    from pmp_megatron.attack import suite as suite_mod
    from pmp_megatron.attack.tasks import ReleaseTokenizer, resolve_source
    from pmp_megatron.release.reader import check_model_dir

    spec = suite_mod.load_suite(suite)
    models = {"pmp": str(Path(model).resolve())}
    if dense_model:
        models["dense"] = str(Path(dense_model).resolve())
    if dense_matched_model:
        models["dense_matched"] = str(Path(dense_matched_model).resolve())
    for path in models.values():
        check_model_dir(path)
    for task in [*spec.tasks, *([spec.pretraining_eval] if spec.pretraining_eval else [])]:
        if task.kind == "lm":
            resolve_source(task)  # ValueError for an unknown task, before any cell runs
    lm_eval_tasks = [t.source for t in spec.tasks if t.kind == "lm_eval"]
    if lm_eval_tasks:  # a task that cannot load offline is named now, not after the first attack
        from pmp_megatron.attack import lm_eval_backend

        lm_eval_backend.check_tasks(lm_eval_tasks)
    for role in ("dense", "dense_matched"):
        if role in models and ReleaseTokenizer(models["pmp"]).sha256 != ReleaseTokenizer(models[role]).sha256:
            raise ValueError(f"the PMP and {role} releases have different tokenizers: their gains are not "
                             "comparable")
    mask_sha = None
    if mask:
        mask_rho = check_mask_file(mask, Path(models["pmp"]))
        mask_sha = runner.load_true_mask(mask)[1]["sha256"]
        rho = mask_rho if rho is None else rho
    regen = runner.regen_config_from_key(models["pmp"], mask, seed_for_regeneration, model_config)
    if attackers is not None:
        unknown = [a for a in attackers if a not in suite_mod.ATTACKERS]
        if unknown:
            raise ValueError(f"unknown attacker(s) {unknown}; known: {', '.join(suite_mod.ATTACKERS)}")
    else:
        attackers = list(spec.attackers)
        for name, missing, flag in (*((a, mask_sha is None, "--mask") for a in suite_mod.KEYED_ATTACKERS),
                                    ("recovery_init", regen is None,
                                     "--mask (a v2 key) or --seed-for-regeneration")):
            if name in attackers and missing:
                logger.warning("dropping attacker %s: it needs %s", name, flag)
                attackers.remove(name)
    model_ids = {role: runner.model_identity(path) for role, path in models.items()}
    if spec.scratch:
        models["scratch"], model_ids["scratch"] = models["pmp"], scratch_identity(models["pmp"])
    regen_id = None if regen is None else json.dumps(dataclasses.asdict(regen), sort_keys=True)
    cells = suite_mod.expand_cells(spec, model_ids, mask_sha, regen_id, attackers)
    ctx = runner.AttackContext(suite=spec, models=models, model_ids=model_ids, mask_path=mask,
                               regen_config=regen, rho=rho, device=device)
    return cells, ctx


def run_suite(suite: str, model: str, out: str, workers: int = 1, slurm: str | None = None,
              report_dir: str | None = None, **inputs) -> dict | None:
    """Run (or resume) a suite and return the report summary; ``inputs`` go to ``prepare``.

    A suite with ``engine: megatron`` runs on this job's processes together (every rank calls this):
    ``cell_loop.Preempted`` when a preemption signal stopped it (its ``exit_code`` is the job's),
    and None on every rank but global rank 0, which writes the results and the report."""
    from pmp_megatron.attack import execute, report

    cells, ctx = prepare(suite, model, **inputs)
    if ctx.suite.engine == "megatron":
        from pmp_megatron.attack import megatron_engine

        if workers > 1 or slurm:
            raise ValueError("--workers and --slurm run HF cells; a suite with engine megatron runs on the "
                             "processes of one torchrun / srun job (slurm/README.md)")
        code = megatron_engine.run_cells(cells, ctx, out)
        if code:
            from pmp_megatron.attack.cell_loop import Preempted

            raise Preempted("preempted: the interrupted cell's state is saved; rerun to resume", code)
        if not megatron_engine.is_main():
            return None
    elif slurm:
        execute.run_cells_slurm(cells, ctx, out, execute.parse_slurm_options(slurm))
    else:
        execute.run_cells(cells, ctx, out, workers=workers)
    ids = {c.id for c in cells}
    records = [r for r in execute.read_results(out) if r.get("id") in ids]
    if report_dir:
        return report.write_report(records, report_dir, ctx.suite)
    return report.full_summary(records, ctx.suite)
