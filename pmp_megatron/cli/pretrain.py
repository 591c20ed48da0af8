"""``pmp-pretrain --config configs/X.yaml [key=value ...]``: PMP pretraining or the dense baseline.

Run under torchrun or srun. Resumes automatically from ``checkpoint.dir`` (Stage I included), after checking
that the config's ``model.*``, ``pmp.*`` and W0 seed match the checkpoint's: a difference fails with one
line naming the fields unless ``checkpoint.allow_changes`` lists them. Exits 42 after a preemption
checkpoint (SIGTERM/SIGUSR2, in Stage I or Stage II). ``--print-config`` prints the resolved, validated
config as the run's ``config.yaml`` would hold it and exits, without starting torch.distributed: an unset
(secret) ``model.seed`` is null there, and a ``model.seed_file`` is named, never read.
"""

from __future__ import annotations

import argparse
import sys

from pmp_megatron.cli.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmp-pretrain",
        description="PMP pretraining (pmp.mode=pmp: Stage I mask discovery, rewind, Stage II) or the dense "
                    "baseline (pmp.mode=dense) on megatron-core. Run under torchrun or srun; resumes "
                    "automatically from checkpoint.dir; exits 42 after a preemption checkpoint.")
    parser.add_argument("--config", action="append", required=True,
                        help="YAML recipe (repeatable: merged in order)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML) and exit without training")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from pmp_megatron.config import config_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        # The seed is drawn (or read from model.seed_file) by the Trainer, not here: a secret one is still
        # null, exactly as train.resume.public_config has the run's config.yaml show it.
        sys.stdout.write(config_yaml(cfg))
        return 0
    setup_logging(cfg.logging.level)
    from pmp_megatron.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
