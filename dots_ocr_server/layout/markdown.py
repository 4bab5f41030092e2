"""Layout cells -> Markdown (after upstream's ``layoutjson2md``)."""
from __future__ import annotations

import base64
import io
import math
import re
from typing import Callable, Literal, Sequence

__all__ = ["cells_to_markdown", "normalize_formula", "picture_data_uri"]

PictureRef = Callable[[int, dict], str]

_HEADER_FOOTER = {"Page-header", "Page-footer"}
_PREAMBLE = re.compile(
    r"\\documentclass(?:\[[^\]]*\])?\{[^}]*\}"
    r"|\\usepackage(?:\[[^\]]*\])?\{[^}]*\}"
    r"|\\begin\{document\}|\\end\{document\}"
)
_INLINE_DOLLAR = re.compile(r"(?<!\\)\$[^$]+(?<!\\)\$")
_EMBEDDED_BRACKET = re.compile(r"\\\[.*?\\\]", re.S)
_LATEX_HINT = re.compile(r"[\\^_{}=<>+*/|]")
_FENCE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?```$", re.S)
_BACKTICK_MATH = re.compile(r"^`(\$.*\$)`$", re.S)


def _strip_backticks(t: str) -> str:
    m = _FENCE.match(t)
    if m:
        return m.group(1).strip()
    if len(t) >= 2 and t[0] == "`" and t[-1] == "`":
        return t.strip("`").strip()
    return t


def _display(inner: str) -> str:
    return f"$$\n{inner}\n$$"


def normalize_formula(text: str) -> str:
    """Normalise a Formula cell's text to a display-math block.

    ``$$...$$`` is re-wrapped with newlines (left as is when the inside has further ``$``);
    ``\\[...\\]`` becomes ``$$`` blocks; text with inline ``$...$`` or an embedded ``\\[...\\]`` is
    left as is; text with no LaTeX-looking character (``\\ ^ _ { } = < > + * / |``) is left as is
    (prose the model labelled Formula would lose its spaces in math mode); otherwise LaTeX preamble
    commands and surrounding backticks are removed and the rest is wrapped in ``$$`` blocks.
    """
    t = _strip_backticks(text.strip())
    if not t:
        return ""
    if t.startswith("$$") and t.endswith("$$") and len(t) >= 4:
        inner = t[2:-2].strip()
        if not inner:
            return ""
        return t if "$" in inner else _display(inner)
    if t.startswith("\\[") and t.endswith("\\]") and len(t) >= 4:
        inner = t[2:-2].strip()
        return _display(inner) if inner else ""
    if _INLINE_DOLLAR.search(t) or _EMBEDDED_BRACKET.search(t):
        return t
    if not _LATEX_HINT.search(t):
        return t
    inner = _PREAMBLE.sub("", t).strip()
    inner = _strip_backticks(inner)
    return _display(inner) if inner else ""


def _clean_text(text: str) -> str:
    t = text.strip()
    m = _BACKTICK_MATH.match(t)
    if m:
        t = m.group(1)
    return t


def picture_data_uri(image, bbox: Sequence[float]) -> str | None:
    """PNG data URI of ``bbox`` (original pixels) cropped from ``image``; None if empty/invalid."""
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            return None
        w, h = image.size
        x1, x2 = sorted((min(max(int(x1), 0), w), min(max(int(math.ceil(x2)), 0), w)))
        y1, y2 = sorted((min(max(int(y1), 0), h), min(max(int(math.ceil(y2)), 0), h)))
        if x2 - x1 < 1 or y2 - y1 < 1:
            return None
        crop = image.crop((x1, y1, x2, y2))
        if crop.mode not in ("RGB", "RGBA", "L", "LA", "P", "1"):
            crop = crop.convert("RGB")
        buf = io.BytesIO()
        crop.save(buf, format="PNG")
    except Exception:  # noqa: BLE001 - a bad crop falls back to a reference
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _default_ref(index: int, cell: dict) -> str:
    return f"picture_{index}.png"


def cells_to_markdown(cells: Sequence[dict], image=None, *, skip_headers_footers: bool = False,
                      picture_mode: Literal["ref", "embed"] = "ref",
                      picture_ref: PictureRef | None = None) -> str:
    """Join the cells (in the given, i.e. reading, order) as Markdown blocks separated by a blank
    line.

    * Picture: ``![Picture](<target>)``; in "ref" mode the target is ``picture_ref(index, cell)``
      (default ``picture_<index>.png``, index = position in ``cells``, the same index the drawing
      labels); in "embed" mode the bbox (original pixels) is cropped from ``image`` and embedded as
      a PNG data URI, falling back to the reference when there is no image/bbox or the crop is empty.
      A Picture that carries text has the text after the image.
    * Formula: :func:`normalize_formula`.
    * Table: the HTML as is (trimmed). Everything else: trimmed text (a backticked ``$...$`` loses
      the backticks).
    * Page-header / Page-footer are left out when ``skip_headers_footers``.
    * Cells without text contribute nothing (except Pictures).
    """
    if picture_mode not in ("ref", "embed"):
        raise ValueError(f"picture_mode must be 'ref' or 'embed', got {picture_mode!r}")
    ref = picture_ref or _default_ref
    blocks: list[str] = []
    for index, cell in enumerate(cells):
        if not isinstance(cell, dict):
            continue
        category = cell.get("category")
        if skip_headers_footers and category in _HEADER_FOOTER:
            continue
        text = cell.get("text")
        text = text if isinstance(text, str) else ("" if text is None else str(text))
        if category == "Picture":
            target = None
            if picture_mode == "embed" and image is not None and cell.get("bbox") is not None:
                target = picture_data_uri(image, cell["bbox"])
            if target is None:
                target = ref(index, cell)
            blocks.append(f"![Picture]({target})")
            if text.strip():
                blocks.append(_clean_text(text))
            continue
        if category == "Formula":
            piece = normalize_formula(text)
        elif category == "Table":
            piece = text.strip()
        else:
            piece = _clean_text(text)
        if piece:
            blocks.append(piece)
    return "\n\n".join(blocks)
