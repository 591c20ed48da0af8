"""Report of the recipes experiment (``tools/run_results_experiment.py``, v2): verdicts, tables, plots.

Writes into OUT: ``report.md`` (the verdict per recipe first), ``summary.json``, ``results.jsonl`` (the
attack cells of this experiment), ``pretraining.png`` and one attack report per PMP run under
``attacks/<run>/`` (the suite's decision rule applied to that release, its intervals and curves). Text and
PNG only: no weights, no masks. The rules that read "best" are those of docs/results/v2-preregistration.md.

Every statistic comes from ``pmp_megatron.attack.stats`` / ``attack.report`` (scores are accuracies; the
best attack is each model's best adversary by mean score, the defender's worst case).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pmp_megatron.attack import report as attack_report
from pmp_megatron.attack import stats
from pmp_megatron.attack.execute import read_results
from pmp_megatron.attack.report import format_value, markdown_table
from pmp_megatron.attack.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
TITLE = "Recipes experiment: does PMP resist keyless fine-tuning at this scale?"
PREREGISTRATION = "docs/results/v2-preregistration.md"
BLIND = ("recovery_global", "recovery_per_tensor", "recovery_seed_guess", "recovery_gradient",
         "recovery_stage1")  # the recovery attackers that do not know the W0 seed
DECIDING = ("final_vs_dense", "final_vs_scratch", "key_advantage")
REFERENCE_ONLY = ("gain_vs_dense_matched", "trainability", "budget_to_threshold")
CUTS = [
    "one pretraining seed per recipe (base quality has no interval);",
    "the ~4M-parameter model, 400 Stage-II steps of 16 x 128 tokens at lr 3e-3 (the reference: "
    "TinyLlama-1.1B, 20k steps of 32 x 256 tokens at 2e-5);",
    "dense-matched only for the reference-faithful run;",
    "three keyless adversaries (AdamW 3e-4 / 1e-3, LoRA r16 1e-3) of 80 steps; no Lion, SGD, Adafactor, "
    "schedules or longer budgets;",
    "the owner's key and the ablations with the two AdamW adversaries only.",
]


def read_metrics(run_dir: Path) -> dict:
    """Train and valid curves (last record per step wins: a resumed run repeats steps), Stage I, and the
    logged Stage-II throughput."""
    train, valid, discovery, throughput = {}, {}, {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") == "discovery":
            discovery[rec["step"]] = rec
            continue
        if rec.get("loss") is not None:
            train[rec["step"]] = rec["loss"]
        if rec.get("tokens_per_s"):
            throughput[rec["step"]] = rec["tokens_per_s"]
        if rec.get("valid_loss") is not None:
            valid[rec["step"]] = rec["valid_loss"]
    if not valid:
        raise RuntimeError(f"no validation loss in {run_dir / 'metrics.jsonl'}")
    return {"train": sorted(train.items()), "valid": sorted(valid.items()),
            "discovery": [discovery[s] for s in sorted(discovery)],
            "train_records": [{"step": s, "tokens_per_s": t} for s, t in sorted(throughput.items())]}


def _interval(i: dict | None) -> str:
    if i is None:
        return "n/a"
    low = "-inf" if i["low"] is None else f"{i['low']:+.3f}"
    high = "+inf" if i["high"] is None else f"{i['high']:+.3f}"
    est = "nan" if i["estimate"] is None else f"{i['estimate']:+.3f}"
    return f"{est} [{low}, {high}]"


def _best_scores(records: list[dict], attacker: str) -> dict[str, tuple[str, list[float]]]:
    """task -> (best adversary, per-seed scores) of one attacker on one model (the best by mean score)."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in records):
        mine = [r for r in records if r["task"] == task and r["attacker"] == attacker]
        if not mine:
            continue
        seeds = sorted({r["seed"] for r in records if r["task"] == task})
        per_adv: dict[str, dict[int, float]] = {}
        for r in mine:
            value = r["score_before"] if r.get("score_after") is None else r["score_after"]
            per_adv.setdefault(r["adversary"], {})[r["seed"]] = value
        complete = {a: [v[s] for s in seeds] for a, v in per_adv.items() if sorted(v) == seeds}
        if complete:
            best = stats.best_attack(complete, True)
            out[task] = (best.adversary, list(best.scores))
    return out


