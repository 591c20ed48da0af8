"""``pmp-quickstart [--out DIR]``: the whole PMP loop on the debug model on CPU (``quickstart.run``)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str]) -> int:
    from pmp_megatron import quickstart

    parser = argparse.ArgumentParser(prog="pmp-quickstart", description=quickstart.__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    summary = quickstart.run(args.out)
    from pmp_megatron.attack.run import format_summary

    sys.stdout.write(format_summary(summary) + "\n")  # the verdict and the intervals that decided it
    sys.stdout.write(f"base_loss_ratio (PMP/dense valid loss) = {summary['base_loss_ratio']:.4f}\n")
    sys.stdout.write(f"outputs: {summary['out']}\n")
    return 0
