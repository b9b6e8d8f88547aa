"""Putting trained runs to use: a ``Segmenter`` for Python, ``predict`` on your own images, many
runs on one frozen backbone (``MultiTaskModel``), the deployed model, ONNX/TorchScript export, and
deltas and whole checkpoints to share."""
