"""Which pages of a document: ``"1-3,7"`` -> [1, 2, 3, 7]. The one rule for the server's
``POST /jobs`` field ``pages`` and the client's ``--pages``; each wraps the ``ValueError``'s
message in its own error (standard library only: the client has no torch)."""
from __future__ import annotations

import re
from typing import Optional

__all__ = ["parse_page_ranges"]

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_page_ranges(spec: Optional[str], page_count: int) -> list[int]:
    """The page numbers ``spec`` names (sorted, each once) within ``page_count``; None: every
    page. ValueError, naming the part at fault, for a selection that is malformed or past the
    document's pages."""
    if spec is None:
        return list(range(1, page_count + 1))
    pages: set[int] = set()
    for part in spec.split(","):
        match = _RANGE.match(part)
        if not match:
            raise ValueError(f"{part.strip()!r} is not a page number or a range like 1-3")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        if first < 1 or last < first:
            raise ValueError(f"{part.strip()!r} (pages start at 1; a range runs upwards)")
        if last > page_count:
            raise ValueError(f"page {last} is past the document's {page_count} page{'s' if page_count != 1 else ''}")
        pages.update(range(first, last + 1))
    return sorted(pages)
