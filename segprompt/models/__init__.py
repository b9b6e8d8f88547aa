"""Models: backbones, heads, losses and the segmentor that joins them.

The tables below are the names a recipe may use (``model.backbone.name`` and so on); each maps
to an explicit constructor whose keyword arguments are the recipe's options.
"""

from segprompt.models.backbones.resnet import ResNet
from segprompt.models.backbones.stdc import STDCContextPath
from segprompt.models.backbones.timm_backbone import timm_backbone
from segprompt.models.backbones.vit import VisionTransformer
from segprompt.models.classifier import ImageClassifier
from segprompt.models.heads.fcn import FCNHead
from segprompt.models.heads.linear_cls import LinearClsHead
from segprompt.models.heads.psp import PSPHead
from segprompt.models.heads.setr_up import SETRUPHead
from segprompt.models.heads.stdc_detail import DetailHead
from segprompt.models.heads.text_score import TextScoreHead
from segprompt.models.losses import CrossEntropyLoss, OhemCrossEntropyLoss
from segprompt.models.segmentor import EncoderDecoder

BACKBONES = {"resnet": ResNet, "vit": VisionTransformer, "stdc": STDCContextPath, "timm": timm_backbone}
HEADS = {"fcn": FCNHead, "psp": PSPHead, "setr_up": SETRUPHead, "linear_cls": LinearClsHead,
         "text_score": TextScoreHead, "stdc_detail": DetailHead}
LOSSES = {"cross_entropy": CrossEntropyLoss, "ohem_cross_entropy": OhemCrossEntropyLoss}

__all__ = ["BACKBONES", "HEADS", "LOSSES", "EncoderDecoder", "ImageClassifier"]
