"""Models: backbones, heads, losses and the segmentor that joins them.

The tables below are the names a recipe may use (``model.backbone.name`` and so on); each maps
to an explicit constructor whose keyword arguments are the recipe's options.
"""

from segprompt.models.backbones.resnet import ResNet
from segprompt.models.backbones.vit import VisionTransformer
from segprompt.models.heads.fcn import FCNHead
from segprompt.models.heads.psp import PSPHead
from segprompt.models.heads.setr_up import SETRUPHead
from segprompt.models.losses import CrossEntropyLoss
from segprompt.models.segmentor import EncoderDecoder

BACKBONES = {"resnet": ResNet, "vit": VisionTransformer}
HEADS = {"fcn": FCNHead, "psp": PSPHead, "setr_up": SETRUPHead}
LOSSES = {"cross_entropy": CrossEntropyLoss}

__all__ = ["BACKBONES", "HEADS", "LOSSES", "EncoderDecoder"]
