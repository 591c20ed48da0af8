"""``pmp-dense-matched PMP_RUN --out DIR [key=value ...]``: the dense-matched control of a PMP run
(``train/matched.py``): dense runs from the PMP run's W0 with its config, the full schedule over fewer
steps, searched until the final validation loss is within the tolerance of the PMP run's."""

from __future__ import annotations

import argparse
import sys

from pmp_megatron.cli.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmp-dense-matched",
        description="Train the dense-matched control of a finished PMP run: a dense run with the same W0, "
                    "data, optimizer and schedule shape, over fewer steps, whose final validation loss is "
                    "within --tolerance of the PMP run's. Every attempt's run dir is kept under --out; "
                    "OUT/dense_matched.json names the chosen one. A rerun reuses finished attempts.")
    parser.add_argument("pmp_run", help="the PMP run's checkpoint dir (checkpoint.dir of its pmp-pretrain)")
    parser.add_argument("--out", required=True, help="output root for the dense runs")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="the loss to match (default: the PMP run's final valid_loss)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="relative tolerance |L - target| / target (default: %(default)s)")
    parser.add_argument("--max-runs", type=int, default=8,
                        help="most dense runs to try (default: %(default)s)")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="torchrun processes per run (default: TP * PP of the PMP run's config)")
    parser.add_argument("--release", default=None, metavar="DIR",
                        help="also write the chosen run's Hugging Face release to DIR")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --release DIR")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides for every dense run, e.g. data.num_workers=1 (not model.* / "
                             "data / schedule: those are the PMP run's)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    setup_logging("INFO")
    from pmp_megatron.train.matched import RunFailed, match

    try:
        summary = match(args.pmp_run, args.out, target_loss=args.target_loss, tolerance=args.tolerance,
                        max_runs=args.max_runs, overrides=args.overrides, nproc_per_node=args.nproc_per_node)
    except RunFailed as err:
        sys.stderr.write(f"pmp-dense-matched: error: {err}\n")
        return err.returncode if err.returncode == 42 else 1
    for a in summary["attempts"]:
        sys.stdout.write(f"{a['steps']:>8d} steps  valid loss {a['valid_loss']:.4f}  {a['rel_error']:+.2%}\n")
    chosen = summary["chosen"]
    sys.stdout.write(f"target {summary['target_loss']:.4f}; dense-matched: {chosen['steps']} steps, "
                     f"{chosen['dir']}\n")
    if args.release:
        from pmp_megatron.release.from_checkpoint import release

        written = release(chosen["dir"], args.release, overwrite=args.overwrite)
        sys.stdout.write(f"release: {written}\n")
    return 0
