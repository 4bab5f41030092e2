"""Figure crops: a Picture's box cut out of the page image, as PNG.

Boxes are in page pixels. The page image is used at its own, full resolution: when it is larger
(or smaller) than the page the layout was made for, the box is scaled to it first, so a scan kept
at 600 dpi gives 600-dpi figures from a layout made at 200 dpi.
"""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

from .model import Figure, PageInput

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["crop_box", "crop_figure", "figure_png"]


def crop_box(figure: Figure, page: PageInput, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The figure's box in the pixels of an image of ``image_size`` (width, height) showing the
    page: scaled by image size / page size, widened to whole pixels, kept inside the image."""
    width, height = image_size
    sx, sy = width / page.width, height / page.height
    x1, y1, x2, y2 = figure.bbox
    left, top = math.floor(x1 * sx + 1e-9), math.floor(y1 * sy + 1e-9)
    right, bottom = math.ceil(x2 * sx - 1e-9), math.ceil(y2 * sy - 1e-9)
    left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
    return left, top, max(min(right, width), left + 1), max(min(bottom, height), top + 1)


def crop_figure(image: Image.Image, figure: Figure, page: PageInput) -> Image.Image:
    """The figure cut out of ``image`` (the page, at any resolution), in RGB (or grey / RGBA /
    palette as the page is)."""
    crop = image.crop(crop_box(figure, page, image.size))
    return crop if crop.mode in ("RGB", "RGBA", "L", "LA", "P") else crop.convert("RGB")


def figure_png(image: Image.Image, figure: Figure, page: PageInput) -> bytes:
    """:func:`crop_figure` encoded as PNG."""
    buffer = io.BytesIO()
    crop_figure(image, figure, page).save(buffer, format="PNG")
    return buffer.getvalue()
