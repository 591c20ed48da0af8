"""Training: one step on megatron-core, the Trainer, optimizer and schedule, checkpoints, signals."""
