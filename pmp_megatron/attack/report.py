"""Attack report: the verdict of the suite's pre-registered decision rule first, then markdown tables and
PNG plots from results JSONL, plus a summary dict.

Verdict (``verdict_summary``; evaluation v2): per task, the records' primary scores (accuracies:
``score_before`` / ``score_after``) are grouped by ``stats.group_records`` at the largest attack budget,
``stats.headline`` gives each statistic with its interval over seeds (the defender's worst case: every
model's best adversary by mean), and ``decision.evaluate`` applies the suite's rule. The release's verdict
is ``does not resist`` when any task's is, ``resists`` when every task's is, else ``inconclusive``. A task
whose dense gain interval does not lie above 0 (the attacks do not measurably work even on the dense
release, e.g. tiny smoke budgets) is ``inconclusive`` whatever the rule says. Beside
it, each task's dense gain: the mean over seeds of the dense release's best adversary, its seed-to-seed
standard deviation and their ratio (a task whose dense gain is not well above its spread cannot decide).

The older numbers follow lower down (``summarize``). Following Qi et al., they take the BEST attack
(largest task-loss gain over every adversary and seed), never the average. Definitions (per task;
diverged cells are left out):

- keyless attackers: ``unauthorized`` and every ``recovery_*`` (they need nothing but the release);
- ``gain_ratio[task]`` = best keyless gain on the PMP release / best gain on the dense release;
- ``authorized_gain_ratio[task]`` = best ``authorized`` gain on PMP / best gain on dense;
- ``base_loss_ratio`` = PMP / dense pretraining-domain eval loss before any attack (mean over cells);
- ``recovery_iou[attacker]`` = IoU of the recovered mask with the true one (when the mask was given);
- matched ratios: gain(PMP, attacker, adversary, seed) / gain(dense, unauthorized, same adversary and
  seed), over pairs with a positive dense gain (median and max in the tables).

A ratio whose dense gain is not positive is ``None``. With several PMP models in the results (different
rho), the summary's top-level numbers are those of the first PMP model in the file and ``by_model``
lists every model; ``gain_ratio_vs_rho.png`` plots them against rho.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import defaultdict
from pathlib import Path

from pmp_megatron.attack import decision as decision_mod
from pmp_megatron.attack import stats
from pmp_megatron.attack.suite import ATTACKERS, RECOVERY_ATTACKERS, Suite

logger = logging.getLogger(__name__)

KEYLESS = ("unauthorized", "unauthorized_frozen_embedding", *RECOVERY_ATTACKERS)


def _ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and r.get("gain") is not None]


def best_record(records: list[dict]) -> dict | None:
    """The finished record with the largest gain (None if there is none)."""
    records = _ok(records)
    return max(records, key=lambda r: r["gain"]) if records else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _pmp_models(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["model_id"] for r in records if r["role"] == "pmp"))


def summarize_model(records: list[dict], model_id: str) -> dict:
    """The four headline numbers for one PMP model against the dense records."""
    pmp = [r for r in records if r["role"] == "pmp" and r["model_id"] == model_id]
    dense = [r for r in records if r["role"] == "dense"]
    tasks = list(dict.fromkeys(r["task"] for r in pmp))
    gain_ratio, auth_ratio = {}, {}
    for task in tasks:
        dense_best = best_record([r for r in dense if r["task"] == task])
        dense_gain = dense_best["gain"] if dense_best else None
        keyless = best_record([r for r in pmp if r["task"] == task and r["attacker"] in KEYLESS])
        gain_ratio[task] = _ratio(keyless["gain"] if keyless else None, dense_gain)
        auth = [r for r in pmp if r["task"] == task and r["attacker"] == "authorized"]
        if auth:
            best = best_record(auth)
            auth_ratio[task] = _ratio(best["gain"] if best else None, dense_gain)
    iou = {}
    for attacker in RECOVERY_ATTACKERS:
        values = [r["iou"] for r in pmp if r["attacker"] == attacker and r.get("iou") is not None]
        if values:
            iou[attacker] = _mean(values)
    pre_pmp = _mean(r.get("pretrain_loss_before") for r in pmp)
    pre_dense = _mean(r.get("pretrain_loss_before") for r in dense)
    return {"base_loss_ratio": None if pre_pmp is None or not pre_dense else pre_pmp / pre_dense,
            "gain_ratio": gain_ratio, "authorized_gain_ratio": auth_ratio, "recovery_iou": iou}


def summarize(records: list[dict]) -> dict:
    """``{"base_loss_ratio", "gain_ratio": {task}, "authorized_gain_ratio": {task}, "recovery_iou":
    {attacker}}`` of the first PMP model, plus ``by_model`` (one entry per PMP model, with its rho)."""
    models = _pmp_models(records)
    if not models:
        return {"base_loss_ratio": None, "gain_ratio": {}, "authorized_gain_ratio": {}, "recovery_iou": {},
                "by_model": []}
    by_model = []
    for model_id in models:
        rho = next((r.get("rho") for r in records if r["model_id"] == model_id), None)
        by_model.append({"model_id": model_id, "rho": rho, **summarize_model(records, model_id)})
    top = {k: v for k, v in by_model[0].items() if k not in ("model_id", "rho")}
    return {**top, "by_model": by_model}


# ----------------------------------------------------------------------------- verdict (v2)


def _combine(verdicts: list[str]) -> str:
    if any(v == decision_mod.DOES_NOT_RESIST for v in verdicts):
        return decision_mod.DOES_NOT_RESIST
    if verdicts and all(v == decision_mod.RESISTS for v in verdicts):
        return decision_mod.RESISTS
    return decision_mod.INCONCLUSIVE


def dense_gain(grouped: stats.Grouped, budget: int) -> dict | None:
    """The dense release's best adversary (by mean score) at ``budget``: per-seed gains, mean, sd, ratio."""
    after = grouped.after[budget].get("dense")
    if not after or "dense" not in grouped.before:
        return None
    best = stats.best_attack(after, True)
    gains = stats.gains(grouped.before["dense"], best.scores, True)
    mean = sum(gains) / len(gains)
    sd = statistics.stdev(gains) if len(gains) > 1 else math.nan
    ratio = mean / sd if sd and math.isfinite(sd) else (math.inf if mean > 0 and sd == 0 else math.nan)
    clean = [None if not math.isfinite(x) else x for x in (mean, sd, ratio)]
    return {"adversary": best.adversary, "gains": gains, "mean": clean[0], "sd": clean[1],
            "mean_over_sd": clean[2]}


