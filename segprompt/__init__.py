"""segprompt: an experiment runner for parameter-efficient and text-guided semantic segmentation.

The Python API (docs/api.md): ``segprompt.load``, ``segprompt.train``, ``segprompt.evaluate`` and
``segprompt.MultiTaskModel``.
"""

__version__ = "0.1.0"

__all__ = ["MultiTaskModel", "Segmenter", "evaluate", "load", "train"]


def __getattr__(name: str):
    # lazily: the API imports torch, which `segprompt --help` and the CLI's argument errors do not
    # need (PEP 562 module __getattr__)
    if name == "MultiTaskModel":
        from segprompt.serve.multitask import MultiTaskModel

        return MultiTaskModel
    if name in ("Segmenter", "evaluate", "load", "train"):
        from segprompt import api

        return getattr(api, name)
    raise AttributeError(f"module 'segprompt' has no attribute {name!r}")
