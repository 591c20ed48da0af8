"""Attack suite: does fine-tuning a PMP release without the mask gain little, while the owner (with the
mask) recovers nearly the dense gain?

``suite`` (YAML grid -> cells), ``tasks`` (task data), ``optimizers`` (AdamW, SGD, Adafactor, Lion),
``runner`` (one cell), ``execute`` (sequential / process pool / Slurm array, resumable JSONL), ``report``
(tables, plots, summary) and ``cli`` (``pmp-attack``). The mask-recovery attackers are
``release.recovery``: the release audit runs them first.
"""

from pmp_megatron.attack.suite import Cell, Suite, expand_cells, load_suite

__all__ = ["Cell", "Suite", "expand_cells", "load_suite"]
