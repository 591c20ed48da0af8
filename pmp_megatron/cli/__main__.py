"""``python -m pmp_megatron.cli <command> ...``, the same dispatcher as ``python -m pmp_megatron``."""

from pmp_megatron.cli import main

main()
