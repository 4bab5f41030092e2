"""Blocks -> Markdown (``document.md``, and each page's ``markdown`` in ``document.json``).

``Title`` is a ``#`` heading and ``Section-header`` a ``##`` one, a ``List-item`` a list item
(consecutive ones make one list), a ``Picture`` its figure file with its caption as the image's
text (``![caption](figures/page-3-fig-1.png)``), a ``Caption`` a paragraph next to its picture or
table. Every other cell's text follows the server's own per-cell rules
(:func:`dots_ocr_server.layout.cells_to_markdown`: ``Formula`` as a ``$$`` block through
``normalize_formula``, ``Table`` as its HTML, text trimmed). Page headers and footers are left out
unless ``keep_headers``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from dots_ocr_server.layout import cells_to_markdown

from .joins import LIST_ITEM, PICTURE, RUNNING_HEADERS, SECTION_HEADER, TITLE
from .model import Block

__all__ = ["block_markdown", "caption_texts", "heading_text", "one_line", "render_blocks"]

_HEADING_PREFIX = {TITLE: "# ", SECTION_HEADER: "## "}
_LEADING_HASHES = re.compile(r"^#{1,6}\s+")
# A list item that already carries a marker: an ordered one ("1.", "2)") is kept as it is; a
# bullet character the model copied from the page becomes Markdown's "-".
_ORDERED_MARKER = re.compile(r"^\d{1,9}[.)]\s")
_BULLET = re.compile(r"^(?:[-*+]\s+|[•·▪●○◦‣⁃]\s*)")
_ALT_ESCAPES = str.maketrans({"[": "\\[", "]": "\\]", "\\": "\\\\"})
_PICTURE_ALT = "Picture"  # a picture without a caption, as the server's page Markdown writes it


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (line breaks included) as one space."""
    return " ".join(text.split())


def heading_text(text: str) -> str:
    """A heading's text on one line, without the ``#`` marks the model may have written."""
    return _LEADING_HASHES.sub("", one_line(text))


def caption_texts(blocks: Iterable[Block]) -> dict[str, str]:
    """Picture / Table block id -> the text of its caption (the first one, on one line)."""
    out: dict[str, str] = {}
    for block in blocks:
        if block.caption_of is not None and block.caption_of not in out and block.text.strip():
            out[block.caption_of] = one_line(block.text)
    return out


def _cell_markdown(category: str, text: str) -> str:
    return cells_to_markdown([{"category": category, "text": text}])


def _list_item(text: str) -> str:
    body = text.strip()
    ordered = _ORDERED_MARKER.match(body)
    if ordered:
        marker, body = ordered.group(0).rstrip() + " ", body[ordered.end():]
    else:
        marker, body = "- ", _BULLET.sub("", body, count=1)
    lines = body.splitlines() or [""]
    indent = " " * len(marker)
    return marker + lines[0] + "".join(f"\n{indent}{line}" if line.strip() else "\n" for line in lines[1:])


def block_markdown(block: Block, *, caption: str | None = None, keep_headers: bool = False) -> str:
    """One block as Markdown ("" when it shows nothing). ``caption``: a Picture's caption text."""
    if block.category in RUNNING_HEADERS and not keep_headers:
        return ""
    if block.category in _HEADING_PREFIX:
        title = heading_text(block.text)
        return _HEADING_PREFIX[block.category] + title if title else ""
    if block.category == LIST_ITEM:
        return _list_item(block.text) if block.text.strip() else ""
    if block.category == PICTURE:
        parts = []
        if block.figure is not None:
            parts.append(f"![{(caption or _PICTURE_ALT).translate(_ALT_ESCAPES)}]({block.figure})")
        if block.text.strip():
            parts.append(_cell_markdown("Text", block.text))
        return "\n\n".join(parts)
    return _cell_markdown(block.category, block.text)


def render_blocks(blocks: Iterable[Block], *, keep_headers: bool = False) -> str:
    """The blocks as one Markdown text: blocks separated by a blank line, the items of one list by
    a line break; ends with a line break (empty when nothing shows)."""
    blocks = list(blocks)
    captions = caption_texts(blocks)
    pieces: list[tuple[str, str]] = []  # (category, markdown)
    for block in blocks:
        piece = block_markdown(block, caption=captions.get(block.id), keep_headers=keep_headers)
        if piece:
            pieces.append((block.category, piece))
    out = ""
    for index, (category, piece) in enumerate(pieces):
        if index:
            out += "\n" if category == LIST_ITEM and pieces[index - 1][0] == LIST_ITEM else "\n\n"
        out += piece
    return out + "\n" if out else ""
