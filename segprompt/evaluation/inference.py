"""Whole-image, sliding-window and test-time-augmented inference, and prediction export
(the files `eval --save-preds` and `segprompt predict` write, docs/predict.md).

The sliding-window grid, padding and overlap averaging follow MMSegmentation's
``EncoderDecoder.slide_inference``; multi-scale + flip augmentation averages softmax
probabilities as mmseg's ``SegTTAModel`` does.

Each model call also gets the input's *view* (docs/spm.md, "M0 follows the image";
:mod:`segprompt.data.view`), ``model(x, view=v)`` with ``v`` (B, 5) = ``(y0, x0, y1, x1, flipped)``:
the box of the image each input covers, in the image's normalised coordinates (a sliding window
its box, past 1 where the window is padded; a flipped TTA pass the whole image, flipped; a
rescaled pass the same box as unscaled). Every model segprompt builds takes it
(:class:`~segprompt.models.segmentor.EncoderDecoder`); one that has no use for it ignores it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from segprompt.config import Recipe
from segprompt.data.view import identity_view, sub_view
from segprompt.errors import SegpromptError
from segprompt.io import atomic_write_bytes

__all__ = ["MODES", "FORMATS", "whole_inference", "slide_inference", "inference", "colorize",
           "overlay", "index_dtype", "save_prediction"]

Model = Callable[[Tensor], Tensor]
MODES = ("whole", "slide")


def _resize(x: Tensor, size: tuple[int, int], align_corners: bool) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


@torch.no_grad()
def whole_inference(
    model: Model, img: Tensor, out_size: tuple[int, int], align_corners: bool = False, *,
    view: Tensor | None = None
) -> Tensor:
    """Run ``model`` once on the full image and resize its logits to ``out_size``. ``view``
    (B, 5) is ``img``'s view (default: the identity), passed on to the model."""
    if view is None:
        view = identity_view(img.shape[0], img.device)
    return _resize(model(img, view=view), out_size, align_corners)


