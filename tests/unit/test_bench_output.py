"""tools/bench_pmp.py runs end to end with tiny settings and ends with its summary line: finite positive
numbers, and the MEASURED mask storage of packed masks (one bit per gradient-buffer entry: 1 bit per
parameter, a little more where the distributed optimizer pads the buffer); tools/bench_attack.py derives its
summary from the cell times it prints."""

import math
import re
import subprocess
import sys

import pytest

from pmp_megatron.testing import REPO

LAST_LINE = re.compile(r"step_ratio=(\S+) mask_bits_per_param=(\S+) select_over_backward=(\S+) ci_high=(\S+)")
FLOAT = re.compile(r"\d+\.\d{4}")


@pytest.mark.dist  # the script spawns 2 gloo processes; ~30 s on 2 idle cores
@pytest.mark.parametrize("layout", [["--tp", "2"],
                                    ["--tp", "1", "--dp", "2", "--overrides",
                                     "parallel.use_distributed_optimizer=true"]], ids=["tp2", "dp2-distopt"])
def test_bench_pmp_last_line(layout):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_pmp.py"), "--steps", "2", "--warmup", "1",
         "--block", "1", "--sizes", "debug", *layout],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) > 1, proc.stdout  # the table comes first
    match = LAST_LINE.fullmatch(lines[-1])
    assert match, f"unexpected last line: {lines[-1]!r}"
    assert all(FLOAT.fullmatch(g) for g in match.groups()), match.groups()  # 4 decimals
    step_ratio, mask_bits, select_over_backward, ci_high = map(float, match.groups())
    for value in (step_ratio, mask_bits, select_over_backward, ci_high):
        assert math.isfinite(value) and value > 0
    assert 1.0 <= mask_bits <= 1.001  # packed masks, as measured on the model: 8 bits per parameter if bool
    assert "Trainer.train" in proc.stdout and "mask_grads" in proc.stdout


def _bench_attack(tmp_path, *extra) -> tuple[list[dict], dict]:
    """tools/bench_attack.py on 2 cells of the smoke suite's copy task: its per-cell lines and summary."""
    import json

    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_attack.py"), *extra, "--suite",
         str(REPO / "configs" / "attacks" / "smoke.yaml"), "--task", "copy", "--cells", "2",
         "--work", str(tmp_path / "bench")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    cells = [json.loads(line) for line in out.splitlines() if line.startswith('{"cell"')]
    return cells, json.loads(out[out.index("{\n"):])


def test_bench_attack_reports_both_modes_and_the_ratio_of_its_own_times(tmp_path):
    """tools/bench_attack.py on 2 smoke-suite cells: every timed cell is printed, and the summary's
    cells/hour and fresh/shared ratio are those of the printed per-cell times (not constants)."""
    cells, summary = _bench_attack(tmp_path)
    assert sorted((c["cell"], c["mode"]) for c in cells) == [(0, "fresh"), (0, "shared"), (1, "fresh"),
                                                             (1, "shared")]
    cpu = {m: [c["cpu_s"] for c in sorted(cells, key=lambda c: c["cell"]) if c["mode"] == m]
           for m in ("fresh", "shared")}
    for mode in ("fresh", "shared"):
        assert summary[mode]["cells_per_cpu_hour"] == pytest.approx(3600 * 2 / sum(cpu[mode]), rel=0.02)
    ratio = sum(f / s for f, s in zip(cpu["fresh"], cpu["shared"], strict=True)) / 2
    assert summary["cpu_time_ratio_fresh_over_shared"]["mean"] == pytest.approx(ratio, rel=0.05)
    assert summary["cpu_time_ratio_fresh_over_shared"]["cells"] == 2


def test_bench_attack_compares_the_engines_on_the_same_cells(tmp_path):
    """tools/bench_attack.py --compare engines on 2 smoke-suite cells: each cell runs on both engines (the
    LoRA adversary, which megatron does not run, is not among them), both engines train it to the same
    task loss (the same cell, not merely the same name), and the summary is that of the printed times."""
    cells, summary = _bench_attack(tmp_path, "--compare", "engines")
    assert sorted((c["cell"], c["engine"]) for c in cells) == [(0, "hf"), (0, "megatron"), (1, "hf"),
                                                               (1, "megatron")]
    assert all("lora" not in c["adversary"] for c in cells)
    for i in (0, 1):
        hf, mg = (next(c for c in cells if c["cell"] == i and c["engine"] == e) for e in ("hf", "megatron"))
        assert (hf["attacker"], hf["adversary"]) == (mg["attacker"], mg["adversary"])
        assert mg["final_task_loss"] == pytest.approx(hf["final_task_loss"], rel=1e-3)
    cpu = {e: [c["cpu_s"] for c in sorted(cells, key=lambda c: c["cell"]) if c["engine"] == e]
           for e in ("hf", "megatron")}
    for engine in ("hf", "megatron"):
        assert summary[engine]["cells_per_cpu_hour"] == pytest.approx(3600 * 2 / sum(cpu[engine]), rel=0.02)
    ratio = sum(m / h for h, m in zip(cpu["hf"], cpu["megatron"], strict=True)) / 2
    assert summary["cpu_time_ratio_megatron_over_hf"]["mean"] == pytest.approx(ratio, rel=0.05)


ADVERSARIAL_LAST_LINE = re.compile(r"adversarial_step_ratio=(\S+) ci=(\S+)-(\S+) amortized_ratio=(\S+)")


@pytest.mark.dist  # 2 gloo processes, ~30 s
def test_bench_pmp_adversarial_mode_prints_the_ratio_against_plain_pmp():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_pmp.py"), "--adversarial", "--steps", "2",
         "--warmup", "1", "--sizes", "debug", "--inner-steps", "1", "--interval", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = ADVERSARIAL_LAST_LINE.fullmatch(last)
    assert match, f"unexpected last line: {last!r}"
    ratio, lo, hi, amortized = map(float, match.groups())
    assert lo <= ratio <= hi and ratio > 1  # an adversarial step does a plain step's work and more
    assert amortized == pytest.approx(1 + (ratio - 1) / 4, abs=2e-4)
    assert "plain ms" in proc.stdout and "adv ms" in proc.stdout
