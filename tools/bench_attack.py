"""Benchmark attack-cell throughput: one loaded model shared by the cells of a release (``runner.base_model``,
the default) against a fresh load and un-attacked evaluation per cell (``set_model_reuse(False)``, what
every cell did before), measured in the same run, interleaved cell by cell.

Synthetic releases of ``configs/model/cpu-4m.yaml`` (a PMP-like one with a complement shrunk to 0.9 W0
and a key, a dense one) are written once to WORK; the first ``--cells`` cells of the suite's grid on one
task and seed (keyless, authorized and dense cells alike) then run once per mode, alternating modes cell
by cell. Each cell's process CPU time (one torch thread) and wall time are recorded; the output is
cells/hour per mode and the per-cell time ratio (fresh / shared) with a 95% t-interval over the cells.

    python tools/bench_attack.py [--suite configs/attacks/results-cpu.yaml] [--task code_test]
                                 [--cells 6] [--work /tmp/bench_attack]

The ratio is the share of a cell spent loading the release and re-scoring it un-attacked: large when a
cell trains for a few steps (the smoke suite), close to 1 when each cell's fine-tuning dominates.

``--compare engines`` measures the two attack engines instead, on the same cells: ``hf`` (the runner, the
release shared by its cells) and ``megatron`` (``attack/megatron_engine.py``, one process: a world of one,
TP = PP = 1). The suite is run as written on ``hf`` and with ``engine: megatron`` on the other, keeping the
adversaries that engine steps (full fine-tuning with AdamW or SGD: not LoRA, not Lion) and the non-adaptive
attackers; a cell is the same (task, seed, adversary, attacker, release) on both. The output is cells/hour
per engine and the per-cell CPU-time ratio megatron / hf with a 95% t-interval::

    python tools/bench_attack.py --compare engines --cells 6
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_releases(work: Path) -> tuple[Path, Path, Path]:
    """(PMP-like release, dense release, key) of the cpu-4m architecture, built once under ``work``."""
    import torch

    from pmp_megatron.config import load_config
    from pmp_megatron.data.corpora import iter_documents
    from pmp_megatron.data.tokenizer import train_tokenizer
    from pmp_megatron.pmp import maskfile
    from pmp_megatron.release.recovery import iter_w0
    from pmp_megatron.release.writer import write_release

    pmp, dense, key = work / "pmp", work / "dense", work / "key.safetensors"
    if key.is_file():
        return pmp, dense, key
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(REPO / "configs" / "model" / "cpu-4m.yaml", ["pmp.mode=dense", "model.seed=0"]).model
    tok = work / "tok.model"
    train_tokenizer(iter_documents("prose", max_docs=300, max_chars=6000), tok, vocab_size=cfg.vocab_size)
    gen = torch.Generator().manual_seed(0)
    w0 = dict(iter_w0(cfg))
    masks = {n: torch.rand(t.shape, generator=gen) < 0.5 for n, t in w0.items()}
    weights = {"pmp": {n: torch.where(masks[n], t + 0.02 * torch.randn(t.shape, generator=gen), 0.9 * t)
                       for n, t in w0.items()},
               "dense": {n: t + 0.02 * torch.randn(t.shape, generator=gen) for n, t in w0.items()}}
    for role, out in (("pmp", pmp), ("dense", dense)):
        write_release(weights[role].items(), out, cfg, "float32", {"bench": role}, str(tok))
    maskfile.save(masks, key, rho=0.5, w0_seed=0)
    return pmp, dense, key


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    from pmp_megatron.attack.stats import mean_interval

    i = mean_interval(xs)
    return i.estimate, i.low, i.high


def summarize(times: dict[str, list[tuple[float, float]]], num: str, den: str) -> dict:
    """Cells/hour per mode from per-cell (CPU, wall) times, and the per-cell CPU-time ratio ``num / den``
    (cells paired by position) with its 95% t-interval."""
    ratios = [n[0] / d[0] for n, d in zip(times[num], times[den], strict=True)]
    est, low, high = t_interval(ratios)
    out = {mode: {"cells_per_cpu_hour": round(3600 * len(v) / sum(c for c, _ in v), 1),
                  "cells_per_wall_hour": round(3600 * len(v) / sum(w for _, w in v), 1)}
           for mode, v in times.items()}
    out[f"cpu_time_ratio_{num}_over_{den}"] = {"mean": round(est, 3), "ci95": [round(low, 3), round(high, 3)]
                                               if math.isfinite(low) else None, "cells": len(ratios)}
    return out


def _megatron_suite(suite_path: str, work: Path) -> str:
    """The suite as ``engine: megatron`` runs it (what that engine refuses dropped), written in ``work``."""
    import yaml

    from pmp_megatron.attack.suite import ADAPTIVE_ATTACKERS, MEGATRON_OPTIMIZERS
    from pmp_megatron.resources import recipe

    data = yaml.safe_load(Path(recipe(suite_path)).read_text())
    data["engine"] = "megatron"
    data["adversaries"] = [a for a in data["adversaries"]
                           if a.get("method", "full") == "full" and a.get("optimizer") in MEGATRON_OPTIMIZERS]
    data["attackers"] = [a for a in data["attackers"] if a not in ADAPTIVE_ATTACKERS]
    data["tasks"] = [t for t in data["tasks"] if t.get("kind") != "lm_eval"]
    out = work / "megatron-suite.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(out)


def _cell_key(cell) -> tuple:
    return cell.task.name, cell.seed, cell.adversary.label, cell.attacker, cell.role


def compare_engines(args) -> dict:
    """Per-cell (CPU, wall) time of the same cells on the hf and megatron engines, interleaved."""
    from pmp_megatron.attack import megatron_engine, runner
    from pmp_megatron.attack.run import prepare

    work = Path(args.work)
    pmp, dense, key = make_releases(work)
    inputs = dict(dense_model=str(dense), mask=str(key), attackers=["unauthorized", "authorized"],
                  device="cpu")
    hf_cells, hf_ctx = prepare(args.suite, str(pmp), **inputs)
    mg_cells, mg_ctx = prepare(_megatron_suite(args.suite, work), str(pmp), **inputs)
    by_key = {_cell_key(c): c for c in hf_cells}
    pairs = [(by_key[_cell_key(c)], c) for c in mg_cells
             if c.task.name == args.task and c.seed == 0 and _cell_key(c) in by_key][: args.cells]
    if len(pairs) < 2:
        sys.exit(f"bench_attack: fewer than 2 cells of task {args.task!r} at seed 0 run on both engines")
    megatron_engine._ENGINE.setup(mg_ctx.suite.megatron)
    runner._REUSE = True
    for role in dict.fromkeys(c.role for c, _ in pairs):  # each engine's one load per release, untimed
        hf, mg = next((h, m) for h, m in pairs if h.role == role)
        runner.run_cell(hf, hf_ctx)
        megatron_engine.run_cell(mg, mg_ctx)
    times = {"hf": [], "megatron": []}
    for i, (hf, mg) in enumerate(pairs):
        for engine in (("megatron", "hf") if i % 2 else ("hf", "megatron")):
            c0, w0 = time.process_time(), time.perf_counter()
            if engine == "hf":
                record = runner.run_cell(hf, hf_ctx)
            else:
                record = megatron_engine.run_cell(mg, mg_ctx)
            times[engine].append((time.process_time() - c0, time.perf_counter() - w0))
            print(json.dumps({"cell": i, "engine": engine, "adversary": hf.adversary.label, "role": hf.role,
                              "attacker": hf.attacker, "cpu_s": round(times[engine][-1][0], 4),
                              "final_task_loss": record.get("task_loss_after")}), flush=True)
    return summarize(times, "megatron", "hf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default=str(REPO / "configs" / "attacks" / "results-cpu.yaml"))
    ap.add_argument("--task", default="code_test")
    ap.add_argument("--cells", type=int, default=6, help="cells per mode (default 6)")
    ap.add_argument("--work", default="/tmp/bench_attack")
    ap.add_argument("--compare", choices=("reuse", "engines"), default="reuse",
                    help="reuse: a shared release vs a fresh load per cell (hf); engines: hf vs megatron")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.compare == "engines":
        print(json.dumps(compare_engines(args), indent=2))
        return 0
    from pmp_megatron.attack import runner
    from pmp_megatron.attack.run import prepare

    pmp, dense, key = make_releases(Path(args.work))
    cells, ctx = prepare(args.suite, str(pmp), dense_model=str(dense), mask=str(key),
                         attackers=["unauthorized", "authorized"], device="cpu")
    chosen = [c for c in cells if c.task.name == args.task and c.seed == 0][: args.cells]
    if len(chosen) < 2:
        sys.exit(f"bench_attack: the suite has fewer than 2 cells of task {args.task!r} at seed 0")
    runner._task(str(pmp), chosen[0].task, ctx.suite.seq_length, ctx.suite.eval_blocks)  # tokenize once
    runner._REUSE = True
    for role in dict.fromkeys(c.role for c in chosen):  # each shared model's one load, outside the timing
        runner.run_cell(next(c for c in chosen if c.role == role), ctx)
    times = {"shared": [], "fresh": []}
    for i, cell in enumerate(chosen):
        for mode in (("fresh", "shared") if i % 2 else ("shared", "fresh")):
            runner._REUSE = mode == "shared"  # set_model_reuse would also clear the shared models
            c0, w0 = time.process_time(), time.perf_counter()
            runner.run_cell(cell, ctx)
            times[mode].append((time.process_time() - c0, time.perf_counter() - w0))
            print(json.dumps({"cell": i, "mode": mode, "adversary": cell.adversary.label, "role": cell.role,
                              "attacker": cell.attacker, "cpu_s": round(times[mode][-1][0], 4)}), flush=True)
    print(json.dumps(summarize(times, "fresh", "shared"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
