"""``python -m pmp_megatron <command> ...``: see ``pmp_megatron.cli``."""

from pmp_megatron.cli import main

main()
