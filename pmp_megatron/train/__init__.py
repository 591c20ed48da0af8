"""Training loops on megatron-core: one step (``step``), Stage I mask discovery (``discovery``), the Trainer
(Stage I -> rewind -> Stage II, or dense), optimizer and schedule, checkpoints, preemption signals."""