def _windows(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """mmseg's 1-D window grid: the last window is shifted back to end at the border."""
    spans = []
    for i in range(max(size - crop + stride - 1, 0) // stride + 1):
        end = min(i * stride + crop, size)
        spans.append((max(end - crop, 0), end))
    return spans


@torch.no_grad()
def slide_inference(
    model: Model,
    img: Tensor,
    out_size: tuple[int, int],
    crop_size: tuple[int, int],
    stride: tuple[int, int],
    batch_size: int = 4,
    align_corners: bool = False,
    *,
    view: Tensor | None = None,
) -> Tensor:
    """Sliding-window inference with overlapping crops whose logits are averaged.

    Crops of all windows (and all images of the batch) are stacked and run ``batch_size`` at a
    time. A crop smaller than ``crop_size`` (the image is smaller than the crop) is zero-padded at
    the bottom/right and the padded part of its logits is discarded. ``view`` (B, 5) is ``img``'s
    view (default: the identity); the model gets each crop's: the window's box
    ``(y1 / h, x1 / w, (y1 + ch) / h, (x1 + cw) / w)`` (the padded size, so past 1 where padded)
    within ``img``'s view.
    """
    (ch, cw), (sh, sw) = crop_size, stride
    if not (0 < sh <= ch and 0 < sw <= cw):
        raise ValueError(
            f"slide inference needs 0 < stride <= crop_size, got stride {stride} and crop_size {crop_size}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    b, _, h, w = img.shape
    windows = [(y1, y2, x1, x2) for y1, y2 in _windows(h, ch, sh) for x1, x2 in _windows(w, cw, sw)]
    crops = [(window, i) for window in windows for i in range(b)]
    if view is None:
        view = identity_view(b, img.device)
    count = img.new_zeros((1, 1, h, w))
    for y1, y2, x1, x2 in windows:
        count[..., y1:y2, x1:x2] += 1

    preds: Tensor | None = None
    for start in range(0, len(crops), batch_size):
        chunk = crops[start : start + batch_size]
        batch = torch.stack([img[i, :, y1:y2, x1:x2] for (y1, y2, x1, x2), i in chunk])
        batch = F.pad(batch, (0, cw - batch.shape[-1], 0, ch - batch.shape[-2]))
        views = torch.cat([sub_view(view[i : i + 1], (y1 / h, x1 / w, (y1 + ch) / h, (x1 + cw) / w))
                           for (y1, _, x1, _), i in chunk])
        out = model(batch, view=views)
        logits = _resize(out, (ch, cw), align_corners)
        if preds is None:
            dtype = torch.promote_types(logits.dtype, torch.float32)
            preds = logits.new_zeros((b, logits.shape[1], h, w), dtype=dtype)
        for logit, ((y1, y2, x1, x2), i) in zip(logits, chunk):
            preds[i, :, y1:y2, x1:x2] += logit[:, : y2 - y1, : x2 - x1]
    return _resize(preds / count.to(preds.dtype), out_size, align_corners)


@torch.no_grad()
def inference(
    model: Model,
    img: Tensor,
    out_size: tuple[int, int],
    *,
    mode: str = "whole",
    crop_size: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    batch_size: int = 4,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    align_corners: bool = False,
) -> Tensor:
    """Segment ``img`` (B x 3 x h x w, normalised) into B x K x ``out_size`` scores.

    ``mode`` is ``'whole'`` or ``'slide'`` (which needs ``crop_size`` and ``stride``). With one
    pass (one scale, no flip) the result is that pass's raw logits. With several passes
    (multi-scale and/or horizontal flip test-time augmentation) each pass rescales the image by
    its factor (bilinear), runs ``mode`` (a flipped pass with the flipped identity view, so a
    model's M0 is mirrored too), un-flips flipped logits, and the result is the mean of
    the passes' **softmax probabilities** at ``out_size``, as in mmseg's ``SegTTAModel``: logits
    of different scales are not calibrated against each other, probabilities are comparable.
    The argmax is the prediction either way.
    """
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; valid modes: {', '.join(map(repr, MODES))}")
    if mode == "slide" and (crop_size is None or stride is None):
        raise ValueError("mode 'slide' needs both crop_size and stride")
    passes = [(scale, flipped) for scale in scales for flipped in ((False, True) if flip else (False,))]
    if not passes:
        raise ValueError("scales must name at least one scale factor")
    h, w = img.shape[-2:]

    def run(scale: float, flipped: bool) -> Tensor:
        x = _resize(img, (int(h * scale + 0.5), int(w * scale + 0.5)), align_corners)
        if flipped:
            x = x.flip(-1)
        view = identity_view(x.shape[0], x.device, flipped=flipped)  # a rescale keeps the box
        if mode == "whole":
            logits = whole_inference(model, x, out_size, align_corners, view=view)
        else:
            logits = slide_inference(model, x, out_size, crop_size, stride, batch_size, align_corners, view=view)
        return logits.flip(-1) if flipped else logits

    if len(passes) == 1:
        return run(*passes[0])
    probs = sum(run(scale, flipped).softmax(dim=1) for scale, flipped in passes)
    return probs / len(passes)


def colorize(pred: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Map an H x W array of class ids to an H x W x 3 uint8 RGB image; unknown ids are black."""
    colors = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    out = np.zeros((*pred.shape, 3), dtype=np.uint8)
    known = (pred >= 0) & (pred < len(colors))
    out[known] = colors[pred[known]]
    return out


def overlay(pred: np.ndarray, image_rgb: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """The class colours of ``pred`` (H x W ids) blended on ``image_rgb`` (H x W x 3 uint8 RGB) with
    weight ``alpha``: an H x W x 3 uint8 RGB image (``*_overlay.png``, TensorBoard's overlays)."""
    return cv2.addWeighted(image_rgb, 1.0 - alpha, colorize(pred, palette), alpha, 0.0)


def with_legend(image_rgb: np.ndarray, pred: np.ndarray, classes: Sequence[str],
                palette: Sequence[Sequence[int]]) -> np.ndarray:
    """``image_rgb`` with a legend panel on its right: a colour swatch and the name of each class
    present in ``pred``, most pixels first (``predict --legend``). A legend taller than the image
    extends it downwards with black."""
    counts = np.bincount(pred.ravel().astype(np.int64), minlength=len(classes))[:len(classes)]
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1
    row = 16
    text_w = max((cv2.getTextSize(str(classes[c]), font, scale, thick)[0][0] for c in present), default=0)
    width, height = 4 + 12 + 4 + text_w + 6, max(image_rgb.shape[0], 4 + row * len(present))
    panel = np.full((height, width, 3), 255, np.uint8)
    for i, c in enumerate(present):
        y = 4 + i * row
        panel[y:y + 12, 4:16] = palette[c] if c < len(palette) else (0, 0, 0)
        cv2.rectangle(panel, (4, y), (15, y + 11), (0, 0, 0), 1)
        cv2.putText(panel, str(classes[c]), (20, y + 10), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    canvas = np.zeros((height, image_rgb.shape[1] + width, 3), np.uint8)
    canvas[:image_rgb.shape[0], :image_rgb.shape[1]] = image_rgb
    canvas[:, image_rgb.shape[1]:] = panel
    return canvas


# what each prediction format writes, beside the input's stem (docs/predict.md)
FORMATS = {"index": "{stem}.png", "color": "{stem}_color.png", "overlay": "{stem}_overlay.png"}


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"cv2 could not encode {path.name} (shape {image.shape}, dtype {image.dtype})")
    atomic_write_bytes(path, buf.tobytes())


def index_dtype(num_classes: int) -> type:
    """The PNG depth of class ids: uint8 up to 256 classes, uint16 beyond."""
    return np.uint8 if num_classes <= 256 else np.uint16


def save_prediction(
    out_dir: Path,
    stem: str,
    pred: np.ndarray,
    image_rgb: np.ndarray,
    palette: Sequence[Sequence[int]],
    alpha: float = 0.5,
    *,
    formats: Sequence[str] = ("index", "overlay"),
    num_classes: int = 256,
    legend: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``pred`` in each of ``formats`` (:data:`FORMATS`): ``<stem>.png`` (class ids, uint8, or
    uint16 beyond 256 classes), ``<stem>_color.png`` (the palette's colours) and
    ``<stem>_overlay.png`` (colours blended on the image, ``alpha`` the colours' weight).

    ``pred`` is H x W of class ids in [0, ``num_classes``); ``image_rgb`` is the H x W x 3 uint8 RGB
    image. ``legend`` (the class names) adds a legend to the colour and overlay images
    (:func:`with_legend`). Every file is written atomically. Returns the paths, in the order of
    ``formats``.
    """
    pred = np.asarray(pred)
    image_rgb = np.asarray(image_rgb)
    if image_rgb.dtype != np.uint8 or image_rgb.shape != (*pred.shape, 3):
        raise ValueError(
            f"image_rgb must be a uint8 array of shape {(*pred.shape, 3)} to match pred, "
            f"got {image_rgb.dtype} {image_rgb.shape}"
        )
    dtype = index_dtype(num_classes)
    if pred.size and (pred.min() < 0 or pred.max() > np.iinfo(dtype).max):
        raise ValueError(f"class ids must fit a {np.dtype(dtype).name} PNG (0..{np.iinfo(dtype).max}), "
                         f"got range {pred.min()}..{pred.max()}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown prediction format(s) {unknown}; valid: {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    paths = []
    for fmt in formats:
        path = out_dir / FORMATS[fmt].format(stem=stem)
        if fmt == "index":
            image = pred.astype(dtype)
        else:
            rgb = colorize(pred, palette) if fmt == "color" else overlay(pred, image_rgb, palette, alpha)
            if legend is not None:
                rgb = with_legend(rgb, pred, legend, palette)
            image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        _write_png(path, image)
        paths.append(path)
    return paths


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


SLIDE_WINDOW = "--set evaluation.crop_size=[512,512] --set evaluation.stride=[341,341]"  # e.g.
SLIDE_FIX = f"add e.g. {SLIDE_WINDOW}"


def check_mode(cfg: Recipe, mode: str, *, where: str = "the recipe", fix: str = SLIDE_FIX) -> None:
    """``--mode`` names an inference mode, and slide mode has its window in the recipe (``where``
    names it in the error, ``fix`` says what to do)."""
    if mode not in MODES:
        raise SegpromptError(f"--mode '{mode}' is not one of: {', '.join(MODES)}")
    if mode == "slide" and (cfg.evaluation.crop_size is None or cfg.evaluation.stride is None):
        raise SegpromptError(f"--mode slide needs evaluation.crop_size and evaluation.stride in {where}; {fix}")


def segment_logits(model: torch.nn.Module, img: torch.Tensor, out_size: tuple[int, int], cfg: Recipe,
                   device: torch.device, *, mode: str, tta: bool) -> torch.Tensor:
    """B x K x ``out_size`` scores of normalised images ``img``, with the recipe's evaluation settings
    (window, TTA scales and flip, align_corners, autocast): the one inference call of ``eval`` and
    ``predict`` (docs/predict.md)."""
    ev = cfg.evaluation
    with autocast(device, cfg.runtime.amp):
        return inference(model, img, out_size, mode=mode, crop_size=ev.crop_size, stride=ev.stride,
                         batch_size=ev.slide_batch, scales=ev.tta_scales if tta else [1.0],
                         flip=ev.tta_flip and tta, align_corners=cfg.model.align_corners)
