"""Heading-aware chunks for retrieval (``chunks.jsonl``): the document's content cut at every
heading and, within a section, before a block that would make the chunk longer than
``max_chars``. Each chunk has its Markdown text, its heading path (the current Title, then the
current Section-header), its pages and the boxes of the cells it came from, so a search hit can
be shown on its page.

A block is never split (a long table is one chunk of its own), and a caption stays in the chunk
of its picture or table. Page headers and footers are left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .joins import RUNNING_HEADERS, SECTION_HEADER, TITLE
from .markdown import heading_text, render_blocks
from .model import BBox, Block, Document

__all__ = ["DEFAULT_CHUNK_CHARS", "Chunk", "chunk_document"]

#: Longest chunk text in characters before a new chunk starts (a single block may be longer).
DEFAULT_CHUNK_CHARS = 2000


@dataclass(frozen=True)
class Chunk:
    id: str                              # "chunk-1", "chunk-2", ... in reading order
    text: str                            # Markdown of the chunk's blocks (headings not repeated)
    headings: tuple[str, ...]            # Title, then Section-header, as far as known
    pages: tuple[int, ...]
    boxes: tuple[tuple[int, BBox], ...]  # (page, bbox in page pixels) of every source cell
    blocks: tuple[str, ...]              # block ids

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "headings": list(self.headings), "pages": list(self.pages),
                "boxes": [{"page": page, "bbox": list(bbox)} for page, bbox in self.boxes],
                "blocks": list(self.blocks)}


def _units(blocks: list[Block]) -> list[list[Block]]:
    """Blocks grouped so that a caption and the block it belongs to (next to each other after the
    caption rule) are never cut apart."""
    units: list[list[Block]] = []
    for block in blocks:
        previous = units[-1][-1] if units else None
        if previous is not None and (block.caption_of == previous.id or previous.caption_of == block.id):
            units[-1].append(block)
        else:
            units.append([block])
    return units


def _chunk(number: int, blocks: list[Block], headings: tuple[str, ...]) -> Chunk:
    refs = [ref for block in blocks for ref in block.sources]
    return Chunk(id=f"chunk-{number}", text=render_blocks(blocks).strip(), headings=headings,
                 pages=tuple(sorted({ref.page for ref in refs})),
                 boxes=tuple((ref.page, ref.bbox) for ref in refs if ref.bbox is not None),
                 blocks=tuple(block.id for block in blocks))


def chunk_document(document: Document, *, max_chars: int = DEFAULT_CHUNK_CHARS) -> list[Chunk]:
    """The document's chunks in reading order (see the module docstring)."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    chunks: list[Chunk] = []
    title, section = "", ""
    current: list[Block] = []
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current and render_blocks(current).strip():
            chunks.append(_chunk(len(chunks) + 1, current, tuple(h for h in (title, section) if h)))
        current, size = [], 0

    for unit in _units([b for b in document.blocks if b.category not in RUNNING_HEADERS]):
        head = unit[0]
        if head.category in (TITLE, SECTION_HEADER) and len(unit) == 1:
            flush()
            name = heading_text(head.text)
            title, section = (name, "") if head.category == TITLE else (title, name)
            continue
        length = len(render_blocks(unit))
        if current and size + length > max_chars:
            flush()
        current.extend(unit)
        size += length
    flush()
    return chunks
