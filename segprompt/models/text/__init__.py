"""CLIP's text tower and the CoOp-style prompt learner used by the text guidance of
CLIP-distilled STDC-Seg (Sec. 3 of the paper; ``docs/stdc_clip.md``).

The submodules import open_clip, which takes seconds to import; this package imports nothing, so
a ResNet or ViT run never pays for it (docs/cli.md, "Start-up time").
"""

DEFAULT_WEIGHTS = "pretrained/clip/RN50.pt"  # where the CLIP RN50 file is looked for by default
