"""The adversarial Stage II experiment (docs/results/adversarial): one resumable command on CPU.

    python tools/run_adversarial_experiment.py [--work runs/results-v2] [--out docs/results/adversarial]
                                               [--scale full|smoke] [--budget-minutes 150]

Plan and decision rules: ``docs/results/adversarial-preregistration.md`` (committed before the first run).
It extends the recipes experiment (``tools/run_results_experiment.py``) in the same work directory: the
same secret W0, data and scale; the ``dense`` and ``accumulated`` runs, their releases, the key and the
attack cells of that experiment are reused where they exist (cells are shared by id) and made where they
do not (a fresh work directory, e.g. ``--scale smoke``). One new run, ``adversarial``
(``configs/pmp/adversarial.yaml``), is pretrained, released, its key exported (0600) and audited; then
``configs/attacks/adversarial-cpu.yaml`` attacks ``accumulated`` and ``adversarial`` next to the controls,
and the report (the recipes rule on both, the paired comparison, held-out adversaries) goes to ``--out``:
text and PNG only.

Resumable like the recipes experiment; ``--budget-minutes`` stops starting new work and writes a report
marked partial.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import run_results_experiment as recipes  # noqa: E402

logger = logging.getLogger("pmp_megatron.results")

RUNS = {"dense": "dense.yaml", "accumulated": "accumulated.yaml", "adversarial": "adversarial.yaml"}
# the adversarial release (with the controls it shares) first: the primary verdict needs it, and a run the
# budget stops then still has it
PMP_RUNS = ["adversarial", "accumulated"]
SUITES = {"full": "attacks/adversarial-cpu.yaml", "smoke": "attacks/adversarial-smoke.yaml",
          "cut": "attacks/adversarial-cpu-cut.yaml"}
# per scale, overrides of the adversarial run on top of its recipe (smoke: a debug-sized simulation)
EXTRA = {"full": (), "smoke": ("pmp.adversarial.inner_steps=2", "pmp.adversarial.proxy_rows=64")}
TITLE = "Adversarial Stage II: does training against simulated keyless fine-tuning make PMP resist it?"
PREREGISTRATION = "docs/results/adversarial-preregistration.md"
CUTS = [
    "one pretraining seed per run (base quality has no interval); 3 attack seeds;",
    "the ~4M-parameter model, 400 Stage-II steps of 16 x 128 tokens (see the recipes experiment);",
    "8 simulated fine-tuning steps per adversarial step (TAR: 64), an adversarial step every 2nd step, no "
    "sweep of the penalty weights;",
    "algorithmic proxies only (synthetic reverse and recall): the text and classification tasks test "
    "transfer;",
    "no dense-matched control for these runs; keyless adversaries of 80 steps only.",
]
CUT_SUITE = ("the copy task (--suite cut, configs/attacks/adversarial-cpu-cut.yaml; departure from the "
             "pre-registered grid): dropped to fit one session, before any adversarial-release cell ran; the "
             "recipes experiment found it uninformative at this scale (dense gain 0)")


def simulated(scale: str) -> dict:
    """The simulated attack the adversarial run trained against (its resolved settings)."""
    from pmp_megatron.config import load_config

    cfg = load_config(REPO / "configs" / "pmp" / RUNS["adversarial"], list(EXTRA[scale]))
    a = cfg.pmp.adversarial
    return {"inner_steps": a.inner_steps, "inner_optimizer": a.inner_optimizer, "inner_lr": list(a.inner_lr),
            "interval": a.interval, "objective": a.objective, "proxy": list(a.proxy)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/results-v2",
                        help="the recipes experiment's work dir (checkpoints, releases, keys; not committed)")
    parser.add_argument("--out", default="docs/results/adversarial", help="report, plots, summary, results")
    parser.add_argument("--scale", choices=sorted(recipes.SCALES), default="full")
    parser.add_argument("--budget-minutes", type=float, default=150.0,
                        help="start no new work after this many minutes of this invocation (default 150)")
    parser.add_argument("--no-adaptive", action="store_true", help="skip the adaptive key attackers' audits")
    parser.add_argument("--suite", choices=sorted(SUITES), default=None,
                        help="the attack grid (default: the scale's; 'cut' = the full grid without its copy "
                             "task, a departure the report names)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    scale = recipes.SCALES[args.scale]
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    budget, timings = recipes.Budget(args.budget_minutes), {}
    suite = SUITES[args.suite or args.scale]
    from pmp_megatron.data.prepare import prepare_builtin

    logger.info("[1/5] corpora + tokenizer (vocab %d) -> %s", scale.vocab, work / "data")
    prepare_builtin(work / "data", scale.vocab, max_docs=scale.max_docs, max_chars=scale.max_chars)
    logger.info("[2/5] pretraining (finished runs are skipped): %s", ", ".join(RUNS))
    t = time.time()
    pretrained = recipes.pretrain_all(work, scale, budget, RUNS, matched=False,
                                      extra={"adversarial": EXTRA[args.scale]})
    timings["pretraining_s"] = round(time.time() - t)
    logger.info("[3/5] releases, keys, audits")
    t = time.time()
    audits = recipes.release_all(work, not args.no_adaptive, RUNS) if pretrained else {}
    timings["release_audit_s"] = round(time.time() - t)
    logger.info("[4/5] attack suite %s", suite)
    t = time.time()
    ids, attacked = (recipes.attack_all(work, scale, budget, PMP_RUNS, suite) if pretrained
                     else ({}, False))
    timings["attacks_s"] = round(time.time() - t)
    logger.info("[5/5] report -> %s", out)
    from adversarial_report import comparison

    sim = simulated(args.scale)
    return recipes.report(
        work, out, suite, ids, audits, budget, timings, pretrained and attacked,
        {"command": f"python tools/run_adversarial_experiment.py --scale {args.scale}"
                    + (f" --suite {args.suite}" if args.suite else ""), "scale": args.scale, "suite": suite,
         "scale_settings": asdict(scale), "adversarial_overrides": EXTRA[args.scale],
         "budget_minutes": args.budget_minutes},
        title=TITLE, preregistration=PREREGISTRATION,
        cuts=CUTS + ([CUT_SUITE] if args.suite == "cut" else []),
        extra=lambda records, runs, metrics: comparison(records, runs, metrics, sim))


if __name__ == "__main__":
    sys.exit(main())
