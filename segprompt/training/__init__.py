"""Training: the iteration loop (``loop.py``, read top to bottom as nanoGPT's), the optimizer and
schedule, stopping on signals, and TensorBoard logging."""
