"""The model's 28-pixel "smart resize" and the mapping of boxes between image and model pixels.

Sizes are ``(width, height)`` tuples (PIL order) everywhere in this module; boxes are
``[x1, y1, x2, y2]`` with x along the width.

Coordinate mapping, per axis, with ``s = model_side / original_side`` (the scale factor):

- original -> model (:func:`to_model_coords`): ``m = floor(v * s)``, computed with exact rational
  arithmetic. This is upstream dots.ocr's ``int(v / (W_orig / W_in))`` without its floating-point
  error; the two agree except where ``v * s`` is exactly an integer that upstream's float
  division lands just below (upstream then gives one less).
- model -> original (:func:`to_original_coords`): ``v = ceil(m / s)``, also exact. This is the
  least original coordinate whose model coordinate is >= ``m`` -- the exact inverse of the floor
  above -- and differs from the true position ``m / s`` by less than one original pixel.

Exactness guarantees, per axis (inputs inside the image, integers):

- ``s >= 1`` (the model input is at least as large on that axis, i.e. up-scaling):
  ``to_original(to_model(v)) == v`` for every ``v`` in ``0..original_side``.
- ``s <= 1`` (down-scaling): ``to_model(to_original(m)) == m`` for every ``m`` in
  ``0..model_side``, and ``to_original(to_model(v))`` is in ``(v - 1/s, v]``: off by less than
  what one model pixel covers in the original.

(A round-to-nearest inverse cannot give the first guarantee: with s = 1.2, v = 4 maps to
floor(4.8) = 4 and round(4 / 1.2) = 3.) Results are clamped to ``[0, side]`` (a box edge may lie
on the far border); the two axes of an image usually have slightly different scale factors.
"""
from __future__ import annotations

import math
from fractions import Fraction
from numbers import Integral, Real
from typing import Sequence, Tuple

from PIL import Image

from .errors import ImageInputError
from .policy import MAX_ASPECT_RATIO

__all__ = [
    "IMAGE_FACTOR",
    "MIN_PIXELS",
    "MAX_PIXELS",
    "smart_resize_dims",
    "resize_for_model",
    "to_model_coords",
    "to_original_coords",
]

#: patch size 14 x spatial merge 2
IMAGE_FACTOR = 28
#: the processor's limits in the released checkpoint (56 x 56 and 3360 x 3360)
MIN_PIXELS = 3136
MAX_PIXELS = 11_289_600


