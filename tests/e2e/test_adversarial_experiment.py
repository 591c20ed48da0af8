"""``tools/run_adversarial_experiment.py --scale smoke``: the adversarial Stage II experiment end to end on
the debug model in a fresh work directory -- dense, accumulated and adversarial runs through torchrun
from one secret W0, releases, keys, audits, the attack grid with its controls, and the report.

The committed report must be trustworthy: the paired comparison is recomputed here from the raw results,
the held-out marks follow the simulated attack, OUT holds only text and PNG with no seed, the keys are 0600,
the grid has exactly the planned cells, and a rerun redoes nothing."""

import json
import os
import stat
import statistics
import subprocess
import sys

import pytest

from pmp_megatron.attack import stats
from pmp_megatron.attack.suite import load_suite
from pmp_megatron.testing import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PMP_RUNS = ("accumulated", "adversarial")
SUITE = REPO / "configs" / "attacks" / "adversarial-smoke.yaml"


def _run(work, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "tools" / "run_adversarial_experiment.py"), "--scale", "smoke",
           "--work", str(work), "--out", str(out), "--no-adaptive"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adversarial")
    work, out = tmp / "work", tmp / "out"
    log = _run(work, out)
    return work, out, log


def test_outputs_are_text_and_png_only_and_keep_the_secrets(experiment):
    work, out, log = experiment
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".md", ".json", ".jsonl", ".png"}, sorted(map(str, files))
    seed = (work / "private" / "w0_seed").read_text().strip()
    for path in [*files, *(work / "logs").glob("*.log")]:
        if path.suffix != ".png":
            assert seed not in path.read_text(errors="replace"), path
    assert seed not in log
    for run in PMP_RUNS:
        assert stat.S_IMODE((work / "private" / f"{run}.safetensors").stat().st_mode) == 0o600
    published = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert published and all("/" not in r["model"] for r in published)  # a release's name, no owner path
    metrics = (work / "runs" / "adversarial" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in metrics]
    adversarial = [r for r in records if r.get("stage") == "train" and "adversarial_lr" in r]
    assert adversarial and all(r["step"] % 2 == 0 for r in adversarial)  # the recipe's interval


def test_grid_is_the_planned_one(experiment):
    _, out, _ = experiment
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    suite = load_suite(SUITE)
    unit = len(suite.tasks) * len(suite.seeds)
    full = sum(a.method == "full" for a in suite.adversaries)
    expected = 2 * len(suite.adversaries) * unit  # dense and scratch, keyless only
    expected += len(PMP_RUNS) * (len(suite.adversaries) + full) * unit  # keyless + the key (full only)
    assert len(records) == expected == len({r["id"] for r in records})
    assert {r["role"] for r in records} == {"pmp", "dense", "scratch"}


def _best(records, model_id, attacker, task):
    per = {}
    for r in records:
        mine = r["role"] == "pmp" and r["model_id"] == model_id
        if mine and r["attacker"] == attacker and r["task"] == task:
            per.setdefault(r["adversary"], {})[r["seed"]] = r["score_after"]
    best = max(per, key=lambda a: statistics.fmean(per[a].values()))
    return [per[best][s] for s in sorted(per[best])]


def test_the_paired_comparison_matches_the_raw_results(experiment):
    _, out, _ = experiment
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    comparison, runs = summary["comparison"], summary["runs"]
    report = (out / "report.md").read_text()
    assert comparison["simulated"]["inner_steps"] == 2  # the smoke scale's override
    for task, entry in comparison["tasks"].items():
        for kind, attacker in (("keyless", "unauthorized"), ("key", "authorized")):
            a = _best(records, runs["adversarial"]["model_id"], attacker, task)
            b = _best(records, runs["accumulated"]["model_id"], attacker, task)
            again = stats.difference_interval(a, b).to_dict()
            got = entry[f"{kind}_change"]
            assert got["estimate"] == pytest.approx(again["estimate"]), (task, kind)
            assert got["low"] == pytest.approx(again["low"]) and got["high"] == pytest.approx(again["high"])
        marks = {r["adversary"]: r["held_out"] for r in entry["per_adversary"]}
        assert all("length" in m for m in marks.values())  # 4-step cells, 2 simulated steps
        assert any("optimizer" in m for a, m in marks.items() if "sgd" in a)
        assert any("method" in m for a, m in marks.items() if a.startswith("lora"))
    assert "## Adversarial against accumulated" in report
    assert report.index("## Adversarial against accumulated") < report.index("## What was cut")
    for run in PMP_RUNS:
        assert f"| {run} | {runs[run]['verdict']} |" in report


def test_rerun_redoes_nothing(experiment):
    work, out, _ = experiment
    before = (work / "results.jsonl").read_text()
    log = _run(work, out)
    assert (work / "results.jsonl").read_text() == before
    assert "started" not in log
    assert log.count(", 0 to run") == len(PMP_RUNS), log[-3000:]
