"""Token confidence per layout cell: the minimum and the mean token probability over the
tokens that wrote the cell's text.

Which tokens count, for a cell parsed out of the model's raw answer:

* a cell with a non-empty ``text``: every token with at least one character inside the ``"text"``
  string value of that cell's object in the raw answer (between its quotes, escapes as written;
  a token that also holds the opening quote counts, the ``"text":`` key alone does not);
* a cell without text (a ``Picture``, or ``prompt_layout_only_en``): every token of its object
  ``{...}`` (its bbox and category);
* a cell that is not an object of the answer (the plain-text answer of ``prompt_grounding_ocr``):
  the tokens of the first place where its text appears verbatim;
* the eos token (no characters in the answer) never counts. When no token can be placed on a cell
  (it could not be found in the answer) its confidence is ``None``.

Inputs are plain data, so this module needs neither the model nor the server: the answer, each
token's ``[start, end)`` character span in it (the token records of a generation carry them:
``model_runner.decoding.answer_offsets``; ``model_runner.trace.token_offsets`` decodes them from
ids) and each token's log-probability.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from .scan import scan_objects

__all__ = ["RawObject", "raw_objects", "cell_spans", "span_confidence", "add_confidence"]

_TEXT_KEY = re.compile(r'"text"\s*:\s*"')


@dataclass(frozen=True)
class RawObject:
    """A cell-like JSON object of the raw answer: its ``[start, end)`` span, its decoded value
    (None when it is cut off at the end of the answer) and the span of its ``"text"`` string value
    (inside the quotes; None when it has none)."""

    start: int
    end: int
    value: dict | None
    text_span: tuple[int, int] | None


def _string_end(answer: str, start: int) -> int:
    """Index of the closing quote of the JSON string whose content starts at ``start`` (the length
    of the answer when the string is cut off)."""
    i = start
    while i < len(answer):
        ch = answer[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i
        i += 1
    return len(answer)


def _is_cell(value: Any) -> bool:
    """A flat object (a wrapper like ``{"layout": [...]}`` holds lists or objects besides a bbox)."""
    return isinstance(value, dict) and all(
        key == "bbox" or not isinstance(item, (list, dict)) for key, item in value.items())


def raw_objects(answer: str) -> list[RawObject]:
    """The cell objects of ``answer`` in order, as the layout parser's repair path finds them
    (``layout.scan``: missing commas, code fences and a cut-off last cell are found too), each with
    the span of its ``"text"`` value."""
    objects = []
    for found in scan_objects(answer):
        if found.value is not None and not _is_cell(found.value):
            continue
        key = _TEXT_KEY.search(answer, found.start, found.end)
        text_span = None
        if key is not None:
            text_span = (key.end(), min(_string_end(answer, key.end()), found.end))
        objects.append(RawObject(found.start, found.end, found.value, text_span))
    return objects


def _cell_text(value: Any) -> str:
    """A cell's text as the layout parser keeps it (None dropped, non-strings as JSON)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _matches(obj: RawObject, text: str) -> bool:
    if obj.value is None:  # the cut last cell: the parser salvaged what it could
        return True
    return _cell_text(obj.value.get("text")) == text


def cell_spans(cells: Sequence[dict], answer: str) -> list[tuple[int, int] | None]:
    """For each cell (the parser's output, in order: it keeps the answer's order and only drops
    cells), the character span of the answer whose tokens count (see the module docstring)."""
    objects = raw_objects(answer)
    spans: list[tuple[int, int] | None] = []
    next_object, next_char = 0, 0
    for cell in cells:
        text = _cell_text(cell.get("text"))
        span = None
        for index in range(next_object, len(objects)):
            obj = objects[index]
            if _matches(obj, text):
                span = obj.text_span if text and obj.text_span else (obj.start, obj.end)
                next_object, next_char = index + 1, obj.end
                break
        if span is None and text:
            found = answer.find(text, next_char)
            if found >= 0:
                span = (found, found + len(text))
                next_char = span[1]
        spans.append(span)
    return spans


def span_confidence(offsets: Sequence[tuple[int, int]], logprobs: Sequence[float | None],
                    span: tuple[int, int] | None) -> dict[str, float] | None:
    """``{"min", "mean"}`` token probability over the tokens with a character in ``span``."""
    if span is None:
        return None
    start, end = span
    probs = [math.exp(lp) for (a, b), lp in zip(offsets, logprobs)
             if lp is not None and a < b and a < end and b > start]
    if not probs:
        return None
    return {"min": round(min(probs), 6), "mean": round(sum(probs) / len(probs), 6)}


def add_confidence(cells: Sequence[dict], answer: str, offsets: Sequence[tuple[int, int]],
                   logprobs: Sequence[float | None]) -> list[dict]:
    """New cells, each with ``confidence``: ``{"min", "mean"}`` or None (see the module docstring)."""
    spans = cell_spans(cells, answer)
    return [{**cell, "confidence": span_confidence(offsets, logprobs, span)} for cell, span in zip(cells, spans)]