def verdict_summary(records: list[dict], suite: Suite) -> dict:
    """``{"verdict", "tasks": {task: {"metric", "budget", "verdict", "reasons", "statistics",
    "dense_gain"}}}`` from the v2 records (with ``score_*``) and the suite's decision rule (no rule: the
    statistics alone, verdict None)."""
    out: dict = {"verdict": None, "rule": None if suite.decision is None else {
        "resists": [f"{c.statistic} {c}" for c in suite.decision.resists],
        "does_not_resist": [f"{c.statistic} {c}" for c in suite.decision.does_not_resist]}, "tasks": {}}
    confidence = stats.CONFIDENCE if suite.decision is None else suite.decision.confidence
    verdicts = []
    for task in dict.fromkeys(r["task"] for r in records):
        mine = [r for r in records if r["task"] == task and r.get("score_before") is not None]
        if not mine:
            continue
        grouped = stats.group_records(mine, task, "score_after", "score_before", suite.seq_length,
                                      curve_key="score_curve")
        budget = max(grouped.after)
        dense_before = grouped.before.get("dense")
        threshold = None if dense_before is None else sum(dense_before) / len(dense_before)
        numbers = stats.headline(grouped.after[budget], grouped.before, True, grouped.curves or None,
                                 threshold, confidence)
        entry = {"metric": mine[0].get("metric"), "budget": budget, "seeds": grouped.seeds,
                 "statistics": {k: v.to_dict() for k, v in numbers.items()},
                 "dense_gain": dense_gain(grouped, budget), "verdict": None, "reasons": []}
        if suite.decision is not None:
            verdict = decision_mod.evaluate(suite.decision, numbers)
            entry.update(verdict.to_dict())
            gain = entry["dense_gain"]
            if gain is not None and not stats.mean_interval(gain["gains"], confidence).low > 0:
                # the dense release's own gain is not above its seed spread: the task cannot decide
                entry["verdict"] = decision_mod.INCONCLUSIVE
                entry["reasons"].append({"statistic": "dense_gain", "interval": stats.mean_interval(
                    gain["gains"], confidence).to_dict(), "threshold": "> 0", "outcome": "not met"})
            verdicts.append(entry["verdict"])
        out["tasks"][task] = entry
    if suite.decision is not None:
        out["verdict"] = _combine(verdicts)
    return out


