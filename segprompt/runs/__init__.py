"""Run directories and what they hold: the folder layout and its lock, where a ``train`` goes and
what it resumes (plan), the checkpoint and delta formats, and the one loader that reads a trained
model back (``load``: run directory, checkpoint or delta; docs/api.md)."""