def ablations(records: list[dict], model_id: str) -> dict:
    """On one release: per task, paired difference intervals of the best scores of
    ``unauthorized_frozen_embedding - unauthorized`` and ``authorized_plus_embedding - authorized``."""
    mine = [r for r in records if r["role"] == "pmp" and r["model_id"] == model_id]
    best = {a: _best_scores(mine, a) for a in ("unauthorized", "unauthorized_frozen_embedding", "authorized",
                                               "authorized_plus_embedding")}
    out = {}
    for task in best["unauthorized"]:
        entry = {}
        pairs = {"frozen_embedding_minus_keyless": ("unauthorized_frozen_embedding", "unauthorized"),
                 "key_plus_embedding_minus_key": ("authorized_plus_embedding", "authorized")}
        for name, (a, b) in pairs.items():
            if task in best[a] and task in best[b]:
                entry[name] = stats.difference_interval(best[a][task][1], best[b][task][1]).to_dict()
                entry[name]["adversaries"] = [best[a][task][0], best[b][task][0]]
        out[task] = entry
    return out


def key_privacy(audit: dict) -> dict:
    """IoU of every recovery attacker, chance, and the largest excess over chance among the attackers that
    do not know the seed; ``recovery_init`` (the true seed) apart, as the leaked-seed worst case."""
    iou = {a: v["iou"]["overall"] for a, v in audit["attackers"].items()}
    blind = {a: iou[a] for a in BLIND if a in iou}
    worst = max(blind, key=blind.get) if blind else None
    return {"chance": audit["chance_iou"], "iou": iou, "max_excess": None if worst is None else
            blind[worst] - audit["chance_iou"], "max_excess_attacker": worst,
            "leaked_seed_iou": iou.get("recovery_init")}


def stage1(metrics: dict) -> dict:
    d = metrics["discovery"]
    if not d:
        return {}
    last = d[-1]
    return {"steps": len(d), "last_iou": last.get("iou"),
            "embedding_row_coverage": last.get("embedding_row_coverage")}


def best_recipes(runs: dict) -> dict:
    """The pre-registered readings of "best" (docs/results/v2-preregistration.md)."""
    names = list(runs)
    if not names:
        return {"base_quality": None, "resistance": None, "resistance_not_distinguishable_from": [],
                "resistance_mean_final_vs_dense": {}, "key_privacy": None}
    base = min(names, key=lambda n: runs[n]["base_loss_ratio"])

    def resistance(n):
        est = [t["statistics"].get("final_vs_dense", {}).get("estimate") for t in runs[n]["tasks"].values()]
        est = [e for e in est if e is not None]
        return sum(est) / len(est) if est else math.inf

    res = min(names, key=resistance)
    ties = []
    for other in names:
        if other == res:
            continue
        overlap = True
        for task, t in runs[res]["tasks"].items():
            a = t["statistics"].get("final_vs_dense")
            b = runs[other]["tasks"].get(task, {}).get("statistics", {}).get("final_vs_dense")
            if a is None or b is None or None in (a["low"], a["high"], b["low"], b["high"]):
                continue
            if a["high"] < b["low"] or b["high"] < a["low"]:
                overlap = False
        if overlap:
            ties.append(other)
    privacy = [n for n in names if runs[n]["key_privacy"].get("max_excess") is not None]
    key = min(privacy, key=lambda n: runs[n]["key_privacy"]["max_excess"]) if privacy else None
    return {"base_quality": base, "resistance": res, "resistance_not_distinguishable_from": ties,
            "resistance_mean_final_vs_dense": {n: resistance(n) for n in names}, "key_privacy": key}


