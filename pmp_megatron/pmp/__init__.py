"""The PMP algorithm's pieces, parallel-aware and free of any training loop: ``select`` (exact distributed
top-k over every parameter), ``masks`` (per-shard masks mirroring each weight's sharded state), ``update``
(Stage II: gradient masking and the complement policies) and ``maskfile`` (the private key on disk).
The loops that use them are in ``train`` (``train.discovery`` is Stage I)."""
