"""segprompt: an experiment runner for parameter-efficient and text-guided semantic segmentation."""

__version__ = "0.1.0"
