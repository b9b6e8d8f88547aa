"""Tuning methods: what trains, what is inserted, what is frozen. ``tuning.name`` picks one."""

from segprompt.tuning.base import TuningContext, TuningMethod, freeze
from segprompt.tuning.basic import FullTuning, HeadTuning

METHODS = {"full": FullTuning, "head": HeadTuning}

__all__ = ["METHODS", "TuningContext", "TuningMethod", "freeze"]
