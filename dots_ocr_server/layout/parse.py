"""Parsing (and repairing) the layout JSON that dots.ocr writes for the layout prompts.

The model answers ``prompt_layout_all_en`` / ``prompt_layout_only_en`` with a JSON list of cells
``{"bbox": [x1, y1, x2, y2], "category": "...", "text": "..."}`` (boxes in pixels of the resized
model input). Long pages and repetition loops sometimes give broken JSON: missing commas between
objects, a truncated last cell, the same cell over and over. :func:`parse_layout` turns any string
into a :class:`ParseResult` and never raises.

Rules (after upstream's ``OutputCleaner``):

* Valid JSON list -> its cells (``repaired`` False unless a cell had to be dropped or changed).
  A JSON object that wraps the list (``{"layout": [...]}``, any key) is unwrapped; a single cell
  object is taken as a one-cell list.
* Otherwise the text is scanned object by object (``layout.scan``): every complete ``{...}`` that
  decodes on its own is kept, so missing commas (``}{``, ``}\\n{``), prose around the JSON, code fences and a truncated
  last cell (mid-string or mid-bbox: it is cut) are handled alike. If no object is complete, the
  single truncated cell is salvaged from its bbox/category/partial text (upstream's last resort).
* Each cell is validated: a bbox of 4 numbers is kept as ints (rounded, ``x1 > x2`` / ``y1 > y2``
  swapped, negatives clipped to 0); 3 numbers -> the bbox is dropped and the rest kept; any other
  bbox shape or non-finite numbers -> the cell is dropped. A cell with no bbox is kept when it has a
  category or text. The category is normalised to the canonical spelling (case-insensitive); a
  missing category becomes ``"Text"``. A ``None`` text is removed; non-string text is stringified.
* De-duplication (repetition loops): a (category, text) pair seen 5 or more times keeps only its
  first occurrence (cells with empty/no text are exempt, so layout-only output is safe); an
  identical bbox seen twice keeps only its first occurrence. Upstream's "identical flat substring"
  rule is subsumed by the identical-bbox rule.
* Nothing usable -> ``ok`` False, ``cells`` [], ``fallback_text`` = the raw text stripped.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .categories import canonical_category
from .scan import OBJECT_START, looks_like_cell, scan_objects

__all__ = ["ParseResult", "parse_layout", "clean_cells"]


@dataclass
class ParseResult:
    """Outcome of :func:`parse_layout`.

    ``cells``: validated cells (dicts; ``bbox`` as 4 ints in model-input pixels when present).
    ``repaired``: the text was not a clean layout JSON as given (repair path used, or cells were
    dropped / changed by validation or de-duplication).
    ``ok``: False when nothing usable was found; then ``fallback_text`` holds the stripped text.
    """

    cells: list[dict] = field(default_factory=list)
    repaired: bool = False
    ok: bool = True
    fallback_text: str | None = None


_DUP_TEXT_THRESHOLD = 5
_SPECIAL_TOKEN_TAIL = re.compile(r"(?:\s*<\|[A-Za-z_]+\|>)+\s*$")
_FENCE_OPEN = re.compile(r"^```[A-Za-z]*[ \t]*\n?")
_FENCE_CLOSE = re.compile(r"\n?```\s*$")
_WRAPPER_KEYS = ("layout", "cells", "layout_dets", "elements", "blocks", "items", "results",
                 "result", "data", "output", "content")
_DECODER = json.JSONDecoder(strict=False)


class _Drop(Exception):
    """Internal: the cell must be dropped."""


def _as_text(text: Any) -> str:
    if text is None:
        return ""
    if isinstance(text, str):
        return text
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", errors="replace")
    return str(text)


def parse_layout(text: str) -> ParseResult:
    """Parse a layout answer of the model into cells; never raises (see the module docstring)."""
    raw = ""
    try:
        raw = _as_text(text)
        return _parse(raw)
    except Exception:  # noqa: BLE001 - last line of defence, the contract is "never raises"
        try:
            return ParseResult(cells=[], repaired=True, ok=False, fallback_text=raw.strip())
        except Exception:  # noqa: BLE001 - the fallback itself must not raise either
            return ParseResult(cells=[], repaired=True, ok=False, fallback_text="")


def _fallback(raw: str) -> ParseResult:
    return ParseResult(cells=[], repaired=True, ok=False, fallback_text=raw.strip())


def _unwrap(s: str) -> str:
    """Remove trailing special tokens and a surrounding Markdown code fence."""
    s = _SPECIAL_TOKEN_TAIL.sub("", s).strip()
    if s.startswith("```"):
        s = _FENCE_OPEN.sub("", s, count=1)
        s = _FENCE_CLOSE.sub("", s).strip()
    return s


def _parse(raw: str) -> ParseResult:
    stripped = raw.strip()
    if not stripped:
        return _fallback(raw)
    s = _unwrap(stripped)
    unwrapped = s != stripped

    try:
        obj = _DECODER.decode(s)
        decoded = True
    except (ValueError, RecursionError):
        decoded = False

    if decoded:
        items = _extract_items(obj)
        if items is not None:
            cells, changed = clean_cells(items)
            if items and not cells:
                return _fallback(raw)
            return ParseResult(cells=cells, repaired=unwrapped or changed, ok=True)
        if isinstance(obj, str) and obj.strip()[:1] in ("[", "{") and obj.strip() != s:
            inner = _parse(obj)  # a double-encoded answer: the JSON is inside a JSON string
            if inner.ok:
                inner.repaired = True
                return inner
        return _fallback(raw)  # valid JSON, but not a layout (a string, a number, ...)

    items = _scan_objects(s)
    cells, _ = clean_cells(items)
    if not cells:
        salvaged = _salvage_single(s)
        if salvaged is not None:
            cells, _ = clean_cells([salvaged])
    if not cells:
        return _fallback(raw)
    return ParseResult(cells=cells, repaired=True, ok=True)


def _extract_items(obj: Any, depth: int = 0) -> list | None:
    """The list of candidate cells in a decoded JSON value, or None when there is none."""
    if isinstance(obj, list):
        return obj
    if not isinstance(obj, dict) or depth > 3:
        return None
    if looks_like_cell(obj):
        return [obj]
    keys = [k for k in _WRAPPER_KEYS if k in obj] + [k for k in obj if k not in _WRAPPER_KEYS]
    for key in keys:
        value = obj[key]
        if isinstance(value, list) and any(isinstance(v, dict) for v in value):
            return value
    for key in keys:
        value = obj[key]
        if isinstance(value, dict):
            found = _extract_items(value, depth + 1)
            if found is not None:
                return found
    if any(isinstance(obj.get(k), list) and not obj.get(k) for k in _WRAPPER_KEYS):
        return []  # e.g. {"layout": []}: an empty page
    return None


def _scan_objects(s: str) -> list:
    """The candidate cells of ``s`` from every object the scanner decodes (``layout.scan``): a
    cell as it is, the cells inside a wrapper object, any other object as it is."""
    items: list = []
    for found in scan_objects(s):
        obj = found.value
        if not isinstance(obj, dict):
            continue
        if looks_like_cell(obj):
            items.append(obj)
        else:
            inner = _extract_items(obj)
            items.extend(inner if inner else [obj])
    return items


_BBOX_RE = re.compile(r'"bbox"\s*:\s*\[([^\]\[]*)\]')
_CATEGORY_RE = re.compile(r'"category"\s*:\s*"((?:[^"\\]|\\.)*)"')
_TEXT_START_RE = re.compile(r'"text"\s*:\s*"')
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _decode_partial_string(body: str) -> str | None:
    """Decode a JSON string body (after the opening quote) that may be cut anywhere."""
    try:
        value, _ = _DECODER.raw_decode('"' + body)
        if isinstance(value, str):
            return value
    except (ValueError, RecursionError):
        pass
    # Unterminated: drop up to a few trailing chars (a cut escape like "\" or "\u00") and close it.
    for cut in range(0, 7):
        part = body[: len(body) - cut] if cut else body
        if part.endswith("\\") and not part.endswith("\\\\"):
            continue
        try:
            value = json.loads('"' + part + '"', strict=False)
            if isinstance(value, str):
                return value
        except (ValueError, RecursionError):
            continue
    return None


def _salvage_single(s: str) -> dict | None:
    """Upstream's last resort: build one cell from the first (truncated) cell of the text."""
    m = OBJECT_START.search(s)
    if m is None:
        return None
    chunk = s[m.start():]
    cell: dict = {}
    bm = _BBOX_RE.search(chunk)
    if bm:
        nums = _NUMBER_RE.findall(bm.group(1))
        if len(nums) == 4:
            cell["bbox"] = [float(x) for x in nums]
    cm = _CATEGORY_RE.search(chunk)
    if cm:
        try:
            cell["category"] = json.loads('"' + cm.group(1) + '"')
        except ValueError:
            cell["category"] = cm.group(1)
    tm = _TEXT_START_RE.search(chunk)
    if tm:
        text = _decode_partial_string(chunk[tm.end():])
        if text:
            cell["text"] = text
    if "bbox" not in cell and "category" not in cell:
        return None
    return cell


