"""``tools/run_results_experiment.py --scale smoke``: the docs/results pipeline end to end on the debug
model (five pretraining runs through torchrun, releases, private masks, audits, attacks, report).

Checks that the committed report can be trusted: the headline numbers are recomputed here from the raw
outputs (metrics.jsonl, results JSONL), OUT holds only text and PNG (no weights, no masks), the private
masks are 0600, and a rerun redoes nothing."""

import json
import os
import stat
import subprocess
import sys

import pytest

from pmp_megatron.pmp import maskfile
from pmp_megatron.testing import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PMP_RUNS = ("pmp-rho0.5", "pmp-rho0.1", "pmp-rho0.9", "frozen-rho0.5")


def _run(work, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "tools" / "run_results_experiment.py"), "--scale", "smoke",
           "--work", str(work), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("results")
    work, out = tmp / "work", tmp / "out"
    log = _run(work, out)
    return work, out, log


def _valid(work, name):
    losses = [json.loads(x) for x in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [r["valid_loss"] for r in losses if r.get("valid_loss") is not None][-1]


def test_outputs_are_text_and_png_only(experiment):
    work, out, _ = experiment
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".md", ".json", ".jsonl", ".png"}, sorted(map(str, files))
    for name in ("report.md", "summary.json", "results.jsonl", "pretraining.png", "gain_ratio_vs_rho.png",
                 "recovery_iou.png"):
        assert (out / name).is_file(), name
    for run in PMP_RUNS:
        assert (out / "attacks" / run / "report.md").is_file()
        mask = work / "private" / f"{run}.safetensors"
        assert stat.S_IMODE(mask.stat().st_mode) == 0o600
        assert not (work / "release" / run / mask.name).exists()
    assert not (work / "private" / "dense.safetensors").exists()


def test_headline_matches_raw_outputs(experiment):
    work, out, _ = experiment
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    # smoke suite: 2 adversaries x 2 tasks x 3 seeds; 5 attackers on the reference, 2 on the others, 1 on
    # dense.
    assert len(records) == 2 * 2 * 3 * (5 + 3 * 2 + 1) == summary["cells"]
    records = [r for r in records if r["task"] == "prose_heldout"]
    dense = [r for r in records if r["role"] == "dense" and r["status"] == "ok"]
    dense_best = max(r["gain"] for r in dense)
    assert summary["dense"]["best_gain"]["prose_heldout"] == pytest.approx(dense_best)
    report = (out / "report.md").read_text()
    model_ids = {r["model_id"] for r in records if r["role"] == "pmp"}
    assert len(model_ids) == 4
    for run in PMP_RUNS:
        h = summary["runs"][run]
        assert h["base_loss_ratio"] == pytest.approx(_valid(work, run) / _valid(work, "dense"))
        mine = [r for r in records if r["model_id"] == h["model_id"] and r["status"] == "ok"]
        assert mine and all(r["role"] == "pmp" and r["rho"] == h["rho"] for r in mine)
        keyless = [r["gain"] for r in mine if r["attacker"] != "authorized"]
        assert max(keyless) == pytest.approx(h["best_keyless_gain"]["prose_heldout"])
        assert h["gain_ratio"]["prose_heldout"] == pytest.approx(max(keyless) / dense_best)
        audit = json.loads((work / "release" / f"{run}.owner" / "release_audit.json").read_text())
        assert h["recovery_iou"]["recovery_global"] == audit["attackers"]["recovery_global"]["iou"]["overall"]
        embed = maskfile.load(work / "private" / f"{run}.safetensors")[0]["model.embed_tokens.weight"]
        live = float(embed.any(dim=1).float().mean())
        assert f"| {run} |" in report and f"{live:.4g} |" in report.split("## Where the mask is")[1]
    attackers = {r["attacker"] for r in records if r["rho"] == 0.1}
    assert attackers == {"unauthorized", "authorized"}
    for run in ("dense", *PMP_RUNS):
        assert f"| {run} |" in report


def test_frozen_complement_is_regenerated_exactly(experiment):
    """The frozen run keeps W0 outside the mask, so init regeneration recovers the mask almost exactly,
    and the audit says so (the report must not hide a leak)."""
    _, out, _ = experiment
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"]["frozen-rho0.5"]["recovery_iou"]["recovery_init"] > 0.99


def test_rerun_redoes_nothing(experiment):
    work, out, _ = experiment
    before = (work / "results.jsonl").read_text()
    mtimes = {p: p.stat().st_mtime for p in (work / "runs").rglob("metrics.jsonl")}
    log = _run(work, out)
    assert (work / "results.jsonl").read_text() == before
    assert {p: p.stat().st_mtime for p in (work / "runs").rglob("metrics.jsonl")} == mtimes
    assert "pretraining dense" not in log
    assert log.count(", 0 to run") == len(PMP_RUNS), log[-3000:]
