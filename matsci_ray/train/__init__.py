"""Training on Ray Train: the worker loop, checkpoints, metrics and the trainer factory."""
