"""Learn-from-Scratch (SPM paper Tables 1-3, citing ScratchDet, Zhu et al. [60]): the backbone is
randomly re-initialised and every parameter trains."""

from __future__ import annotations

from torch import nn

from segprompt.errors import SegpromptError
from segprompt.models.backbones.timm_backbone import TimmBackbone, TimmViT
from segprompt.models.text.guidance import TextGuidance
from segprompt.tuning.base import TuningContext, TuningMethod


def reinitialise(module: nn.Module) -> None:
    """Draw fresh weights from the global RNG: Kaiming-normal convs (fan-out, ReLU gain; biases 0),
    and every other layer's own ``reset_parameters`` (BatchNorm: weight 1, bias 0, statistics reset).

    A layer holding parameters that it cannot reset itself is an error, so pretrained values can
    never survive silently.
    """
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif hasattr(m, "reset_parameters"):
            m.reset_parameters()
        elif next(m.parameters(recurse=False), None) is not None:
            raise SegpromptError(f"tuning 'scratch' cannot re-initialise '{name}' ({type(m).__name__}): it "
                                 f"holds parameters but has no reset_parameters(); use another tuning method")


class LearnFromScratch(TuningMethod):
    """Everything trains; the backbone starts from random weights even if ``model.pretrained`` was
    loaded (the builder applies the method after loading, under ``runtime.seed + 1``, so the
    re-initialisation is reproducible)."""

    def apply(self, model: nn.Module, ctx: TuningContext) -> None:
        if any(isinstance(m, TextGuidance) for m in model.backbone.modules()):
            raise SegpromptError("tuning 'scratch' would re-initialise the CLIP text guidance inside the backbone; "
                                 "train a text-guided model with tuning 'full' instead")
        if isinstance(model.backbone, (TimmBackbone, TimmViT)):  # timm's own initialisation, whole
            model.backbone.reset_parameters()
        else:
            reinitialise(model.backbone)
        model.requires_grad_(True)