def smart_resize_dims(
    width: int, height: int, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> Tuple[int, int]:
    """The model-input size ``(new_w, new_h)`` for a ``width`` x ``height`` image.

    Uses ``qwen_vl_utils.smart_resize`` (factor 28): each side is rounded to a multiple of 28
    (at least 28); if the area then exceeds ``max_pixels`` both sides are scaled down (floor to
    28), if it is below ``min_pixels`` both are scaled up (ceil to 28). Tiny images are therefore
    scaled up, never rejected: 10x10 -> 56x56, 1x150 -> 28x140. With the default limits the result
    is a fixed point of the model processor's own resize rule, so the processor does not resize
    again. Two safety steps (reachable only with unusual custom limits) follow upstream dots.ocr:
    a side is never below 28, and an up-scaled result that exceeds ``max_pixels`` is scaled down.
    A third keeps the *result's* aspect ratio within 200 (the processor checks it too): when
    flooring pushed it over, the long side is shortened to the largest multiple of 28 that fits.

    Raises ImageInputError (400) for an aspect ratio above 200 (the model's rule) or a
    non-positive size, and ValueError for inconsistent limits.
    """
    for name, side in (("width", width), ("height", height)):
        if isinstance(side, bool) or not isinstance(side, Integral):
            raise ImageInputError(f"Image {name} must be an integer, got {side!r}")
        if side < 1:
            raise ImageInputError(f"Image has an invalid size: {width} x {height} pixels")
    if not (isinstance(min_pixels, int) and isinstance(max_pixels, int)) or not 0 < min_pixels <= max_pixels:
        raise ValueError(f"invalid pixel limits: min_pixels={min_pixels!r}, max_pixels={max_pixels!r}")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageInputError(
            f"Image aspect ratio is too extreme: {width} x {height} pixels exceeds the maximum of "
            f"{MAX_ASPECT_RATIO}:1"
        )
    width, height = int(width), int(height)
    from qwen_vl_utils import smart_resize

    try:
        new_h, new_w = smart_resize(height, width, factor=IMAGE_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as exc:  # its aspect-ratio check; ours above should have caught it
        raise ImageInputError(f"Image cannot be resized for the model: {exc}") from None
    new_h, new_w = max(IMAGE_FACTOR, int(new_h)), max(IMAGE_FACTOR, int(new_w))
    if new_h * new_w > max_pixels:
        beta = math.sqrt(new_h * new_w / max_pixels)
        new_h = max(IMAGE_FACTOR, math.floor(new_h / beta / IMAGE_FACTOR) * IMAGE_FACTOR)
        new_w = max(IMAGE_FACTOR, math.floor(new_w / beta / IMAGE_FACTOR) * IMAGE_FACTOR)
        if new_h * new_w > max_pixels:  # the short side is pinned at 28: shorten the long one
            longest = max(IMAGE_FACTOR, max_pixels // min(new_h, new_w) // IMAGE_FACTOR * IMAGE_FACTOR)
            if new_w >= new_h:
                new_w = longest
            else:
                new_h = longest
    if max(new_h, new_w) > MAX_ASPECT_RATIO * min(new_h, new_w):
        # Flooring both sides when scaling down can push a ratio just under 200 over it (e.g.
        # 100000 x 500 -> 47516 x 224), which the model's processor would reject: shorten the
        # long side to the largest multiple of 28 within the limit.
        longest = (MAX_ASPECT_RATIO * min(new_h, new_w)) // IMAGE_FACTOR * IMAGE_FACTOR
        if new_w > new_h:
            new_w = longest
        else:
            new_h = longest
    return new_w, new_h


def resize_for_model(
    image: Image.Image, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Resize ``image`` (bicubic, as the model's processor does) to :func:`smart_resize_dims`.

    Returns ``image`` itself when it already has that size.
    """
    size = smart_resize_dims(image.width, image.height, min_pixels=min_pixels, max_pixels=max_pixels)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def _check_size(size, name: str) -> Tuple[int, int]:
    try:
        w, h = size
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (width, height) pair, got {size!r}") from None
    for side in (w, h):
        if isinstance(side, bool) or not isinstance(side, Integral) or side < 1:
            raise ValueError(f"{name} must hold two positive integers, got {size!r}")
    return int(w), int(h)


def _check_bbox(bbox) -> Tuple[Fraction, Fraction, Fraction, Fraction]:
    if isinstance(bbox, (str, bytes)) or not isinstance(bbox, Sequence) or len(bbox) != 4:
        raise ImageInputError("bbox must be a list of four numbers [x1, y1, x2, y2]")
    out = []
    for v in bbox:
        # Integers are exact and always finite (math.isfinite would overflow on a huge one).
        if isinstance(v, bool) or not isinstance(v, Real) or (not isinstance(v, Integral) and not math.isfinite(v)):
            raise ImageInputError("bbox must be a list of four finite numbers [x1, y1, x2, y2]")
        out.append(Fraction(int(v)) if isinstance(v, Integral) else Fraction(float(v)))
    return tuple(out)  # type: ignore[return-value]


def _clamp(v: int, hi: int) -> int:
    return 0 if v < 0 else hi if v > hi else v


def to_model_coords(bbox: Sequence[float], orig_size: Tuple[int, int], model_size: Tuple[int, int]) -> list:
    """Map ``bbox`` from original-image pixels to model-input pixels: ``floor(v * model/orig)``
    per axis, clamped to ``[0, model side]``. See the module docstring for the exactness rules."""
    ow, oh = _check_size(orig_size, "orig_size")
    mw, mh = _check_size(model_size, "model_size")
    x1, y1, x2, y2 = _check_bbox(bbox)
    return [
        _clamp(math.floor(x1 * mw / ow), mw),
        _clamp(math.floor(y1 * mh / oh), mh),
        _clamp(math.floor(x2 * mw / ow), mw),
        _clamp(math.floor(y2 * mh / oh), mh),
    ]


def to_original_coords(bbox: Sequence[float], model_size: Tuple[int, int], orig_size: Tuple[int, int]) -> list:
    """Map ``bbox`` from model-input pixels to original-image pixels: ``ceil(m * orig/model)``
    per axis, clamped to ``[0, original side]``. Exact inverse of :func:`to_model_coords` on
    every up-scaled axis; see the module docstring."""
    mw, mh = _check_size(model_size, "model_size")
    ow, oh = _check_size(orig_size, "orig_size")
    x1, y1, x2, y2 = _check_bbox(bbox)
    return [
        _clamp(math.ceil(x1 * ow / mw), ow),
        _clamp(math.ceil(y1 * oh / mh), oh),
        _clamp(math.ceil(x2 * ow / mw), ow),
        _clamp(math.ceil(y2 * oh / mh), oh),
    ]