# ----------------------------------------------------------------------------- cell validation

def _number(v: Any) -> float:
    if isinstance(v, bool):
        raise _Drop
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            raise _Drop from None
    else:
        raise _Drop
    if not math.isfinite(f):
        raise _Drop
    return f


def _clean_bbox(value: Any) -> tuple[list[int] | None, bool]:
    """-> (bbox or None to drop just the bbox, changed). Raises _Drop to drop the cell."""
    changed = False
    if isinstance(value, str):
        value = _NUMBER_RE.findall(value)
        changed = True
    if not isinstance(value, (list, tuple)):
        raise _Drop
    nums = [_number(v) for v in value]
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in value):
        changed = True
    if len(nums) == 3:
        return None, True
    if len(nums) != 4:
        raise _Drop
    ints = []
    for f in nums:
        i = int(math.floor(f + 0.5))
        if i != f:
            changed = True
        ints.append(i)
    x1, y1, x2, y2 = ints
    if x1 > x2:
        x1, x2 = x2, x1
        changed = True
    if y1 > y2:
        y1, y2 = y2, y1
        changed = True
    out = [max(0, x1), max(0, y1), max(0, x2), max(0, y2)]
    if out != [x1, y1, x2, y2]:
        changed = True
    return out, changed


def _clean_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return json.dumps(value)
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _clean_cell(item: Any) -> tuple[dict | None, bool]:
    if not isinstance(item, dict):
        return None, True
    cell = dict(item)
    changed = False
    try:
        if "bbox" in cell:
            if cell["bbox"] is None:
                del cell["bbox"]
                changed = True
            else:
                bbox, ch = _clean_bbox(cell["bbox"])
                changed |= ch
                if bbox is None:
                    del cell["bbox"]
                else:
                    cell["bbox"] = bbox
    except _Drop:
        return None, True

    if "text" in cell:
        if cell["text"] is None:
            del cell["text"]
            changed = True
        elif not isinstance(cell["text"], str):
            cell["text"] = _clean_text(cell["text"])
            changed = True

    cat = cell.get("category")
    has_cat = cat is not None and _clean_text(cat).strip() != ""
    if not has_cat and "bbox" not in cell and not cell.get("text", "").strip():
        return None, True
    if has_cat:
        canon = canonical_category(cat)
        if canon != cat:
            changed = True
        cell["category"] = canon
    else:
        cell["category"] = "Text"
        changed = True
    return cell, changed


def clean_cells(items: Any) -> tuple[list[dict], bool]:
    """Validate and de-duplicate candidate cells. -> (cells, changed)."""
    if not isinstance(items, (list, tuple)):
        return [], True
    changed = False
    cells: list[dict] = []
    for item in items:
        cell, ch = _clean_cell(item)
        changed |= ch
        if cell is not None:
            cells.append(cell)

    # (category, text) seen >= 5 times: keep the first only (non-empty texts only).
    counts: dict[tuple[str, str], int] = {}
    for c in cells:
        t = c.get("text", "")
        if t.strip():
            key = (c["category"], t)
            counts[key] = counts.get(key, 0) + 1
    seen_pairs: set[tuple[str, str]] = set()
    seen_boxes: set[tuple[int, ...]] = set()
    out: list[dict] = []
    for c in cells:
        t = c.get("text", "")
        key = (c["category"], t)
        if t.strip() and counts.get(key, 0) >= _DUP_TEXT_THRESHOLD:
            if key in seen_pairs:
                changed = True
                continue
            seen_pairs.add(key)
        if "bbox" in c:
            bkey = tuple(c["bbox"])
            if bkey in seen_boxes:
                changed = True
                continue
            seen_boxes.add(bkey)
        out.append(c)
    return out, changed