def _plot_pretraining(out: Path, metrics: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in metrics.items():
        ax.plot(*zip(*m["valid"], strict=True), "o-", label=name, ms=3)
    ax.set(xlabel="step", ylabel="valid loss", title="held-out split of the pretraining blend")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pretraining.png", dpi=110)
    plt.close(fig)
    return "pretraining.png"


def write_experiment_report(work: Path, out: Path, suite_path: str, ids: dict[str, set[str]],
                            audits: dict[str, dict], meta: dict, title: str = TITLE,
                            preregistration: str = PREREGISTRATION, cuts: list[str] = CUTS,
                            extra=None) -> dict:
    """Everything in OUT from WORK's runs, results and audits; ``ids``: PMP run -> its cells' ids.
    ``extra(records, runs, metrics)``, if given, returns ``(summary entries, markdown lines)`` added to
    the summary and to the report before its cuts."""
    suite = load_suite(REPO / "configs" / suite_path)
    out.mkdir(parents=True, exist_ok=True)
    all_ids = set().union(*ids.values())
    records = [r for r in read_results(work / "results.jsonl") if r.get("id") in all_ids]
    if not records:
        raise RuntimeError(f"no attack results for this experiment's releases in {work / 'results.jsonl'}")
    with open(out / "results.jsonl", "w") as f:  # the release named by its directory, not the owner's path
        for r in sorted(records, key=lambda r: r["id"]):
            f.write(json.dumps({**r, "model": Path(r["model"]).name}, sort_keys=True) + "\n")
    run_names = [n for n in ("dense", *ids) if (work / "runs" / n / "metrics.jsonl").is_file()]
    metrics = {n: read_metrics(work / "runs" / n) for n in run_names}
    final_valid = {n: m["valid"][-1][1] for n, m in metrics.items()}
    runs, dirs, waiting = {}, {}, []
    for name, cell_ids in ids.items():
        mine = [r for r in records if r["id"] in cell_ids]
        if not any(r["role"] == "pmp" for r in mine):  # a partial run: not attacked yet
            waiting.append(name)
            continue
        sub = out / "attacks" / name
        summary = attack_report.write_report(mine, sub, suite)
        dirs[name] = str(sub.relative_to(out))
        model_id = next(r["model_id"] for r in mine if r["role"] == "pmp")
        runs[name] = {"model_id": model_id, "verdict": summary["verdict"],
                      "cells": [len(mine), len(cell_ids)],
                      "base_loss_ratio": final_valid[name] / final_valid["dense"],
                      "tasks": summary["decision"]["tasks"], "complete": len(mine) == len(cell_ids),
                      "key_privacy": key_privacy(audits[name]) if name in audits else {},
                      "stage1": stage1(metrics[name]), "ablations": ablations(mine, model_id)}
    added, added_lines = extra(records, runs, metrics) if extra is not None else ({}, [])
    summary = {"headline": {n: {"verdict": r["verdict"], "base_loss_ratio": r["base_loss_ratio"]}
                            for n, r in runs.items()},
               "best": best_recipes(runs), "runs": runs, "not_attacked_yet": waiting,
               "valid_loss": final_valid, "cells": len(records),
               "cell_seconds": round(sum(r.get("wall_s") or 0.0 for r in records)), "meta": meta,
               "rule": None if suite.decision is None else {
                   side: [f"{c.statistic} {c}" for c in getattr(suite.decision, side)]
                   for side in ("resists", "does_not_resist")}, **added}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot = _plot_pretraining(out, metrics)
    (out / "report.md").write_text(_markdown(summary, dirs, plot, title, preregistration, cuts, added_lines))
    return summary


def _markdown(summary: dict, dirs: dict, plot: str, title: str, preregistration: str, cuts: list[str],
              added_lines: list[str]) -> str:
    runs, best, meta = summary["runs"], summary["best"], summary["meta"]
    tasks = list(dict.fromkeys(t for r in runs.values() for t in r["tasks"]))
    lines = [f"# {title}", ""]
    if not meta.get("complete"):
        lines += ["**PARTIAL**: the budget ran out before every run and cell finished; rerun the command to "
                  "continue. Verdicts below use the cells that exist"
                  + (f"; not attacked yet: {', '.join(summary['not_attacked_yet'])}"
                     if summary["not_attacked_yet"] else "") + ".", ""]
    lines += [f"## Verdicts (pre-registered rule, {preregistration})", ""]
    rows = [[n, (r["verdict"] or "-") + ("" if r["complete"] else
                                         f" (partial: {r['cells'][0]}/{r['cells'][1]} cells)"),
             format_value(r["base_loss_ratio"], 3)] +
            [r["tasks"].get(t, {}).get("verdict") or "-" for t in tasks] for n, r in runs.items()]
    lines += markdown_table(["recipe", "verdict", "base loss / dense", *tasks], rows)
    lines += ["", "## The intervals that decide (95%, 3 seeds, paired; accuracy points as fractions)", ""]
    for t in tasks:
        rows = []
        for n, r in runs.items():
            s = r["tasks"].get(t, {}).get("statistics", {})
            rows.append([n] + [_interval(s.get(k)) for k in DECIDING + REFERENCE_ONLY[:2]])
        lines += [f"### {t}", ""] + markdown_table(["recipe", *DECIDING, *REFERENCE_ONLY[:2]], rows) + [""]
        dense = next((r["tasks"][t]["dense_gain"] for r in runs.values()
                      if r["tasks"].get(t, {}).get("dense_gain")), None)
        if dense:
            lines += [f"Dense release's own best gain: {format_value(dense['mean'])} "
                      f"+- {format_value(dense['sd'])} "
                      f"(seed sd; {dense['adversary']}).", ""]
    lines += ["## Best recipe (pre-registered readings)", "",
              "- Base quality (lowest final valid loss / dense, one pretraining seed): "
              f"**{best['base_quality']}**.",
              f"- Resistance (lowest mean final_vs_dense over tasks): **{best['resistance']}**"
              + (f"; not distinguishable (intervals overlap on every task) from: "
                 f"{', '.join(best['resistance_not_distinguishable_from'])}"
                 if best["resistance_not_distinguishable_from"] else "") + ".",
              f"- Key privacy (lowest recovery IoU above chance, attackers without the seed): "
              f"**{best['key_privacy']}**.", "", "## Key privacy: mask recovery from the release alone", ""]
    attackers = sorted({a for r in runs.values() for a in r["key_privacy"].get("iou", {})})
    rows = [[n, format_value(r["key_privacy"].get("chance"), 3)] +
            [format_value(r["key_privacy"].get("iou", {}).get(a), 3) for a in attackers] +
            [format_value(r["key_privacy"].get("max_excess"), 3)] for n, r in runs.items()]
    lines += markdown_table(["recipe", "chance", *attackers, "max excess (no seed)"], rows)
    lines += ["", "`recovery_init` is given the true W0 seed: the worst case if the seed leaks.", "",
              "## Stage I", ""]
    rows = [[n, r["stage1"].get("steps"), format_value(r["stage1"].get("last_iou"), 3),
             format_value(r["stage1"].get("embedding_row_coverage"), 3)] for n, r in runs.items()]
    lines += markdown_table(["recipe", "steps", "last IoU", "input-embedding rows with a trainable entry"],
                            rows)
    ablation_lines = [f"- {n} / {t}: {name} = {_interval(i)}" for n, r in runs.items()
                      for t, entry in r["ablations"].items() for name, i in entry.items()]
    if ablation_lines:
        lines += ["", "## Mechanism ablations (reference run; paired difference of best scores)", "",
                  *ablation_lines]
    lines += ["", *added_lines, "## What was cut to fit", "", *[f"- {c}" for c in cuts], "",
              f"Cells: {summary['cells']} ({summary['cell_seconds'] / 3600:.1f} cell-hours). "
              f"This invocation: {meta['this_invocation_s']} (budget {meta['budget_minutes']} min, "
              f"{meta['cpus']} CPUs, torch {meta['torch']}).", "", f"![pretraining]({plot})", "",
              "Per-recipe attack reports: " + ", ".join(f"[{n}]({d}/report.md)" for n, d in dirs.items()), ""]
    return "\n".join(lines)
