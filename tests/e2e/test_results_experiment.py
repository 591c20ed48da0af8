"""``tools/run_results_experiment.py --scale smoke``: the recipes experiment (docs/results v2) end to end on
the debug model -- six pretraining runs through torchrun from one secret W0, the dense-matched search, the
releases, keys, audits, the attack grid with its controls and ablations, and the report.

Checks that the committed report can be trusted: the verdicts and intervals are recomputed here from the
raw results with the suite's rule, OUT holds only text and PNG (no weights, no masks, no seed), the keys are
0600, the grid has exactly the planned cells, and a rerun redoes nothing."""

import json
import os
import stat
import subprocess
import sys

import pytest

from pmp_megatron.attack import report as attack_report
from pmp_megatron.attack.suite import load_suite
from pmp_megatron.testing import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PMP_RUNS = ("reference", "accumulated", "per-tensor", "frozen", "redraw")
SUITE = REPO / "configs" / "attacks" / "recipes-smoke.yaml"


def _run(work, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "tools" / "run_results_experiment.py"), "--scale", "smoke",
           "--work", str(work), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("results")
    work, out = tmp / "work", tmp / "out"
    log = _run(work, out)
    return work, out, log


def test_outputs_are_text_and_png_only_and_keep_the_secrets(experiment):
    work, out, log = experiment
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".md", ".json", ".jsonl", ".png"}, sorted(map(str, files))
    for name in ("report.md", "summary.json", "results.jsonl", "pretraining.png"):
        assert (out / name).is_file(), name
    seed = (work / "private" / "w0_seed").read_text().strip()
    assert stat.S_IMODE((work / "private" / "w0_seed").stat().st_mode) == 0o600
    for path in [*files, *(work / "logs").glob("*.log")]:
        if path.suffix != ".png":
            assert seed not in path.read_text(errors="replace"), path
    assert seed not in log
    published = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert published and all("/" not in r["model"] for r in published)  # a release's name, no owner path
    for run in PMP_RUNS:
        assert (out / "attacks" / run / "report.md").is_file()
        key = work / "private" / f"{run}.safetensors"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert not list((work / "release" / run).glob("*mask*"))


def test_grid_is_the_planned_one(experiment):
    """Controls once (shared by id), three attackers' cells per release, ablations on the reference only,
    no LoRA for the key and the ablations."""
    _, out, _ = experiment
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    suite = load_suite(SUITE)
    unit = len(suite.tasks) * len(suite.seeds)  # per (model, attacker, adversary)
    full = sum(a.method == "full" for a in suite.adversaries)
    expected = 3 * len(suite.adversaries) * unit  # dense, dense-matched, scratch: keyless only
    expected += len(PMP_RUNS) * (len(suite.adversaries) + full) * unit  # keyless + key
    expected += 2 * full * unit  # the two ablations on the reference
    assert len(records) == expected == len({r["id"] for r in records})
    assert {r["role"] for r in records} == {"pmp", "dense", "dense_matched", "scratch"}
    keyed = [r for r in records if r["attacker"] != "unauthorized"]
    assert all(r["adv_method"] == "full" for r in keyed)
    ablation_models = {r["model_id"] for r in records if r["attacker"].endswith("embedding")}
    summary = json.loads((out / "summary.json").read_text())
    assert ablation_models == {summary["runs"]["reference"]["model_id"]}


def test_verdicts_match_the_raw_results(experiment):
    _, out, _ = experiment
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    suite = load_suite(SUITE)
    report = (out / "report.md").read_text()
    for run in PMP_RUNS:
        h = summary["runs"][run]
        mine = [r for r in records if r["role"] != "pmp" or r["model_id"] == h["model_id"]]
        if run != "reference":
            mine = [r for r in mine if r["role"] != "dense_matched"]
        again = attack_report.verdict_summary(mine, suite)
        assert again["verdict"] == h["verdict"]
        for task, t in again["tasks"].items():
            assert t["statistics"] == h["tasks"][task]["statistics"], (run, task)
        assert f"| {run} | {h['verdict']} |" in report
    # the matched-start statistics exist for the reference run alone
    for run in PMP_RUNS:
        has = any("gain_vs_dense_matched" in t["statistics"] for t in summary["runs"][run]["tasks"].values())
        assert has == (run == "reference"), run


def test_frozen_complement_is_regenerated_exactly_and_redraw_is_not(experiment):
    """The frozen run keeps the secret W0 outside the mask: given the seed, regeneration recovers the mask
    almost exactly (the report must not hide it); the redrawn complement is not W0 any more."""
    _, out, _ = experiment
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert runs["frozen"]["key_privacy"]["leaked_seed_iou"] > 0.99
    assert runs["redraw"]["key_privacy"]["leaked_seed_iou"] < 0.9


def test_rerun_redoes_nothing(experiment):
    work, out, _ = experiment
    before = (work / "results.jsonl").read_text()
    mtimes = {p: p.stat().st_mtime for p in (work / "runs").rglob("metrics.jsonl")}
    log = _run(work, out)
    assert (work / "results.jsonl").read_text() == before
    assert {p: p.stat().st_mtime for p in (work / "runs").rglob("metrics.jsonl")} == mtimes
    assert "started" not in log
    assert log.count(", 0 to run") == len(PMP_RUNS), log[-3000:]


def test_a_partial_grid_is_reported_as_partial(experiment, tmp_path):
    """When the budget stops the grid: a release with some of its cells says how many, one without any of
    its own cells is listed as not attacked yet, and the report says PARTIAL first."""
    import shutil

    work, out, _ = experiment
    sys.path.insert(0, str(REPO / "tools"))
    import run_results_experiment as tool
    from results_report import write_experiment_report

    scale = tool.SCALES["smoke"]
    ids = {name: {c.id for c in tool.variant_cells(work, scale, name)[0]} for name in PMP_RUNS}
    records = [json.loads(x) for x in (work / "results.jsonl").read_text().splitlines()]
    frozen_pmp = sorted(r["id"] for r in records if r["id"] in ids["frozen"] and r["role"] == "pmp")
    drop = set(frozen_pmp[: len(frozen_pmp) // 2]) | {r["id"] for r in records
                                                      if r["id"] in ids["redraw"] and r["role"] == "pmp"}
    partial = tmp_path / "work"
    shutil.copytree(work / "runs", partial / "runs", ignore=shutil.ignore_patterns("iter_*", "stage1"))
    kept_records = [r for r in records if r["id"] not in drop]
    (partial / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept_records))
    audits = {n: json.loads((work / "audits" / f"{n}.json").read_text()) for n in PMP_RUNS}
    meta = {"complete": False, "this_invocation_s": {}, "budget_minutes": 1, "cpus": 2, "torch": "x"}
    summary = write_experiment_report(partial, tmp_path / "out", scale.suite, ids, audits, meta)
    assert summary["not_attacked_yet"] == ["redraw"] and "redraw" not in summary["runs"]
    kept = len(ids["frozen"]) - len(frozen_pmp) // 2
    assert summary["runs"]["frozen"]["cells"] == [kept, len(ids["frozen"])]
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.index("**PARTIAL**") < report.index("## Verdicts")
    assert f"(partial: {kept}/{len(ids['frozen'])} cells)" in report and "not attacked yet: redraw" in report
