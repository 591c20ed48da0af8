"""The adversarial Stage II experiment's own readings (docs/results/adversarial-preregistration.md): the
adversarially trained release against the same recipe without it, paired by seed.

``comparison(records, runs, metrics)`` is the ``extra`` of ``results_report.write_experiment_report``:
per task, ``keyless_change`` (best keyless score, adversarial - base) and ``key_change`` (best authorized
score) with their pre-registered readings; per adversary, the keyless difference, marked with what the
training never simulated; base quality and Stage-II throughput of the two runs.
"""

from __future__ import annotations

import statistics

from results_report import _best_scores, _interval

from pmp_megatron.attack import stats
from pmp_megatron.attack.report import format_value, markdown_table

BASE, TREATED = "accumulated", "adversarial"
THRESHOLD = 0.02  # accuracy points (as a fraction) a paired difference must clear, pre-registered
BASE_COST = 1.05  # valid loss ratio above which adversarial training costs base quality


def held_out(record: dict, simulated: dict) -> list[str]:
    """What the adversary of ``record`` has that the simulated attacks never had."""
    out = [] if record["adv_steps"] == simulated["inner_steps"] else ["length"]
    if record["adv_method"] != "full":
        out.append("method")
    if record["adv_optimizer"] != simulated["inner_optimizer"]:
        out.append("optimizer")
    lo, hi = simulated["inner_lr"]
    if not lo <= record["adv_lr"] <= hi:
        out.append("lr")
    return out


def _reading(interval: dict, kind: str) -> str:
    low, high = interval["low"], interval["high"]
    if kind == "keyless":
        if high is not None and high < -THRESHOLD:
            return "lowers keyless fine-tuning"
        if low is not None and low > THRESHOLD:
            return "raises keyless fine-tuning"
        return "no detectable change"
    return "costs the owner's fine-tuning" if high is not None and high < -THRESHOLD else "no detectable cost"


def _pmp_records(records: list[dict], runs: dict, name: str) -> list[dict]:
    return [r for r in records if r["role"] == "pmp" and r["model_id"] == runs[name]["model_id"]]


def _per_adversary(base: list[dict], treated: list[dict], task: str, simulated: dict) -> list[dict]:
    rows = []
    for label in dict.fromkeys(r["adversary"] for r in treated if r["task"] == task):
        pick = {n: {r["seed"]: r["score_after"] for r in recs if r["task"] == task and r["adversary"] == label
                    and r["attacker"] == "unauthorized" and r.get("score_after") is not None}
                for n, recs in ((BASE, base), (TREATED, treated))}
        seeds = sorted(set(pick[BASE]) & set(pick[TREATED]))
        if len(seeds) < 2:
            continue
        a, b = [pick[TREATED][s] for s in seeds], [pick[BASE][s] for s in seeds]
        example = next(r for r in treated if r["adversary"] == label)
        rows.append({"adversary": label, "held_out": held_out(example, simulated),
                     "base_mean": statistics.fmean(b), "adversarial_mean": statistics.fmean(a),
                     "difference": stats.difference_interval(a, b).to_dict()})
    return rows


def _grid(records: list[dict], task: str, attacker: str) -> set[tuple[str, int]]:
    """The (adversary, seed) cells of ``attacker`` on ``task`` that have a score."""
    return {(r["adversary"], r["seed"]) for r in records
            if r["task"] == task and r["attacker"] == attacker and r.get("score_after") is not None}


def _throughput(metrics: dict, name: str) -> float | None:
    tps = [r for r in metrics.get(name, {}).get("train_records", []) if r.get("tokens_per_s")]
    return statistics.median(r["tokens_per_s"] for r in tps) if tps else None


def comparison(records: list[dict], runs: dict, metrics: dict, simulated: dict) -> tuple[dict, list[str]]:
    """(summary entries, markdown lines) of the secondary, pre-registered readings."""
    if BASE not in runs or TREATED not in runs:
        return {"comparison": None}, ["## Adversarial against accumulated", "",
                                      "Not available yet: both releases need attack cells.", ""]
    base, treated = _pmp_records(records, runs, BASE), _pmp_records(records, runs, TREATED)
    out: dict = {"tasks": {}, "simulated": simulated}
    for task in dict.fromkeys(r["task"] for r in treated):
        entry = {}
        for kind, attacker in (("keyless", "unauthorized"), ("key", "authorized")):
            if _grid(treated, task, attacker) != _grid(base, task, attacker):
                continue  # a run stopped by its budget: a best over fewer adversaries is no best
            a, b = _best_scores(treated, attacker).get(task), _best_scores(base, attacker).get(task)
            if a is None or b is None or len(a[1]) != len(b[1]):
                continue
            interval = stats.difference_interval(a[1], b[1]).to_dict()
            entry[f"{kind}_change"] = {**interval, "adversaries": [a[0], b[0]],
                                       "reading": _reading(interval, kind)}
        entry["per_adversary"] = _per_adversary(base, treated, task, simulated)
        out["tasks"][task] = entry
    ratio = runs[TREATED]["base_loss_ratio"] / runs[BASE]["base_loss_ratio"]
    out["valid_loss_ratio"] = ratio
    out["base_quality_reading"] = "costs base quality" if ratio > BASE_COST else "no cost above 5%"
    tput = {n: _throughput(metrics, n) for n in (BASE, TREATED)}
    out["stage2_time_ratio"] = (tput[BASE] / tput[TREATED]) if all(tput.values()) else None

    lines = ["## Adversarial against accumulated (pre-registered secondary readings; paired by seed)", "",
             f"Simulated in training: {simulated['inner_steps']} {simulated['inner_optimizer']} steps at lr "
             f"{simulated['inner_lr'][0]:g}-{simulated['inner_lr'][1]:g}, full fine-tuning. Differences are "
             f"adversarial minus accumulated, in accuracy points as fractions; threshold +-{THRESHOLD}.", ""]
    rows = []
    for task, e in out["tasks"].items():
        for kind in ("keyless", "key"):
            i = e.get(f"{kind}_change")
            if i is not None:
                rows.append([task, f"{kind}_change", _interval(i), i["reading"]])
    lines += markdown_table(["task", "statistic", "estimate [95% interval]", "reading"], rows)
    lines += ["", "Per keyless adversary (descriptive; held out = what the training never simulated):", ""]
    rows = [[task, r["adversary"], ", ".join(r["held_out"]) or "-", format_value(r["base_mean"], 3),
             format_value(r["adversarial_mean"], 3), _interval(r["difference"])]
            for task, e in out["tasks"].items() for r in e["per_adversary"]]
    lines += markdown_table(["task", "adversary", "held out", "accumulated", "adversarial", "difference"],
                            rows)
    time_ratio = out["stage2_time_ratio"]
    lines += ["", f"Base quality: final valid loss adversarial / accumulated = {ratio:.3f} "
                  f"({out['base_quality_reading']}; one pretraining seed).",
              "Stage-II time per step, adversarial / accumulated, from the runs' logged throughput (not run "
              f"side by side): {'n/a' if time_ratio is None else f'{time_ratio:.2f}'}.", ""]
    return {"comparison": out}, lines
