"""Mapping cell boxes and quadrilaterals from model-input pixels to original-image pixels."""
from __future__ import annotations

import math
from typing import Callable, Sequence

__all__ = ["scale_bbox", "scale_cells", "scale_spots"]

Size = tuple[int, int]
BBoxMapper = Callable[[Sequence[float], Size, Size], Sequence[float]]


def _check_size(size: Sequence[int], name: str) -> tuple[int, int]:
    try:
        w, h = size
        w, h = int(w), int(h)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (width, height) pair, got {size!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return w, h


def scale_bbox(bbox: Sequence[float], model_size: Size, original_size: Size) -> list[int]:
    """Map one ``[x1, y1, x2, y2]`` box from model-input pixels to original pixels.

    ``x * W_orig / W_in`` (and the same for y), rounded half up, clamped to ``[0, W_orig]`` /
    ``[0, H_orig]``. Rounding (not upstream's truncation) keeps the error within half a pixel.
    Kept as a single small function so it can be swapped for ``image_utils.to_original_coords``.
    """
    w_in, h_in = model_size
    w_o, h_o = original_size
    sx, sy = w_o / w_in, h_o / h_in
    x1, y1, x2, y2 = bbox
    out = []
    for v, s, hi in ((x1, sx, w_o), (y1, sy, h_o), (x2, sx, w_o), (y2, sy, h_o)):
        out.append(min(max(int(math.floor(v * s + 0.5)), 0), hi))
    return out


def scale_cells(cells: Sequence[dict], model_size: Size, original_size: Size,
                to_original: BBoxMapper | None = None) -> list[dict]:
    """Return copies of ``cells`` with every bbox mapped from model-input to original pixels.

    ``model_size`` / ``original_size`` are ``(width, height)``. ``to_original(bbox, model_size,
    original_size)`` overrides the mapping (e.g. ``image_utils.to_original_coords``); whatever it
    returns is rounded to ints, ordered (x1 <= x2, y1 <= y2) and clamped to the page, so boxes at or
    beyond the page edges end inside it. Cells without a usable bbox are copied unchanged (a bbox
    that is not 4 finite numbers is removed). Raises ValueError for non-positive sizes.
    """
    model_size = _check_size(model_size, "model_size")
    original_size = _check_size(original_size, "original_size")
    w_o, h_o = original_size
    mapper = to_original or scale_bbox
    out: list[dict] = []
    for cell in cells:
        if not isinstance(cell, dict):
            continue
        c = dict(cell)
        bbox = c.get("bbox")
        if bbox is not None:
            mapped = _map_one(bbox, model_size, original_size, mapper, w_o, h_o)
            if mapped is None:
                del c["bbox"]
            else:
                c["bbox"] = mapped
        out.append(c)
    return out


def scale_spots(spots: Sequence[dict], model_size: Size, original_size: Size,
                to_original: BBoxMapper | None = None) -> list[dict]:
    """Return copies of ``spots`` with every ``quad`` corner mapped from model-input to original
    pixels, by the same mapping as :func:`scale_cells` (a corner is mapped as the degenerate box
    ``[x, y, x, y]``, so the rounding and clamping are those of the boxes). A spot whose quad is not
    four finite (x, y) pairs is dropped. Raises ValueError for non-positive sizes.
    """
    model_size = _check_size(model_size, "model_size")
    original_size = _check_size(original_size, "original_size")
    w_o, h_o = original_size
    mapper = to_original or scale_bbox
    out: list[dict] = []
    for spot in spots:
        if not isinstance(spot, dict):
            continue
        quad = spot.get("quad")
        try:
            corners = [_map_one([x, y, x, y], model_size, original_size, mapper, w_o, h_o)
                       for x, y in quad]
        except (TypeError, ValueError):
            continue
        if len(corners) != 4 or any(c is None for c in corners):
            continue
        out.append({**spot, "quad": [c[:2] for c in corners]})
    return out


def _map_one(bbox, model_size, original_size, mapper, w_o, h_o) -> list[int] | None:
    try:
        if len(bbox) != 4:
            return None
        vals = [float(v) for v in bbox]
        if not all(math.isfinite(v) for v in vals):
            return None
        m = [float(v) for v in mapper(vals, model_size, original_size)]
        if len(m) != 4 or not all(math.isfinite(v) for v in m):
            return None
    except (TypeError, ValueError):
        return None
    x1, y1, x2, y2 = (int(math.floor(v + 0.5)) for v in m)
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    return [min(max(x1, 0), w_o), min(max(y1, 0), h_o), min(max(x2, 0), w_o), min(max(y2, 0), h_o)]
