"""The document's data model: what goes in (one page's layout cells), what comes out (blocks in
reading order, figures, the whole document), and the JSON form of each (``document.json``, whose
one definition is docs/DOCUMENT_FORMAT.md).

Every box is ``(x1, y1, x2, y2)`` in page pixels: the pixels of the page image the layout was
made for (the image the client uploaded, the page the server rendered).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BBox", "Block", "Cell", "CellRef", "Document", "Figure", "PageInput", "PageIssue"]

BBox = tuple[int, int, int, int]  # x1, y1, x2, y2 in page pixels


@dataclass(frozen=True)
class Cell:
    """One layout cell as the model gave it (after the server's repair): ``text`` is Markdown for
    text categories, HTML for ``Table``, LaTeX for ``Formula`` and None for ``Picture``."""

    category: str
    bbox: BBox | None = None
    text: str | None = None
    # the server's per-cell confidence: the minimum and mean probability of the tokens that wrote it
    confidence: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.bbox is not None:
            out["bbox"] = list(self.bbox)
        out["category"] = self.category
        if self.text is not None:
            out["text"] = self.text
        if self.confidence is not None:
            out["confidence"] = self.confidence
        return out


@dataclass(frozen=True)
class PageIssue:
    """A page whose answer cannot be trusted as a layout: ``kind`` is ``"repetition"`` (the answer
    was ended by the repetition guard) or ``"unparsable_layout"`` (no layout JSON could be read
    out of it). ``retried_at_scale``: the page was asked again at this image scale, and that
    answer had a problem too."""

    page: int
    kind: str
    retried_at_scale: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"page": self.page, "kind": self.kind}
        if self.retried_at_scale is not None:
            out["retried_at_scale"] = self.retried_at_scale
        return out


@dataclass(frozen=True)
class PageInput:
    """One page going into :func:`assemble`: its number (1-based), its size in page pixels, and
    its cells in the model's reading order."""

    page: int
    width: int
    height: int
    cells: tuple[Cell, ...] = ()
    issues: tuple[PageIssue, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.page, bool) or not isinstance(self.page, int) or self.page < 1:
            raise ValueError(f"page must be a positive integer, got {self.page!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"page {self.page}: {name} must be a positive integer (pixels), got {value!r}")


@dataclass(frozen=True)
class CellRef:
    """Where a block came from: cell number ``cell`` (0-based, in ``pages[].cells``) of page
    ``page``, with that cell's box (page pixels)."""

    page: int
    cell: int
    bbox: BBox | None = None

    def to_json(self) -> dict[str, Any]:
        return {"page": self.page, "cell": self.cell, "bbox": list(self.bbox) if self.bbox else None}


@dataclass(eq=False)  # blocks are compared by identity: two blocks are never "the same"
class Block:
    """One piece of the document in reading order: a cell, or several cells that a join rule made
    one (a paragraph or a table cut by a page break). ``id`` is ``p<page>-c<cell>`` of its first
    cell. ``joins`` names the rules that joined cells into it; ``figure`` is a Picture's file
    (relative to the document folder); ``caption_of`` is, for a Caption, the id of the Picture or
    Table it belongs to."""

    id: str
    category: str
    text: str
    sources: list[CellRef]
    joins: list[str] = field(default_factory=list)
    figure: str | None = None
    caption_of: str | None = None

    @property
    def pages(self) -> list[int]:
        return sorted({ref.page for ref in self.sources})

    @property
    def first(self) -> CellRef:
        return self.sources[0]

    @property
    def last(self) -> CellRef:
        return self.sources[-1]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "category": self.category, "text": self.text,
                               "pages": self.pages, "sources": [ref.to_json() for ref in self.sources]}
        if self.joins:
            out["joins"] = list(self.joins)
        if self.figure is not None:
            out["figure"] = self.figure
        if self.caption_of is not None:
            out["caption_of"] = self.caption_of
        return out


@dataclass(frozen=True)
class Figure:
    """A Picture cell saved as an image file: ``file`` relative to the document folder
    (``figures/page-<page>-fig-<k>.png``, k counting the page's pictures from 1), ``bbox`` the
    crop in page pixels (the cell's box clamped to the page)."""

    file: str
    page: int
    cell: int
    bbox: BBox
    caption: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the crop in page pixels."""
        x1, y1, x2, y2 = self.bbox
        return x2 - x1, y2 - y1

    def to_json(self) -> dict[str, Any]:
        width, height = self.size
        return {"file": self.file, "page": self.page, "cell": self.cell, "bbox": list(self.bbox),
                "width": width, "height": height, "caption": self.caption}


@dataclass(frozen=True)
class Document:
    """The assembled document. ``page_markdown[i]`` is page ``pages[i]`` alone as Markdown (its own
    blocks, before the joins across page breaks); ``markdown`` is ``document.md``."""

    source: str | None
    pages: tuple[PageInput, ...]
    page_markdown: tuple[str, ...]
    blocks: tuple[Block, ...]
    figures: tuple[Figure, ...]
    markdown: str
    issues: tuple[PageIssue, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``document.json`` as a JSON-ready dict (see docs/DOCUMENT_FORMAT.md)."""
        return {
            "source": self.source,
            "pages": [
                {"page": page.page, "width": page.width, "height": page.height,
                 "cells": [cell.to_json() for cell in page.cells], "markdown": markdown}
                for page, markdown in zip(self.pages, self.page_markdown)
            ],
            "blocks": [block.to_json() for block in self.blocks],
            "figures": [figure.to_json() for figure in self.figures],
            "issues": [issue.to_json() for issue in self.issues],
            "metadata": dict(self.metadata),
        }
