"""Logging for the commands: rank-tagged lines on stderr; ranks other than 0 show warnings and errors only."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging(level: str = "INFO") -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if rank != "0":
        logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)
