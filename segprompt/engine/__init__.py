"""The engine: one training loop, evaluation, inference, metrics, checkpoints and run directories."""
