"""Parsing the scene-text spotting answers of dots.mocr (``prompt_scene_spotting``).

The model answers with a sequence of items ``(x1, y1), (x2, y2), (x3, y3), (x4, y4) text``: a
quadrilateral (four corners, model-input pixels) followed by the text written inside it; items are
usually one per line. :func:`parse_spots` turns any string into a :class:`SpotsResult` and never
raises.

Rules:

* An item starts wherever four ``(x, y)`` points separated by commas occur; its text runs up to the
  start of the next item (so a text that itself holds "(12, 34)" is kept whole) and is stripped.
* ``repaired`` is set when the answer was not a clean item sequence: text before the first item,
  an item with no text (it is dropped: upstream keeps only items with text), a truncated item at the
  end (a cut quadrilateral, or a complete one whose text never came: dropped), coordinates that are
  not non-negative integers (rounded, negatives clipped to 0), or an exact repeat of an earlier item
  (a repetition loop: dropped).
* Nothing usable -> ``ok`` False with no spots; an empty answer is a clean "no text" answer.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .parse import _as_text

__all__ = ["SpotsResult", "parse_spots", "spots_to_markdown"]

_NUM = r"(-?\d+(?:\.\d+)?)"
_POINT = r"\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)"
_QUAD = re.compile(r"\s*,\s*".join([_POINT] * 4))
_SPECIAL_TOKEN_TAIL = re.compile(r"(?:\s*<\|[A-Za-z_]+\|>)+\s*$")
# Tokens of a quadrilateral, to recognise a cut one at the end of the answer.
_QUAD_TOKEN = re.compile(r"\s*(\(|\)|,|-?\d+(?:\.\d*)?)")
_QUAD_GRAMMAR = (["(", "n", ",", "n", ")", ","] * 4)[:-1]
_MAX_QUAD_CHARS = 160  # longer than any quadrilateral the model writes
_MAX_ITEMS = 20_000  # a looping answer cannot make more than this many spots


@dataclass
class SpotsResult:
    """Outcome of :func:`parse_spots`.

    ``spots``: ``{"quad": [[x, y] x 4], "text": str}`` with int coordinates in model-input pixels,
    in answer order. ``repaired`` / ``ok``: see the module docstring.
    """

    spots: list[dict] = field(default_factory=list)
    repaired: bool = False
    ok: bool = True


def parse_spots(text: str) -> SpotsResult:
    """Parse a scene-spotting answer; never raises (see the module docstring)."""
    try:
        return _parse(_as_text(text))
    except Exception:  # noqa: BLE001 - last line of defence, the contract is "never raises"
        return SpotsResult(spots=[], repaired=True, ok=False)


def _parse(raw: str) -> SpotsResult:
    s = _SPECIAL_TOKEN_TAIL.sub("", raw).strip()
    if not s:
        return SpotsResult()
    matches = list(_QUAD.finditer(s))
    if not matches:
        return SpotsResult(spots=[], repaired=True, ok=False)
    repaired = bool(s[:matches[0].start()].strip())
    spots: list[dict] = []
    seen: set[tuple] = set()
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(s)
        body = s[match.end():end]
        if index + 1 == len(matches):
            body, cut = _cut_partial_quad(body)
            repaired |= cut
        quad, changed = _quad(match)
        item_text = body.strip()
        repaired |= changed
        if not item_text:
            repaired = True
            continue
        key = (tuple(map(tuple, quad)), item_text)
        if key in seen:
            repaired = True
            continue
        seen.add(key)
        spots.append({"quad": quad, "text": item_text})
        if len(spots) >= _MAX_ITEMS:
            repaired = True
            break
    return SpotsResult(spots=spots, repaired=repaired, ok=bool(spots))


def _quad(match: re.Match) -> tuple[list[list[int]], bool]:
    """The four corners as ints (rounded, clipped to >= 0) and whether that changed anything."""
    values = [float(v) for v in match.groups()]
    ints = [max(0, int(math.floor(v + 0.5))) if math.isfinite(v) else 0 for v in values]
    changed = any(i != v for i, v in zip(ints, values, strict=True))
    return [ints[i:i + 2] for i in range(0, 8, 2)], changed


def _cut_partial_quad(body: str) -> tuple[str, bool]:
    """Remove a quadrilateral cut off by the end of the answer from the last item's text.

    The tail from some ``(`` on is a cut quadrilateral when its tokens are a proper prefix of
    ``(n, n), (n, n), (n, n), (n, n)``; a text such as "Price (10)" is not one (a ``)`` cannot
    follow the first number). Hand-written because it is a prefix test on a tiny grammar, which no
    regex library offers directly.
    """
    cut = None
    start = body.rfind("(")
    while start >= 0 and len(body) - start <= _MAX_QUAD_CHARS:
        if _is_quad_prefix(body[start:]):
            cut = start  # keep looking left: "(1, 2), (3" must go whole, not just "(3"
        start = body.rfind("(", 0, start)
    return (body, False) if cut is None else (body[:cut], True)


def _is_quad_prefix(tail: str) -> bool:
    pos, tokens = 0, []
    while pos < len(tail):
        m = _QUAD_TOKEN.match(tail, pos)
        if m is None:
            if tail[pos:].strip():
                return False
            break
        token = m.group(1)
        tokens.append("n" if token[0] in "-0123456789" else token)
        pos = m.end()
        if len(tokens) > len(_QUAD_GRAMMAR):
            return False
    return 0 < len(tokens) < len(_QUAD_GRAMMAR) and tokens == _QUAD_GRAMMAR[:len(tokens)]


def spots_to_markdown(spots) -> str:
    """The spotted texts in answer order, one Markdown block each (blank-line separated)."""
    texts = [s.get("text", "").strip() for s in spots if isinstance(s, dict) and isinstance(s.get("text"), str)]
    return "\n\n".join(t for t in texts if t)
