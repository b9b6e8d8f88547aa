"""Evaluation: whole-image, sliding-window and test-time-augmented inference, the confusion-matrix
metrics, and the distributed evaluation loop with ``segprompt eval``."""