def _interval_text(i: dict | None) -> str:
    if i is None:
        return "missing"
    low = "-inf" if i["low"] is None else format_value(i["low"])
    high = "+inf" if i["high"] is None else format_value(i["high"])
    return f"{format_value(i['estimate'])} [{low}, {high}] (n={i['n']})"


def verdict_lines(v: dict) -> list[str]:
    """Plain lines: the verdict first, then per task the intervals that decided it and the dense gain."""
    lines = [f"VERDICT: {v['verdict'] or 'none (the suite has no decision rule)'}"]
    for task, t in v["tasks"].items():
        lines.append(f"{task} ({t['metric']}, {t['budget']} attack tokens): {t['verdict'] or '-'}")
        for r in t["reasons"]:
            lines.append(f"  {r['statistic']} {r['threshold']}: {_interval_text(r['interval'])} -> "
                         f"{r['outcome']}")
        shown = {r["statistic"] for r in t["reasons"]}
        for name, i in t["statistics"].items():
            if name not in shown:
                lines.append(f"  {name}: {_interval_text(i)}")
        d = t["dense_gain"]
        if d is not None:
            lines.append(f"  dense gain {format_value(d['mean'])} +- {format_value(d['sd'])} (seed sd; "
                         f"mean/sd {format_value(d['mean_over_sd'])})")
    return lines


def _adversary_key(r: dict) -> tuple:
    """Every ``adv_*`` field (the label alone leaves some out) and the seed."""
    return (*sorted((k, str(v)) for k, v in r.items() if k.startswith("adv_")), r["seed"])


def matched_ratios(records: list[dict], model_id: str, task: str, attacker: str) -> list[float]:
    """gain(PMP cell) / gain(dense unauthorized cell with the same adversary and seed), dense gain > 0."""
    dense = {_adversary_key(r): r["gain"] for r in _ok(records) if r["role"] == "dense" and r["task"] == task}
    out = []
    for r in _ok(records):
        mine = r["role"] == "pmp" and r["model_id"] == model_id
        if mine and r["task"] == task and r["attacker"] == attacker:
            ratio = _ratio(r["gain"], dense.get(_adversary_key(r)))
            if ratio is not None:
                out.append(ratio)
    return out


def format_value(x, digits: int = 4) -> str:
    """A table cell: n/a for None, 4 significant digits for floats."""
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table (lines, ending with a blank one)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_value(c) for c in row) + " |" for row in rows]
    return lines + [""]


