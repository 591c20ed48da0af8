"""pmp_megatron: Private Mask Pre-Training (PMP) of non-fine-tunable foundation models on Megatron-Core.

The package is laid out as the flow a user walks (see README.md): ``config`` (typed configs), ``mcore``
(the one adapter to megatron-core), ``compat.cpu`` (CPU/gloo shim), ``model`` (Llama-style GPT),
``pmp`` (masks, selection, discovery, update rule), then data, train, release, attack and launch.
"""

__version__ = "0.1.0"
