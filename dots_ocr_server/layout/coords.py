"""Mapping cell boxes and quadrilaterals from model-input pixels to original-image pixels, with
the project's one box mapping, ``image_utils.to_original_coords`` (the exact inverse of how a
client's box is mapped into the model's pixels; see image_utils.geometry), made safe for whatever
the model wrote: boxes that are not four finite numbers are dropped, edges are ordered and clamped
to the page."""
from __future__ import annotations

import math
from typing import Sequence

from image_utils import ImageInputError, to_original_coords

__all__ = ["scale_cells", "scale_spots"]

Size = tuple[int, int]


def _check_size(size: Sequence[int], name: str) -> tuple[int, int]:
    try:
        w, h = size
        w, h = int(w), int(h)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (width, height) pair, got {size!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return w, h


def scale_cells(cells: Sequence[dict], model_size: Size, original_size: Size) -> list[dict]:
    """Return copies of ``cells`` with every bbox mapped from model-input to original pixels.

    ``model_size`` / ``original_size`` are ``(width, height)``. Boxes come out as ints, ordered
    (x1 <= x2, y1 <= y2) and clamped to the page, so boxes at or beyond the page edges end inside
    it. Cells without a usable bbox are copied unchanged (a bbox that is not 4 finite numbers is
    removed). Raises ValueError for non-positive sizes.
    """
    model_size = _check_size(model_size, "model_size")
    original_size = _check_size(original_size, "original_size")
    w_o, h_o = original_size
    out: list[dict] = []
    for cell in cells:
        if not isinstance(cell, dict):
            continue
        c = dict(cell)
        bbox = c.get("bbox")
        if bbox is not None:
            mapped = _map_one(bbox, model_size, original_size)
            if mapped is None:
                del c["bbox"]
            else:
                c["bbox"] = mapped
        out.append(c)
    return out


def scale_spots(spots: Sequence[dict], model_size: Size, original_size: Size) -> list[dict]:
    """Return copies of ``spots`` with every ``quad`` corner mapped from model-input to original
    pixels, by the same mapping as :func:`scale_cells` (a corner is mapped as the degenerate box
    ``[x, y, x, y]``, so the rounding and clamping are those of the boxes). A spot whose quad is not
    four finite (x, y) pairs is dropped. Raises ValueError for non-positive sizes.
    """
    model_size = _check_size(model_size, "model_size")
    original_size = _check_size(original_size, "original_size")
    out: list[dict] = []
    for spot in spots:
        if not isinstance(spot, dict):
            continue
        quad = spot.get("quad")
        try:
            corners = [_map_one([x, y, x, y], model_size, original_size) for x, y in quad]
        except (TypeError, ValueError):
            continue
        if len(corners) != 4 or any(c is None for c in corners):
            continue
        out.append({**spot, "quad": [c[:2] for c in corners]})
    return out


def _map_one(bbox, model_size: Size, original_size: Size) -> list[int] | None:
    """``bbox`` in original pixels (ints, ordered, on the page), or None when it is not a box."""
    try:
        if len(bbox) != 4:
            return None
        vals = [float(v) for v in bbox]
        if not all(math.isfinite(v) for v in vals):
            return None
        x1, y1, x2, y2 = to_original_coords(vals, model_size, original_size)  # ints, clamped to the page
    except (TypeError, ValueError, ImageInputError):
        return None
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    return [x1, y1, x2, y2]