def markdown(records: list[dict], summary: dict) -> str:
    """The report text (the verdict first when the summary has one)."""
    ok = _ok(records)
    lines = []
    if "verdict" in summary:
        v = summary["decision"]
        lines += [f"# Verdict: {summary['verdict'] or 'none (the suite has no decision rule)'}", ""]
        if v["rule"]:
            lines += [f"Pre-registered rule: resists if ALL of {', '.join(v['rule']['resists'])}; does not "
                      f"resist if ANY of {', '.join(v['rule']['does_not_resist']) or '(none)'}; else "
                      "inconclusive. Intervals: 95 % t over seeds (paired by seed), scores in accuracy "
                      "points (higher is better), best adversary per model by mean.", ""]
        rows = []
        for task, t in v["tasks"].items():
            for r in t["reasons"]:
                rows.append([task, t["verdict"], r["statistic"], r["threshold"],
                             _interval_text(r["interval"]), r["outcome"]])
        if rows:
            lines += markdown_table(["task", "task verdict", "statistic", "threshold", "interval", "outcome"],
                                    rows)
        rows = []
        for task, t in v["tasks"].items():
            d = t["dense_gain"] or {}
            rows.append([task, t["metric"], t["budget"], len(t["seeds"]), d.get("mean"), d.get("sd"),
                         d.get("mean_over_sd"), "; ".join(f"{k} {_interval_text(i)}"
                                                         for k, i in t["statistics"].items())])
        lines += ["## Statistics per task", ""]
        lines += markdown_table(["task", "metric", "budget (tokens)", "seeds", "dense gain (mean)",
                                 "dense gain seed sd", "mean / sd", "all statistics"], rows)
    lines += ["# PMP attack report", ""]
    suites = sorted({str(r.get("suite")) for r in records})
    lines += [f"Suite(s): {', '.join(suites)}. Cells: {len(records)} ({len(ok)} ok, "
              f"{sum(r.get('status') == 'diverged' for r in records)} diverged). Headline = best attack "
              "(max gain over adversaries and seeds), gain = task eval loss before - after.", ""]
    dense = [r for r in records if r["role"] == "dense"]
    for entry in summary["by_model"]:
        mid = entry["model_id"]
        pmp = [r for r in records if r["role"] == "pmp" and r["model_id"] == mid]
        lines += [f"## PMP model {mid} (rho = {format_value(entry['rho'])})", ""]
        pre_p = _mean(r.get("pretrain_loss_before") for r in pmp)
        pre_d = _mean(r.get("pretrain_loss_before") for r in dense)
        lines += ["### Base quality (pretraining-domain eval loss before any attack)", ""]
        lines += markdown_table(["PMP", "dense", "PMP / dense"], [[pre_p, pre_d, entry["base_loss_ratio"]]])
        lines += ["### Best attack per task", ""]
        rows = []
        for task in dict.fromkeys(r["task"] for r in pmp):
            kb = best_record([r for r in pmp if r["task"] == task and r["attacker"] in KEYLESS])
            db = best_record([r for r in dense if r["task"] == task])
            ab = best_record([r for r in pmp if r["task"] == task and r["attacker"] == "authorized"])
            rows.append([task, kb and kb["gain"], kb and f"{kb['attacker']} {kb['adversary']}",
                         db and db["gain"], db and db["adversary"], entry["gain_ratio"].get(task),
                         ab and ab["gain"], entry["authorized_gain_ratio"].get(task)])
        lines += markdown_table(["task", "PMP best keyless gain", "PMP best attack", "dense best gain",
                         "dense best attack", "gain ratio PMP/dense", "authorized best gain",
                         "authorized / dense"], rows)
        lines += ["### Per attacker", "", "Matched ratio: per (adversary, seed) PMP gain / dense gain.", ""]
        rows = []
        for task in dict.fromkeys(r["task"] for r in pmp):
            for attacker in ATTACKERS:
                cells = [r for r in pmp if r["task"] == task and r["attacker"] == attacker]
                if not cells:
                    continue
                best = best_record(cells)
                ratios = matched_ratios(records, mid, task, attacker)
                rows.append([task, attacker, len(cells), best and best["gain"], best and best["adversary"],
                             _mean(r["gain"] for r in _ok(cells)),
                             statistics.median(ratios) if ratios else None, max(ratios) if ratios else None,
                             _mean(r.get("forgetting") for r in _ok(cells))])
        lines += markdown_table(["task", "attacker", "cells", "best gain", "best adversary", "mean gain",
                         "median matched ratio", "max matched ratio", "mean forgetting"], rows)
        rec_rows = []
        for attacker in RECOVERY_ATTACKERS:
            cells = [r for r in pmp if r["attacker"] == attacker]
            if cells:
                rec_rows.append([attacker, entry["recovery_iou"].get(attacker),
                                 _mean(r.get("mask_density") for r in cells),
                                 _mean(r.get("true_density") for r in cells),
                                 _mean(r.get("density_estimate") for r in cells)])
        if rec_rows:
            lines += ["### Mask recovery", ""]
            lines += markdown_table(["attacker", "IoU with true mask", "recovered density", "true density",
                             "density estimate"], rec_rows)
    diverged = defaultdict(int)
    for r in records:
        if r.get("status") == "diverged":
            diverged[(r["role"], r.get("adv_optimizer"))] += 1
    if diverged:
        lines += ["### Diverged cells", ""]
        rows = [[role, opt, n] for (role, opt), n in sorted(diverged.items(), key=str)]
        lines += markdown_table(["role", "optimizer", "cells"], rows)
    return "\n".join(lines) + "\n"


