"""segprompt: an experiment runner for parameter-efficient and text-guided semantic segmentation."""

__version__ = "0.1.0"

__all__ = ["MultiTaskModel"]


def __getattr__(name: str):
    # lazily: importing the engine pulls in torch, which `segprompt --help` and the CLI's
    # argument errors do not need (PEP 562 module __getattr__)
    if name == "MultiTaskModel":
        from segprompt.engine.multitask import MultiTaskModel

        return MultiTaskModel
    raise AttributeError(f"module 'segprompt' has no attribute {name!r}")
