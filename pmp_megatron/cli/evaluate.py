"""``pmp-eval MODEL_DIR --tasks T [T ...]``: lm-evaluation-harness on a release, offline.

The tasks are the local YAMLs of ``configs/evals`` (or ``--include-path``) and lm-eval's own registry,
through the one backend the attack suite scores ``lm_eval`` tasks with (``attack.lm_eval_backend.score``).
Writes ``OUT/eval.json`` (per task: every metric, its stderr and the number of examples; the model and
the settings) and ``OUT/eval.md`` (the table, also printed). A task that cannot load offline fails in one
line naming it, before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pmp_megatron.cli.logs import setup_logging


def table(results: dict[str, dict]) -> str:
    """Markdown table: one row per (task, metric), the stderr beside its metric."""
    lines = ["| task | metric | value | stderr | n |", "|---|---|---|---|---|"]
    for task, metrics in results.items():
        for name, value in metrics.items():
            if name == "n" or name.endswith("_stderr"):
                continue
            err = metrics.get(f"{name}_stderr")
            lines.append(f"| {task} | {name} | {_fmt(value)} | {_fmt(err)} | {metrics.get('n', '')} |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main(argv: list[str]) -> int:
    from pmp_megatron.attack import lm_eval_backend

    parser = argparse.ArgumentParser(prog="pmp-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a release directory (HF Llama: config.json, weights, tokenizer)")
    parser.add_argument("--tasks", nargs="+", required=True,
                        help="lm-eval task names, e.g. pmp_stdlib_family")
    parser.add_argument("--out", default=None, help="output directory (default: MODEL.eval)")
    parser.add_argument("--include-path", default=str(lm_eval_backend.EVALS_DIR),
                        help="folder of local task YAMLs (default: the shipped configs/evals)")
    parser.add_argument("--limit", type=float, default=None,
                        help="examples per task (a fraction when < 1; default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    setup_logging()
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise ValueError(f"model directory {args.model} has no config.json (not a release?)")
    lm_eval_backend.check_tasks(args.tasks, args.include_path)  # one line per unloadable task, no model yet
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    start = time.time()
    results = lm_eval_backend.score(model, args.tasks, include_path=args.include_path, limit=limit,
                                    device=args.device, batch_size=args.batch_size)
    from pmp_megatron.atomic import write_text_atomic

    out = Path(args.out) if args.out else model.with_name(model.name + ".eval")
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": str(model.resolve()), "tasks": results, "limit": limit, "device": args.device,
              "seconds": round(time.time() - start, 1)}
    write_text_atomic(out / "eval.json", json.dumps(record, indent=2) + "\n")
    text = table(results)
    write_text_atomic(out / "eval.md", text)
    sys.stdout.write(text)
    return 0