def _curve_key(r: dict) -> tuple:
    return (r["adv_method"], r["adv_optimizer"])


def plot_curves(records: list[dict], out_dir: Path) -> list[Path]:
    """Per task: task eval loss vs step, one panel per (method, optimizer), a colour per adversary (lr,
    schedule, batch, LoRA rank); PMP unauthorized solid, PMP authorized dotted, dense dashed. Seeds are
    averaged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in dict.fromkeys(r["task"] for r in records):
        cells = [r for r in _ok(records)
                 if r["task"] == task and r["attacker"] in ("unauthorized", "authorized")]
        panels = list(dict.fromkeys(_curve_key(r) for r in cells))
        if not panels:
            continue
        ncols = min(3, len(panels))
        nrows = -(-len(panels) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.8 * nrows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, panel in zip(axes.flat, panels, strict=False):
            variants = list(dict.fromkeys(r["adversary"] for r in cells if _curve_key(r) == panel))
            colours = plt.cm.viridis([i / max(1, len(variants) - 1) for i in range(len(variants))])
            for colour, adversary in zip(colours, variants, strict=True):
                for role, attacker, style in (("pmp", "unauthorized", "-"), ("pmp", "authorized", ":"),
                                              ("dense", "unauthorized", "--")):
                    group = [r for r in cells if r["adversary"] == adversary and r["role"] == role
                             and r["attacker"] == attacker]
                    if not group:
                        continue
                    by_step = defaultdict(list)
                    for r in group:
                        for step, loss in r["curve"]:
                            by_step[step].append(loss)
                    steps = sorted(by_step)
                    label = adversary.split("/", 2)[-1] if style == "-" else None
                    ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], style, color=colour,
                            label=label)
            ax.set_title(f"{task}: {panel[0]} {panel[1]}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("task eval loss")
            ax.legend(fontsize=6, title="PMP — / auth ··· / dense - -", title_fontsize=6)
        fig.tight_layout()
        path = out_dir / f"loss_curves_{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_gain_ratio_vs_rho(summary: dict, out_dir: Path) -> Path | None:
    """Best-attack gain ratio PMP/dense against rho (only with results from several rho)."""
    entries = [e for e in summary["by_model"] if e["rho"] is not None]
    if len({e["rho"] for e in entries}) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries.sort(key=lambda e: e["rho"])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    tasks = list(dict.fromkeys(t for e in entries for t in e["gain_ratio"]))
    for task in tasks:
        for key, style, what in (("gain_ratio", "o-", "keyless"),
                                 ("authorized_gain_ratio", "s--", "authorized")):
            pts = [(e["rho"], e[key].get(task)) for e in entries if e[key].get(task) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=f"{task} ({what})")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("rho (kept fraction)")
    ax.set_ylabel("best gain PMP / dense")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "gain_ratio_vs_rho.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def full_summary(records: list[dict], suite: Suite | None = None) -> dict:
    """``verdict`` and ``decision`` (``verdict_summary``; with a suite) first, then ``summarize``'s keys."""
    if suite is None:
        return summarize(records)
    v = verdict_summary(records, suite)
    return {"verdict": v["verdict"], "decision": v, **summarize(records)}


def write_report(records: list[dict], out_dir: str | Path, suite: Suite | None = None) -> dict:
    """Write ``report.md`` (the verdict first, with a suite), ``summary.json`` and the PNGs into
    ``out_dir``; return the summary dict."""
    if not records:
        raise ValueError("no result records to report on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = full_summary(records, suite)
    text = markdown(records, summary)
    pngs = plot_curves(records, out_dir)
    rho_plot = plot_gain_ratio_vs_rho(summary, out_dir)
    if rho_plot is not None:
        pngs.append(rho_plot)
    text += "\n## Plots\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in pngs)
    (out_dir / "report.md").write_text(text)
    if suite is not None:
        import json

        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    logger.info("wrote %s and %d plot(s)", out_dir / "report.md", len(pngs))
    return summary
