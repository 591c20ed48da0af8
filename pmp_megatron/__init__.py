"""pmp_megatron: Private Mask Pre-Training (PMP) of non-fine-tunable foundation models on Megatron-Core.

Packages, lowest first (imports point one way; docs/architecture.md, enforced by
tests/unit/test_import_order.py): ``atomic`` -> ``config``, ``compat`` -> ``mcore`` (the one adapter to
megatron-core) -> ``data``, ``model`` -> ``pmp`` (masks, selection, update rule, key file) -> ``train``
(Stage I, rewind, Stage II, checkpoints) -> ``release`` (HF release, key export, leakage audit) ->
``launch`` (Slurm) -> ``attack`` (fine-tune attack suite) -> ``testing`` -> ``quickstart`` -> ``cli``
(every command, ``python -m pmp_megatron <command>``).
"""

__version__ = "0.1.0"
