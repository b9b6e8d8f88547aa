"""Training and test transforms equivalent to MMSegmentation's pipelines, in OpenCV/NumPy.

Training: ``RandomResize``/``RandomChoiceResize`` → ``RandomCrop`` (with ``cat_max_ratio``) →
``RandomFlip`` → ``PhotoMetricDistortion`` → pad to the crop size. Test: keep-ratio ``Resize``.
Images are HxWx3 uint8 RGB arrays and labels HxW uint8 class ids; images stay uint8 throughout
(brightness/contrast/saturation/hue are 256-entry lookup tables) and normalization happens later,
on the device, with :func:`normalize`.

Every random draw comes from the ``numpy.random.Generator`` passed in, so a sample's augmentation
depends on its own seed only, not on the number of workers or on global random state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

__all__ = ["TrainTransform", "TestTransform", "normalize", "to_tensor", "label_to_tensor", "rescale_size"]

_CROP_TRIES = 10


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``rescale_size``: the (h, w) that fits ``(h, w)`` into ``scale`` keeping the aspect ratio.

    ``scale`` is read as (long edge, short edge) whatever its order: the factor is
    ``min(max(scale) / max(h, w), min(scale) / min(h, w))``.
    """
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _resize_shape(h: int, w: int, scale: tuple[int, int], keep_ratio: bool) -> tuple[int, int]:
    if keep_ratio:
        return rescale_size(h, w, scale)
    return scale[1], scale[0]  # mmseg scale is (w, h) when the ratio is not kept


