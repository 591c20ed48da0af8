"""Report of the committed CPU experiment (``tools/run_results_experiment.py``): tables, plots, summary.

Writes into OUT: ``report.md``, ``summary.json``, ``results.jsonl`` (the attack cells of this
experiment), ``pretraining.png``, ``gain_ratio_vs_rho.png``, ``recovery_iou.png`` and one attack report
per PMP run under ``attacks/<run>/`` (tables and loss curves against the dense baseline). Text and PNG
only: no weights and no masks.

Definitions are those of ``pmp_megatron.attack.report`` (best attack = largest task-loss gain over the
grid; keyless = unauthorized + the recovery attackers). The base loss ratio is the PMP / dense validation
loss at the end of pretraining (the pretraining blend, held-out split).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pmp_megatron.attack import report as attack_report
from pmp_megatron.attack.execute import read_results
from pmp_megatron.attack.report import best_record, markdown_table

RECOVERY = ("recovery_global", "recovery_per_tensor", "recovery_init")


def read_metrics(run_dir: Path) -> dict:
    """Train and valid curves (last record per step wins: a resumed run repeats steps) and Stage I."""
    train, valid, discovery = {}, {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") == "discovery":
            discovery[rec["step"]] = rec
            continue
        if rec.get("loss") is not None:
            train[rec["step"]] = rec["loss"]
        if rec.get("valid_loss") is not None:
            valid[rec["step"]] = rec["valid_loss"]
    if not valid:
        raise RuntimeError(f"no validation loss in {run_dir / 'metrics.jsonl'}")
    return {"train": sorted(train.items()), "valid": sorted(valid.items()),
            "discovery": [discovery[s] for s in sorted(discovery)]}


def run_seconds(log: Path) -> float | None:
    """Wall time of one pretraining run from its log's first and last trainer timestamps (resumes and
    reruns included, since the log is appended to)."""
    stamps = [int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
              for m in re.finditer(r"^(\d\d):(\d\d):(\d\d) \[rank", log.read_text(errors="replace"), re.M)]
    if len(stamps) < 2:
        return None
    return (stamps[-1] - stamps[0]) % 86400


def _smooth(points: list[tuple[int, float]], window: int = 10) -> tuple[list[int], list[float]]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    out = []
    for i in range(len(ys)):
        chunk = ys[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return xs, out


def _plots(out: Path, metrics: dict, headline: dict, runs: dict, audits: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in metrics.items():
        line, = ax1.plot(*_smooth(m["train"]), label=name, lw=1)
        ax2.plot(*zip(*m["valid"], strict=True), "o-", color=line.get_color(), label=name, ms=3)
    ax1.set(xlabel="step", ylabel="train loss (10-step mean)", title="Stage II / dense pretraining")
    ax2.set(xlabel="step", ylabel="valid loss", title="held-out split of the pretraining blend")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pretraining.png", dpi=110)
    plt.close(fig)
    names.append("pretraining.png")

    tasks = list(dict.fromkeys(t for h in headline.values() for t in h["gain_ratio"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=True):
        decay = sorted((runs[n][0]["rho"], h) for n, h in headline.items()
                       if runs[n][0]["complement"] == "decay")
        for key, style, label in (("gain_ratio", "o-", "keyless (best of unauthorized, recovery)"),
                                  ("authorized_gain_ratio", "s--", "authorized (owner's mask)")):
            pts = [(rho, h[key].get(task)) for rho, h in decay if h[key].get(task) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=f"decay+projection: {label}")
            frozen = [(runs[n][0]["rho"], h[key].get(task)) for n, h in headline.items()
                      if runs[n][0]["complement"] == "frozen" and h[key].get(task) is not None]
            if frozen:
                ax.plot(*zip(*frozen, strict=True), "x" if key == "gain_ratio" else "+", ms=10, mew=2,
                        label=f"frozen: {label.split(' (')[0]}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xlabel="rho (fraction of weights trainable in Stage II)", ylabel="best gain PMP / dense",
               title=task)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "gain_ratio_vs_rho.png", dpi=110)
    plt.close(fig)
    names.append("gain_ratio_vs_rho.png")

    fig, ax = plt.subplots(figsize=(7, 3.8))
    run_names = list(audits)
    width = 0.8 / (len(RECOVERY) + 1)
    for i, attacker in enumerate(RECOVERY):
        vals = [audits[n]["attackers"].get(attacker, {}).get("iou", {}).get("overall", float("nan"))
                for n in run_names]
        ax.bar([j + i * width for j in range(len(run_names))], vals, width, label=attacker)
    ax.bar([j + len(RECOVERY) * width for j in range(len(run_names))],
           [audits[n]["chance_iou"] for n in run_names], width, color="lightgrey", label="chance")
    ax.set_xticks([j + 1.5 * width for j in range(len(run_names))], run_names, fontsize=8)
    ax.set(ylabel="IoU with the private mask", ylim=(0, 1.22), title="mask recovery from the release alone")
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    fig.tight_layout()
    fig.savefig(out / "recovery_iou.png", dpi=110)
    plt.close(fig)
    names.append("recovery_iou.png")
    return names


def write_experiment_report(work: Path, out: Path, runs: dict, reference: str, ids: dict[str, str],
                            cell_ids: set[str], audits: dict[str, dict], meta: dict) -> dict:
    from pmp_megatron.attack.suite import load_suite

    suite = load_suite(Path(__file__).resolve().parents[1] / "configs" / meta["scale_settings"]["suite"])
    out.mkdir(parents=True, exist_ok=True)
    id_to_run = {v: k for k, v in ids.items()}
    records = [r for r in read_results(work / "results.jsonl") if r.get("id") in cell_ids]
    strangers = {r["model_id"] for r in records} - set(id_to_run)
    if strangers:
        raise RuntimeError(f"results of unknown releases {sorted(strangers)} among this suite's cells")
    if not records:
        raise RuntimeError(f"no attack results for this experiment's releases in {work / 'results.jsonl'}")
    with open(out / "results.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    dense = [r for r in records if r["role"] == "dense"]
    metrics = {name: read_metrics(work / "runs" / name) for name in runs}
    final_valid = {name: m["valid"][-1][1] for name, m in metrics.items()}
    tasks = list(dict.fromkeys(r["task"] for r in records))

    headline, per_run_dirs = {}, {}
    for name, (pmp, _) in runs.items():
        if pmp is None:
            continue
        mine = [r for r in records if r["role"] == "pmp" and r["model_id"] == ids[name]]
        summ = attack_report.summarize_model(records, ids[name])
        best = {t: best_record([r for r in mine if r["task"] == t and r["attacker"] in attack_report.KEYLESS])
                for t in tasks}
        auth = {t: best_record([r for r in mine if r["task"] == t and r["attacker"] == "authorized"])
                for t in tasks}
        headline[name] = {
            "model_id": ids[name], "rho": pmp["rho"], "complement": pmp["complement"],
            "projection": pmp["projection"],
            "base_loss_ratio": final_valid[name] / final_valid["dense"],
            "attack_eval_base_loss_ratio": summ["base_loss_ratio"],
            "gain_ratio": summ["gain_ratio"], "authorized_gain_ratio": summ["authorized_gain_ratio"],
            "best_keyless_gain": {t: b and b["gain"] for t, b in best.items()},
            "best_keyless_attack": {t: b and f"{b['attacker']} {b['adversary']}" for t, b in best.items()},
            "best_authorized_gain": {t: b and b["gain"] for t, b in auth.items()},
            "task_loss_before": {t: b and b["task_loss_before"] for t, b in best.items()},
            "best_keyless_loss_after": {t: b and b["task_loss_after"] for t, b in best.items()},
            "best_authorized_loss_after": {t: b and b["task_loss_after"] for t, b in auth.items()},
            "recovery_iou": {a: audits[name]["attackers"][a]["iou"]["overall"]
                             for a in RECOVERY if a in audits[name]["attackers"]},
            "chance_iou": audits[name]["chance_iou"],
            "discovery_steps": len(metrics[name]["discovery"]),
        }
        sub = out / "attacks" / name
        attack_report.write_report(mine + dense, sub, suite)  # the suite's decision rule: a verdict per run
        per_run_dirs[name] = sub.relative_to(out)
    dense_best = {t: best_record([r for r in dense if r["task"] == t]) for t in tasks}
    plots = _plots(out, metrics, headline, runs, audits)

    summary = {"headline": {"reference_run": reference, **headline[reference]}, "runs": headline,
               "dense": {"valid_loss": final_valid["dense"],
                         "best_gain": {t: b and b["gain"] for t, b in dense_best.items()},
                         "best_attack": {t: b and b["adversary"] for t, b in dense_best.items()},
                         "task_loss_before": {t: b and b["task_loss_before"] for t, b in dense_best.items()},
                         "best_loss_after": {t: b and b["task_loss_after"] for t, b in dense_best.items()}},
               "valid_loss": final_valid, "cells": len(records), "meta": meta}
    summary["run_seconds"] = {name: run_seconds(work / "logs" / f"{name}.log") for name in runs
                              if (work / "logs" / f"{name}.log").is_file()}
    summary["cell_seconds"] = sum(r.get("wall_s") or 0.0 for r in records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "report.md").write_text(_markdown(summary, metrics, runs, tasks, per_run_dirs, plots, audits))
    return summary


def _minutes(seconds: dict) -> str:
    vals = [v for v in seconds.values() if v]
    return f"{min(vals) / 60:.0f}-{max(vals) / 60:.0f} min" if vals else "n/a"


def _markdown(summary, metrics, runs, tasks, per_run_dirs, plots, audits) -> str:
    meta, s = summary["meta"], summary["meta"]["scale_settings"]
    lines = ["# PMP on CPU: a small-scale experiment", "",
             f"Generated by `{meta['command']}` ({meta['cpus']} CPUs, Python {meta['python']}, "
             f"torch {meta['torch']}). Pretraining: {_minutes(summary['run_seconds'])} per run (two runs "
             f"at a time, one thread each); attacks: {summary['cells']} cells of "
             f"{summary['cell_seconds'] / max(1, summary['cells']):.0f} s each on average (two workers, one "
             "thread each). Every number below is read from the run's own outputs.", "",
             "## Setup", "",
             f"- Model `configs/{s['model_config']}`, vocab {s['vocab']}; every run starts from the same W0 "
             f"(seed) and sees the same data in the same order: {s['train_steps']} steps x "
             f"{s['global_batch']} sequences, AdamW lr {s['lr']} (cosine, {s['warmup']} warmup), wd 0.1.",
             "- Data: the built-in offline corpora (Python's own docstrings/pydoc prose and stdlib code, "
             "50/50 blend). Attack tasks are disjoint held-out domains (`prose_heldout`: pydoc topics never "
             "seen in pretraining; `code_test`: the stdlib's test sources).",
             f"- PMP runs: Stage I at most {s['discovery_steps']} steps (stop at IoU >= 0.99 for 5 steps), "
             f"rewind to W0, Stage II. `decay+projection`: decoupled weight decay on the complement and a "
             f"joint L2 projection to R = {s['projection_radius']} every tau = {s['projection_interval']} "
             "steps (R keeps the reference's per-entry complement scale; see the tool's docstring). "
             "`frozen`: the complement stays W0 bit for bit.",
             f"- Attacks: suite `configs/{s['suite']}` against every PMP release, each cell paired with the "
             "same cell on the dense release. Gain = task eval loss before - after. Headline = best attack "
             "over the grid (keyless: unauthorized + mask recovery); authorized = fine-tuning only the "
             "owner's masked-in entries.", ""]
    lines += ["## Headline", "",
              "Gains are task-loss drops (before - after the attack); ratios divide by the dense model's "
              "best gain on the same grid. A model that starts worse has more to gain, so the task losses "
              "themselves follow: before any attack, and after the best attack of each kind.",
              ""]
    rows = []
    for name, h in summary["runs"].items():
        for task in tasks:
            rows.append([name, task, h["base_loss_ratio"], h["best_keyless_gain"].get(task),
                         summary["dense"]["best_gain"].get(task), h["gain_ratio"].get(task),
                         h["authorized_gain_ratio"].get(task), h["best_keyless_attack"].get(task)])
    lines += markdown_table(["run", "task", "base loss PMP/dense", "best keyless gain", "dense best gain",
                     "gain ratio PMP/dense", "authorized gain / dense gain", "best keyless attack"], rows)
    rows = []
    d = summary["dense"]
    for task in tasks:
        rows.append(["dense", task, d["task_loss_before"].get(task), d["best_loss_after"].get(task), "-"])
        for name, h in summary["runs"].items():
            rows.append([name, task, h["task_loss_before"].get(task), h["best_keyless_loss_after"].get(task),
                         h["best_authorized_loss_after"].get(task)])
    lines += markdown_table(["release", "task", "task loss before", "after best keyless attack",
                     "after best authorized attack"], rows)
    lines += ["## Pretraining", ""]
    rows = []
    for name, m in metrics.items():
        disc = m["discovery"]
        rows.append([name, m["valid"][-1][1], m["valid"][-1][1] / summary["valid_loss"]["dense"],
                     len(disc) or "-", disc[-1].get("iou") if disc else "-"])
    lines += markdown_table(["run", "final valid loss", "/ dense", "Stage I steps", "last Stage I mask IoU"],
                            rows)
    lines += ["## Mask recovery from the release alone", "",
              "IoU of the recovered mask with the private one (the release audit; `recovery_init` "
              "regenerates W0 from the seed and marks the entries that moved).", ""]
    rows = [[name, a["chance_iou"], *(a["attackers"].get(k, {}).get("iou", {}).get("overall")
                                      for k in RECOVERY)] for name, a in audits.items()]
    lines += markdown_table(["run", "chance", *RECOVERY], rows)
    kinds = list(next(iter(audits.values()))["mask_density_by_type"])
    lines += ["## Where the mask is", "",
              "Fraction of each tensor type's entries that are masked in (trainable in Stage II), and the "
              "fraction of vocabulary rows of the input embedding with at least one masked-in entry.", ""]
    rows = [[name, *(a["mask_density_by_type"].get(k) for k in kinds), a.get("embedding_rows_trainable")]
            for name, a in audits.items()]
    lines += markdown_table(["run", *kinds, "embedding rows with a trainable entry"], rows)
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Per-run attack reports", ""]
    lines += [f"- [{name}]({d}/report.md)" for name, d in per_run_dirs.items()] + [""]
    return "\n".join(lines)
