"""``assemble(pages, options) -> Document``: per-page layouts in, one document out. A pure
function: no file, no image, no model; the figures are named and boxed here and cropped by the
writer (:mod:`.writer`).

The steps, in order:

1. each page's cells become blocks (one per cell, in the model's reading order);
2. on each page: footnotes last, captions next to their picture or table (:mod:`.joins`);
   the page's own Markdown is rendered from these blocks;
3. across each page break: the last content block of a page and the first of the next are
   joined when they are one paragraph or one table;
4. ``document.md`` is rendered from all the blocks.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .joins import (
    PICTURE,
    attach_captions,
    footnotes_last,
    is_furniture,
    join_paragraph,
    merge_table,
)
from .markdown import caption_texts, render_blocks
from .model import BBox, Block, CellRef, Document, Figure, PageInput
from .options import AssembleOptions

__all__ = ["assemble", "figure_file", "page_figures"]


def figure_file(page: int, number: int) -> str:
    """The file of a page's ``number``-th picture (1-based), relative to the document folder."""
    return f"figures/page-{page}-fig-{number}.png"


def _clamped(bbox: BBox | None, width: int, height: int) -> BBox | None:
    """``bbox`` clamped to the page (page pixels); None when nothing of it is left."""
    if bbox is None:
        return None
    x1, y1, x2, y2 = bbox
    x1, x2 = min(max(x1, 0), width), min(max(x2, 0), width)
    y1, y2 = min(max(y1, 0), height), min(max(y2, 0), height)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def page_figures(page: PageInput) -> list[Figure]:
    """The page's Picture cells that have an area on the page, as figures (no caption yet),
    numbered in reading order."""
    figures: list[Figure] = []
    for index, cell in enumerate(page.cells):
        box = _clamped(cell.bbox, page.width, page.height) if cell.category == PICTURE else None
        if box is not None:
            figures.append(Figure(figure_file(page.page, len(figures) + 1), page.page, index, box))
    return figures


def _page_blocks(page: PageInput, figures: Mapping[int, Figure], options: AssembleOptions) -> list[Block]:
    """Steps 1 and 2 for one page. ``figures``: the page's figures by cell index."""
    blocks = [
        Block(id=f"p{page.page}-c{index}", category=cell.category, text=cell.text or "",
              sources=[CellRef(page.page, index, cell.bbox)],
              figure=figures[index].file if index in figures else None)
        for index, cell in enumerate(page.cells)
    ]
    if options.footnotes_last:
        blocks = footnotes_last(blocks)
    if options.attach_captions:
        blocks = attach_captions(blocks)
    return blocks


def _join_across(tail: Block, head: Block, options: AssembleOptions) -> bool:
    """Step 3 for one page break: ``head`` joined into ``tail`` by the first rule that applies."""
    if options.join_paragraphs and join_paragraph(tail, head):
        return True
    return options.merge_tables and merge_table(
        tail, head, drop_repeated_header=options.drop_repeated_table_headers)


def _join_pages(pages: Sequence[PageInput], per_page: list[list[Block]], options: AssembleOptions) -> list[Block]:
    """Step 3: all the blocks in reading order, joined across page breaks. A joined block stays
    where its first part was; a chain of joins can run over several pages (a table three pages
    long). Pages are only joined when their numbers follow each other."""
    blocks: list[Block] = []
    tail: Block | None = None  # the last content block of the page before
    for number, (page, page_blocks) in enumerate(zip(pages, per_page)):
        content = [b for b in page_blocks if not is_furniture(b)]
        follows = number > 0 and pages[number - 1].page == page.page - 1
        if tail is not None and follows and content and _join_across(tail, content[0], options):
            head = content.pop(0)
            page_blocks = [b for b in page_blocks if b is not head]
            for block in page_blocks:
                if block.caption_of == head.id:
                    block.caption_of = tail.id
        blocks.extend(page_blocks)
        tail = content[-1] if content else (tail if tail is not None and page.page in tail.pages else None)
    return blocks


def assemble(pages: Sequence[PageInput], options: AssembleOptions | None = None, *,
             source: str | None = None, metadata: Mapping[str, Any] | None = None) -> Document:
    """The document of ``pages`` (any order; sorted by page number, which must be unique).

    ``source``: what the document was made from (a file name, a URI), as ``document.json``'s
    ``source``. ``metadata``: ``model``, ``prompt_type``, ``dpi`` and whatever else the caller
    knows; the options used are added as ``metadata["assembly"]``. ``options``: the switches
    (default :class:`.options.AssembleOptions`). Raises ValueError for two pages with the same
    number."""
    options = options or AssembleOptions()
    pages = sorted(pages, key=lambda p: p.page)
    numbers = [page.page for page in pages]
    if len(set(numbers)) != len(numbers):
        duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
        raise ValueError(f"page numbers must be unique; repeated: {duplicates}")

    figures: list[Figure] = []
    per_page: list[list[Block]] = []
    page_markdown: list[str] = []
    for page in pages:
        found = {figure.cell: figure for figure in page_figures(page)}
        blocks = _page_blocks(page, found, options)
        captions = caption_texts(blocks)
        by_cell = {block.first.cell: block for block in blocks if block.first.page == page.page}
        figures.extend(dataclasses.replace(figure, caption=captions.get(by_cell[figure.cell].id))
                       for figure in found.values())
        per_page.append(blocks)
        page_markdown.append(render_blocks(blocks, keep_headers=options.keep_headers))

    blocks = _join_pages(pages, per_page, options)
    return Document(
        source=source,
        pages=tuple(pages),
        page_markdown=tuple(page_markdown),
        blocks=tuple(blocks),
        figures=tuple(figures),
        markdown=render_blocks(blocks, keep_headers=options.keep_headers),
        issues=tuple(issue for page in pages for issue in page.issues),
        metadata={**(metadata or {}), "assembly": options.to_json()},
    )
