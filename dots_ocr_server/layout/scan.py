"""The one scanner for the JSON objects of a model answer: the layout parser's repair path and
the per-cell confidence both read answers through it, so that they agree on which object is
which cell. (The /ui page asks the server for a cell's span instead of scanning on its own.)

An object starts at ``{`` followed by a quote (inside a valid JSON string a bare quote cannot
occur, so a start is never inside a cell's text), and is decoded on its own, so missing commas
between cells (``}{``, ``}\\n{``), prose around the JSON and code fences do not matter. Each
candidate is decoded from its start up to the next candidate start (cells are flat, so a cell
fits in that span; the span is widened a few times when a cell's decoding ran out of input, for
cells holding nested objects), which keeps the scan about linear on pathological input. A
candidate that does not decode is skipped, except the last one when the answer ends inside it:
the cut-off last cell of a truncated answer comes back with ``value`` None.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["RawObject", "scan_objects", "looks_like_cell"]

OBJECT_START = re.compile(r'\{\s*"')
_DECODER = json.JSONDecoder(strict=False)
_MAX_EXTEND = 8


@dataclass(frozen=True)
class RawObject:
    """One object of an answer: ``[start, end)`` characters, and its decoded value (None for the
    cut-off last one, whose ``end`` is the end of the answer)."""

    start: int
    end: int
    value: Any | None


def looks_like_cell(value: Any) -> bool:
    return isinstance(value, dict) and ("bbox" in value or "category" in value)


def scan_objects(text: str) -> list[RawObject]:
    """The objects of ``text`` in order (see the module docstring)."""
    found: list[RawObject] = []
    starts = [m.start() for m in OBJECT_START.finditer(text)]
    count = len(starts)
    i = 0
    while i < count:
        start = starts[i]
        value, end, cut_off = _decode_at(text, starts, i)
        if end is None:
            if cut_off:  # the answer ends inside this object: the truncated last cell
                found.append(RawObject(start, len(text), None))
                return found
            i += 1
            continue
        found.append(RawObject(start, start + end, value))
        stop_at = start + max(end, 1)
        i += 1
        while i < count and starts[i] < stop_at:  # candidates inside this object
            i += 1
    return found


def _decode_at(text: str, starts: list[int], i: int) -> tuple[Any, int | None, bool]:
    """(value, its length, cut off) of the candidate ``starts[i]``: length None when it does not
    decode; cut off when it is the last candidate and the text ends before it closes."""
    start, count = starts[i], len(starts)
    j = i + 1
    for _ in range(_MAX_EXTEND + 1):
        stop = starts[j] if j < count else len(text)
        chunk = text[start:stop]
        try:
            value, end = _DECODER.raw_decode(chunk)
            return value, end, False
        except json.JSONDecodeError as exc:
            ran_out = exc.pos >= len(chunk.rstrip())
            if j >= count:
                return None, None, ran_out
            if not ran_out or not ('"bbox"' in chunk or '"category"' in chunk):
                return None, None, False  # malformed before the end of the span, or not a cell
            j += 1
        except (ValueError, RecursionError):
            return None, None, False
    return None, None, False
