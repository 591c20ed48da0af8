"""The data pipeline, from text to training batches.

``corpora``    built-in offline corpora (``builtin:<domain>``, drawn from the Python standard library) and
               the readers for JSONL / plain text inputs.
``tokenizer``  deterministic SentencePiece training and the ``Tokenizer`` wrapper (eod = ``</s>``).
``indexed``    preprocessing into Megatron ``.bin``/``.idx`` indexed datasets (parallel, byte-reproducible);
               ``pmp-preprocess`` (``cli/preprocess.py``) is its command line.
``datasets``   megatron-core ``GPTDataset`` splits and weighted blends, the trainer's batch format and the
               resumable ``MicroBatchSampler``.

``indexed`` and ``datasets`` import megatron-core (several seconds); ``corpora`` and ``tokenizer`` do not,
so import the submodule you need rather than this package's names.
"""
