"""Where the trainer's scalars go besides ``metrics.jsonl``: TensorBoard (``logging.tensorboard_dir``) and
Weights & Biases (``logging.wandb_project``, ``logging.wandb_mode``), written by rank 0.

``check`` runs on every rank at ``Trainer.setup``, before any compute: a configured tracker whose package
is missing fails there with one line naming the package and the extra that installs it (it used to fail
at the first metrics write, after Stage I, on rank 0 only).

Both trackers get the same scalars, ``scalars(record)``: each number of a metrics record as
``<stage>/<key>`` at its step, except the private mask's structure (Stage I's ``embedding_row_coverage``
and ``density_<type>``, ``discovery.mask_statistics``) and how the simulated mask-only fine-tune of
adversarial Stage II does (``adversarial_key_loss``), which stay in the owner's ``metrics.jsonl``: a
tracker's files are made to be shared, and wandb's online mode uploads them. No config goes to wandb:
in memory it holds the secret W0 seed.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from pmp_megatron.config import LoggingConfig

__all__ = ["check", "scalars", "Trackers"]

# plus every key starting with PRIVATE_PREFIX; adversarial_key_loss: how well the mask-only fine-tune does
PRIVATE_KEYS = frozenset({"embedding_row_coverage", "adversarial_key_loss"})
PRIVATE_PREFIX = "density_"

# config field -> (module imported to write, pip package, extra of pmp_megatron that installs it)
_NEEDS = {
    "tensorboard_dir": ("torch.utils.tensorboard", "tensorboard", "tensorboard"),
    "wandb_project": ("wandb", "wandb", "wandb"),
}


def check(cfg: LoggingConfig) -> None:
    """ValueError naming the field, the missing package and the extra, for each tracker configured."""
    for field, (module, package, extra) in _NEEDS.items():
        if getattr(cfg, field) is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            raise ValueError(f"logging.{field} needs the '{package}' package, which is not installed: "
                             f"pip install 'pmp_megatron[{extra}]' (or {package})") from None


def scalars(record: dict) -> dict[str, float]:
    """The shareable numbers of one metrics record, keyed ``<stage>/<key>`` (``step`` and ``stage`` are
    the coordinates; the mask's structure and non-numbers are left out)."""
    return {f"{record['stage']}/{key}": value for key, value in record.items()
            if key not in ("step", "stage") and key not in PRIVATE_KEYS
            and not key.startswith(PRIVATE_PREFIX)
            and isinstance(value, int | float)}


class Trackers:
    """The configured trackers of one run (rank 0); each is opened at its first write."""

    def __init__(self, cfg: LoggingConfig, run_name: str | None = None):
        self.cfg = cfg
        self.run_name = run_name  # the wandb run's name (the run directory's)
        self._tb: Any = None
        self._wandb: Any = None
        self._stages: set[str] = set()  # stages whose step metric wandb was told

    def write(self, records: Iterable[dict]) -> None:
        """Every record's ``scalars`` to each configured tracker."""
        records = list(records)
        if self.cfg.tensorboard_dir is not None:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(self.cfg.tensorboard_dir)
            for r in records:
                for key, value in scalars(r).items():
                    self._tb.add_scalar(key, value, r["step"])
            self._tb.flush()
        if self.cfg.wandb_project is not None:
            if self._wandb is None:
                import wandb

                self._wandb = wandb.init(project=self.cfg.wandb_project, mode=self.cfg.wandb_mode,
                                         name=self.run_name, reinit="create_new")
            for r in records:
                # Stage I and Stage II each count steps from 1, and wandb's own step may not go back: each
                # stage's charts are drawn over its own ``<stage>/step``
                stage = r["stage"]
                if stage not in self._stages:
                    self._wandb.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                    self._stages.add(stage)
                self._wandb.log({**scalars(r), f"{stage}/step": r["step"]})

    def close(self) -> None:
        """Flush and close what was opened (the wandb run is finished)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
            self._stages = set()
