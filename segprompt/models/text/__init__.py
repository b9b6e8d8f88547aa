"""CLIP's text tower and the CoOp-style prompt learner used by the text guidance of
CLIP-distilled STDC-Seg (Sec. 3 of the paper; ``docs/stdc_clip.md``)."""

from segprompt.models.text.clip_text import CLIPTextEncoder
from segprompt.models.text.prompt_learner import PromptLearner

__all__ = ["CLIPTextEncoder", "PromptLearner"]
