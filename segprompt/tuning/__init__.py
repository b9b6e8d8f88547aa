"""Tuning methods: what trains, what is inserted, what is frozen. ``tuning.name`` picks one."""

from segprompt.tuning.adaptformer import AdaptFormer
from segprompt.tuning.base import TuningContext, TuningMethod, freeze
from segprompt.tuning.basic import FullTuning, HeadTuning
from segprompt.tuning.bias import BiasTuning
from segprompt.tuning.lora import LoRA
from segprompt.tuning.partial import PartialTuning
from segprompt.tuning.scratch import LearnFromScratch
from segprompt.tuning.side import Adapter, SideTuning
from segprompt.tuning.spm import SPMTuning
from segprompt.tuning.vpt import VPT

METHODS = {
    "full": FullTuning,
    "scratch": LearnFromScratch,
    "head": HeadTuning,
    "bias": BiasTuning,
    "side": SideTuning,
    "adapter": Adapter,
    "vpt": VPT,
    "adaptformer": AdaptFormer,
    "lora": LoRA,
    "spm": SPMTuning,
    "partial": PartialTuning,
}

__all__ = ["METHODS", "TuningContext", "TuningMethod", "freeze"]
