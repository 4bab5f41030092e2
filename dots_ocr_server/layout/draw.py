"""Drawing layout cells, or spotted scene-text quadrilaterals, on the page image."""
from __future__ import annotations

import base64
import io
import math
from functools import lru_cache
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .categories import category_color

__all__ = ["draw_layout", "draw_spots", "visualize_png_base64", "spots_png_base64", "png_base64",
           "label_font_size"]

SPOT_COLOR: tuple[int, int, int] = (0, 200, 0)  # green quadrilaterals, as upstream draws them
SPOT_LABEL_CHARS = 40  # longer texts are cut with an ellipsis in the drawing (as upstream)


def label_font_size(width: int, height: int) -> int:
    """Label font size for a page: about 1.2 % of the longer side, at most 1/6 of the shorter side
    (so very thin pages still fit a label), never under 8 px."""
    size = 0.012 * max(width, height)
    size = min(size, min(width, height) / 6)
    return max(8, int(round(size)))


@lru_cache(maxsize=32)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except Exception:  # noqa: BLE001 - no FreeType: the small bitmap font still works
        return ImageFont.load_default()


def _box(bbox, w: int, h: int) -> tuple[int, int, int, int] | None:
    try:
        vals = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        return None
    x1, y1, x2, y2 = (int(round(v)) for v in vals)
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    x1, x2 = min(max(x1, 0), w - 1), min(max(x2, 0), w - 1)
    y1, y2 = min(max(y1, 0), h - 1), min(max(y2, 0), h - 1)
    return x1, y1, x2, y2


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy; transparent areas are put on white (as the model's input path does)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _pen(w: int, h: int, fill_opacity: float, line_width: int | None, font_size: int | None):
    """(fill alpha 0..255, line width, font size, font) for a ``w`` x ``h`` page: the sizes scale
    with the page unless given."""
    alpha = int(round(min(max(float(fill_opacity), 0.0), 1.0) * 255))
    lw = line_width if line_width is not None else max(1, int(round(max(w, h) / 800)))
    fs = font_size if font_size is not None else label_font_size(w, h)
    return alpha, lw, fs, _font(fs)


def draw_layout(image: Image.Image, cells: Sequence[dict], *, fill_opacity: float = 0.3,
                show_labels: bool = True, line_width: int | None = None,
                font_size: int | None = None) -> Image.Image:
    """Draw the cells (bboxes in ``image`` pixels, i.e. original pixels) on an RGB copy of
    ``image``; the input is not modified.

    Each cell: a rectangle filled with its category colour at ``fill_opacity`` plus an opaque
    outline; with ``show_labels`` a label ``"<index> <category>"`` (index = position in ``cells``)
    on a filled background just above the box (inside the box's top when there is no room above),
    kept inside the page. Line width and font size scale with the page (see
    :func:`label_font_size`) unless given. Cells without a usable bbox are skipped.
    """
    base = _to_rgb(image)  # always a new image
    w, h = base.size
    if w < 1 or h < 1:
        return base
    alpha, lw, fs, font = _pen(w, h, fill_opacity, line_width, font_size)

    overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    ov = ImageDraw.Draw(overlay)
    boxes = []
    for index, cell in enumerate(cells):
        if not isinstance(cell, dict) or cell.get("bbox") is None:
            continue
        box = _box(cell["bbox"], w, h)
        if box is None:
            continue
        category = cell.get("category")
        color = category_color(category)
        ov.rectangle(box, fill=color + (alpha,))
        boxes.append((index, category, box, color))

    out = Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(out)
    for _index, _category, box, color in boxes:
        draw.rectangle(box, outline=color, width=lw)
    if show_labels:
        pad = max(1, fs // 6)
        for index, category, box, color in boxes:
            label = f"{index} {category if category is not None else '?'}"
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            tw, th = right - left, bottom - top
            bw, bh = tw + 2 * pad, th + 2 * pad
            x1, y1 = box[0], box[1]
            ly = y1 - bh if y1 - bh >= 0 else y1  # above the box, else inside its top
            lx = min(x1, max(0, w - bw))
            ly = min(ly, max(0, h - bh))
            draw.rectangle((lx, ly, lx + bw - 1, ly + bh - 1), fill=color)
            lum = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
            fg = (0, 0, 0) if lum > 150 else (255, 255, 255)
            draw.text((lx + pad - left, ly + pad - top), label, fill=fg, font=font)
    return out


def _corners(quad, w: int, h: int) -> list[tuple[int, int]] | None:
    try:
        points = [(float(x), float(y)) for x, y in quad]
    except (TypeError, ValueError):
        return None
    if len(points) != 4 or not all(math.isfinite(v) for p in points for v in p):
        return None
    return [(min(max(int(round(x)), 0), w - 1), min(max(int(round(y)), 0), h - 1)) for x, y in points]


def draw_spots(image: Image.Image, spots: Sequence[dict], *, fill_opacity: float = 0.2,
               show_labels: bool = True, line_width: int | None = None,
               font_size: int | None = None) -> Image.Image:
    """Draw the spotted quadrilaterals (corners in ``image`` pixels, i.e. original pixels) with
    their text on an RGB copy of ``image``; the input is not modified.

    Each spot: its quadrilateral filled at ``fill_opacity`` plus an opaque closed outline in
    :data:`SPOT_COLOR`; with ``show_labels`` its text (cut to :data:`SPOT_LABEL_CHARS` characters)
    in white on a dark background just above the first corner (below it when there is no room),
    kept inside the page. Sizes scale with the page as in :func:`draw_layout`. Spots without a
    usable quad are skipped.
    """
    base = _to_rgb(image)
    w, h = base.size
    if w < 1 or h < 1:
        return base
    alpha, lw, fs, font = _pen(w, h, fill_opacity, line_width, font_size)

    quads = []
    overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    ov = ImageDraw.Draw(overlay)
    for spot in spots:
        if not isinstance(spot, dict):
            continue
        corners = _corners(spot.get("quad"), w, h)
        if corners is None:
            continue
        ov.polygon(corners, fill=SPOT_COLOR + (alpha,))
        text = spot.get("text")
        quads.append((corners, text if isinstance(text, str) else ""))

    out = Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(out)
    for corners, _text in quads:
        draw.line(corners + corners[:1], fill=SPOT_COLOR, width=lw, joint="curve")
    if show_labels:
        pad = max(1, fs // 6)
        for corners, text in quads:
            label = text if len(text) <= SPOT_LABEL_CHARS else text[:SPOT_LABEL_CHARS] + "..."
            label = " ".join(label.split())  # one line
            if not label:
                continue
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            bw, bh = right - left + 2 * pad, bottom - top + 2 * pad
            x, y = corners[0]
            ly = y - bh if y - bh >= 0 else y + 1
            lx = min(x, max(0, w - bw))
            ly = min(ly, max(0, h - bh))
            draw.rectangle((lx, ly, lx + bw - 1, ly + bh - 1), fill=(0, 0, 0))
            draw.text((lx + pad - left, ly + pad - top), label, fill=(255, 255, 255), font=font)
    return out


def png_base64(image: Image.Image) -> str:
    """Base64 (no ``data:`` prefix) of ``image`` as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def visualize_png_base64(image: Image.Image, cells: Sequence[dict], **kwargs) -> str:
    """Base64 (no ``data:`` prefix) of the PNG of :func:`draw_layout`."""
    return png_base64(draw_layout(image, cells, **kwargs))


def spots_png_base64(image: Image.Image, spots: Sequence[dict], **kwargs) -> str:
    """Base64 (no ``data:`` prefix) of the PNG of :func:`draw_spots`."""
    return png_base64(draw_spots(image, spots, **kwargs))