def _pair(value: Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if len(value) != 2 or min(value) <= 0:
        raise ValueError(f"{name} must be two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _affine_lut(alpha: float, beta: float) -> np.ndarray:
    """Lookup table of mmseg's ``convert``: ``uint8(clip(x * alpha + beta, 0, 255))``."""
    return np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)


@dataclass
class TrainTransform:
    """Random resize, crop, flip and photometric distortion of an image and its label.

    Args:
        scale: mmseg ``scale`` as (long, short), e.g. (2048, 512). With ``keep_ratio`` the image is
            rescaled by ``min(long / max(h, w), short / min(h, w))``; without, resized to exactly
            ``w = scale[0], h = scale[1]``. ``None`` (and no ``scales``) keeps the input size.
        ratio_range: mmseg ``RandomResize``: the target is ``scale * uniform(*ratio_range)``.
        scales: mmseg ``RandomChoiceResize``: one of these scales, chosen uniformly.
        keep_ratio: keep the aspect ratio when resizing.
        crop_size: (h, w) of the random crop; smaller results are padded to it. ``None``: no crop.
        cat_max_ratio: retry the crop (up to 10 tries, else the last one is kept) until the most
            frequent labelled class covers less than this fraction of the labelled pixels and more
            than one class is present. 1.0 disables the check.
        flip_prob: probability of a horizontal flip.
        photometric: mmseg ``PhotoMetricDistortion`` (brightness ±32, contrast 0.5–1.5, saturation
            0.5–1.5, hue ±18 on OpenCV's 0–180 scale, each with probability 0.5; contrast before or
            after saturation/hue at random). Saturation and hue share one HSV round trip where mmseg
            makes two; that changes pixels by HSV rounding only (at most a few levels).
        ignore_index: label value of padded pixels, never counted by ``cat_max_ratio``.
        pad_value: RGB value of padded image pixels. MMSegmentation pads the *normalized* image
            with 0, i.e. with the mean colour; the builder passes the rounded ``data.mean``.
    """

    scale: tuple[int, int] | None = None
    ratio_range: tuple[float, float] | None = None
    scales: list[tuple[int, int]] | None = None
    keep_ratio: bool = True
    crop_size: tuple[int, int] | None = None
    cat_max_ratio: float = 1.0
    flip_prob: float = 0.5
    photometric: bool = True
    ignore_index: int = 255
    pad_value: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        self.scale = _pair(self.scale, "scale")
        self.crop_size = _pair(self.crop_size, "crop_size")
        if self.scales is not None:
            if self.scale is not None:
                raise ValueError("scale and scales are mutually exclusive: give one of them")
            if not self.scales:
                raise ValueError("scales must list at least one (long, short) scale")
            self.scales = [_pair(s, "each of scales") for s in self.scales]
        if self.ratio_range is not None:
            if self.scales is not None:
                raise ValueError("ratio_range and scales are mutually exclusive: give one of them")
            if self.scale is None:
                raise ValueError("ratio_range needs a base scale")
            lo, hi = (float(r) for r in self.ratio_range)
            if not 0 < lo <= hi:
                raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {self.ratio_range!r}")
            self.ratio_range = (lo, hi)
        if not 0.0 < self.cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if not 0 <= self.ignore_index <= 255:
            raise ValueError(f"ignore_index must fit a uint8 label, got {self.ignore_index}")

    def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                 return_view: bool = False):
        """``(img, label)``; with ``return_view=True`` ``(img, label, view)``, where ``view`` is the
        ``(y0, x0, y1, x1, flipped)`` tuple of floats saying which part of the *input* image the
        output covers (normalised coordinates, see :mod:`segprompt.data.view` and docs/spm.md): the
        resize changes nothing, the crop sets the box, the padding extends it past the image
        (bottom, and right, or left of the box when flipped), the flip sets the flag. Tracking the
        geometry draws no random numbers, so the augmentation is the same either way."""
        if img.shape[:2] != label.shape:
            raise ValueError(f"image {img.shape[:2]} and label {label.shape} sizes differ")
        img, label = self._resize(img, label, rng)
        h, w = label.shape
        y0, x0, y1, x1 = 0.0, 0.0, 1.0, 1.0
        if self.crop_size is not None:
            img, label, (y, x) = self._crop(img, label, rng)
            y0, x0, y1, x1 = y / h, x / w, (y + label.shape[0]) / h, (x + label.shape[1]) / w
        flipped = rng.random() < self.flip_prob
        if flipped:
            img, label = cv2.flip(img, 1), cv2.flip(label, 1)
        if self.photometric:
            img = self._photometric(img, rng)
        if self.crop_size is not None:
            ph, pw = max(self.crop_size[0] - label.shape[0], 0), max(self.crop_size[1] - label.shape[1], 0)
            img, label = self._pad(img, label)
            y1 += ph / h
            if flipped:  # the padding is at the right of the mirrored crop: left of the box
                x0 -= pw / w
            else:
                x1 += pw / w
        img, label = np.ascontiguousarray(img), np.ascontiguousarray(label)
        if return_view:
            return img, label, (y0, x0, y1, x1, 1.0 if flipped else 0.0)
        return img, label

    def _target_scale(self, rng: np.random.Generator) -> tuple[int, int] | None:
        if self.scales is not None:
            return self.scales[int(rng.integers(len(self.scales)))]
        if self.ratio_range is not None:
            ratio = rng.uniform(*self.ratio_range)
            return int(self.scale[0] * ratio), int(self.scale[1] * ratio)
        return self.scale

    def _resize(self, img: np.ndarray, label: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        scale = self._target_scale(rng)
        if scale is None:
            return img, label
        h, w = _resize_shape(*label.shape, scale, self.keep_ratio)
        if (h, w) == label.shape:
            return img, label
        return (cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR),
                cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST))

    def _crop(self, img: np.ndarray, label: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        ch, cw = self.crop_size
        h, w = label.shape
        for _ in range(_CROP_TRIES):
            y = int(rng.integers(max(h - ch, 0) + 1))
            x = int(rng.integers(max(w - cw, 0) + 1))
            crop = label[y:y + ch, x:x + cw]
            if self.cat_max_ratio >= 1.0 or self._balanced(crop):
                break
        return img[y:y + ch, x:x + cw], crop, (y, x)

    def _balanced(self, crop: np.ndarray) -> bool:
        counts = np.bincount(crop.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def _photometric(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        brightness = rng.uniform(-32, 32) if rng.integers(2) else None
        contrast_first = bool(rng.integers(2))
        contrast = rng.uniform(0.5, 1.5) if rng.integers(2) else None
        saturation = rng.uniform(0.5, 1.5) if rng.integers(2) else None
        hue = int(rng.integers(-18, 19)) if rng.integers(2) else None

        before = _affine_lut(1.0, brightness) if brightness is not None else None
        if contrast is not None and contrast_first:
            lut = _affine_lut(contrast, 0.0)
            before = lut if before is None else lut[before]  # exact: both steps round to uint8
        if before is not None:
            img = cv2.LUT(img, before)
        if saturation is not None or hue is not None:
            hsv_lut = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
            if hue is not None:
                hsv_lut[:180, 0] = (np.arange(180) + hue) % 180
            if saturation is not None:
                hsv_lut[:, 1] = _affine_lut(saturation, 0.0)
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            img = cv2.cvtColor(cv2.LUT(hsv, hsv_lut.reshape(256, 1, 3)), cv2.COLOR_HSV2RGB)
        if contrast is not None and not contrast_first:
            img = cv2.LUT(img, _affine_lut(contrast, 0.0))
        return img

    def _pad(self, img: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ph, pw = self.crop_size[0] - label.shape[0], self.crop_size[1] - label.shape[1]
        if ph <= 0 and pw <= 0:
            return img, label
        ph, pw = max(ph, 0), max(pw, 0)
        img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=tuple(self.pad_value))
        label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=self.ignore_index)
        return img, label


@dataclass
class TestTransform:
    """mmseg test ``Resize``: rescale the image to ``scale`` (keeping the aspect ratio by default).

    Labels are never resized at test time; predictions are resized to the label instead.
    """

    scale: tuple[int, int] | None = None
    keep_ratio: bool = True

    def __post_init__(self) -> None:
        self.scale = _pair(self.scale, "scale")

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if self.scale is None:
            return img
        h, w = _resize_shape(*img.shape[:2], self.scale, self.keep_ratio)
        if (h, w) == img.shape[:2]:
            return img
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(img - mean) / std`` as float32 for a uint8 or float (B)x3xHxW RGB tensor, on its device.

    ``mean`` and ``std`` are per channel in 0..255 units, e.g. ImageNet's
    (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375).
    """
    if img.dim() < 3 or img.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(f"expected a (B)x{len(mean)}xHxW tensor and {len(mean)}-channel mean/std, "
                         f"got shape {tuple(img.shape)} with {len(mean)} means and {len(std)} stds")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=img.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=img.device).view(-1, 1, 1)
    return (img.to(torch.float32) - mean_t) / std_t


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 array → contiguous 3xHxW uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def label_to_tensor(label: np.ndarray) -> torch.Tensor:
    """HxW class-id array → HxW int64 tensor."""
    return torch.from_numpy(label.astype(np.int64))
