"""The assembly's rules, each a small named function over blocks (each switchable in
:class:`.options.AssembleOptions`):

* :func:`footnotes_last`: a page's footnotes go to the end of its content;
* :func:`attach_captions`: a caption goes next to the picture or table it belongs to;
* :func:`join_paragraph`: a paragraph cut by a page break becomes one block;
* :func:`merge_table`: a table cut by a page break becomes one table.

The first two work on one page's blocks, the last two on the last content block of a page and
the first content block of the next. Page headers and footers and footnotes are "furniture":
they never take part in a join, and the joins look past them.
"""
from __future__ import annotations

from dots_ocr_server.layout.categories import LAYOUT_CATEGORIES

from .model import Block
from .tables import merge_table_html
from .text import continue_paragraph

__all__ = [
    "CAPTION", "FOOTNOTE", "FORMULA", "HEADINGS", "LIST_ITEM", "PAGE_FURNITURE", "PICTURE",
    "RUNNING_HEADERS", "SECTION_HEADER", "TABLE", "TEXT", "TITLE",
    "attach_captions", "footnotes_last", "is_furniture", "join_paragraph", "merge_table",
]


def _category(name: str) -> str:
    """``name``, checked against the model's categories (layout/categories.py is their home)."""
    if name not in LAYOUT_CATEGORIES:
        raise AssertionError(f"{name!r} is not one of the layout categories")
    return name


CAPTION, FOOTNOTE, FORMULA = _category("Caption"), _category("Footnote"), _category("Formula")
LIST_ITEM, PICTURE, TABLE = _category("List-item"), _category("Picture"), _category("Table")
SECTION_HEADER, TEXT, TITLE = _category("Section-header"), _category("Text"), _category("Title")
RUNNING_HEADERS = frozenset({_category("Page-header"), _category("Page-footer")})
PAGE_FURNITURE = RUNNING_HEADERS | {FOOTNOTE}
HEADINGS = frozenset({TITLE, SECTION_HEADER})
#: What a caption can belong to.
_CAPTIONED = frozenset({PICTURE, TABLE})
#: The categories a paragraph cut by a page break can start in (a list item goes on as text).
_PARAGRAPH_HEADS = frozenset({TEXT, LIST_ITEM})


def is_furniture(block: Block) -> bool:
    """Page headers, page footers and footnotes: not part of the running text."""
    return block.category in PAGE_FURNITURE


# -- one page ------------------------------------------------------------------------------------


def footnotes_last(blocks: list[Block]) -> list[Block]:
    """The page's Footnote blocks moved after its last content block (and before the page footers
    and headers that come after it), in their own order; the rest keeps its order."""
    footnotes = [b for b in blocks if b.category == FOOTNOTE]
    if not footnotes:
        return list(blocks)
    rest = [b for b in blocks if b.category != FOOTNOTE]
    cut = len(rest)
    while cut > 0 and rest[cut - 1].category in RUNNING_HEADERS:
        cut -= 1
    return rest[:cut] + footnotes + rest[cut:]


def _horizontal_overlap(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0])


def _vertical_gap(a, b) -> int:
    """Pixels between two boxes vertically (0 when they overlap)."""
    return max(0, max(a[1], b[1]) - min(a[3], b[3]))


def _caption_target(caption: Block, blocks: list[Block], taken: set[str]) -> Block | None:
    """The Picture or Table the caption belongs to: among those of the page not captioned yet,
    the nearest one above or below it (boxes overlapping horizontally); without usable boxes, the
    content block right before it or right after it in reading order."""
    candidates = [b for b in blocks if b.category in _CAPTIONED and b.id not in taken]
    box = caption.first.bbox
    if box is not None:
        placed = [b for b in candidates if b.first.bbox is not None and _horizontal_overlap(box, b.first.bbox)]
        if placed:
            return min(placed, key=lambda b: _vertical_gap(box, b.first.bbox))
    content = [b for b in blocks if not is_furniture(b)]
    at = next(i for i, b in enumerate(content) if b is caption)
    for neighbour in (content[at - 1] if at > 0 else None, content[at + 1] if at + 1 < len(content) else None):
        if neighbour is not None and any(neighbour is c for c in candidates):
            return neighbour
    return None


def _caption_goes_before(caption: Block, target: Block, order: list[Block]) -> bool:
    """Above its target on the page (or before it in reading order, without boxes)."""
    box, target_box = caption.first.bbox, target.first.bbox
    if box is not None and target_box is not None:
        return (box[1] + box[3]) < (target_box[1] + target_box[3])
    return order.index(caption) < order.index(target)


def attach_captions(blocks: list[Block]) -> list[Block]:
    """Each Caption linked to its Picture or Table (``caption_of``, see :func:`_caption_target`)
    and placed right next to it: before it when the caption is above it on the page, else after
    it. A caption with no picture or table to belong to stays where it is."""
    order = list(blocks)
    taken: set[str] = set()
    for caption in [b for b in blocks if b.category == CAPTION]:
        target = _caption_target(caption, blocks, taken)
        if target is None:
            continue
        taken.add(target.id)
        caption.caption_of = target.id
        before = _caption_goes_before(caption, target, order)
        order.remove(caption)
        at = order.index(target)
        order.insert(at if before else at + 1, caption)
    return order


# -- across a page break -------------------------------------------------------------------------


def join_paragraph(first: Block, second: Block) -> bool:
    """Append ``second`` (the first content block of a page) to ``first`` (the last content block
    of the page before) when it continues it as a paragraph (:func:`.text.continue_paragraph`):
    ``first`` is Text or a List-item, ``second`` is Text. Returns True when joined."""
    if first.category not in _PARAGRAPH_HEADS or second.category != TEXT:
        return False
    joined = continue_paragraph(first.text, second.text)
    if joined is None:
        return False
    first.text = joined
    first.sources.extend(second.sources)
    first.joins.append("paragraph")
    return True


def merge_table(first: Block, second: Block, *, drop_repeated_header: bool = True) -> bool:
    """Append the rows of ``second`` (a Table starting a page) to ``first`` (a Table ending the
    page before) when both have the same number of columns (:func:`.tables.merge_table_html`).
    Returns True when merged."""
    if first.category != TABLE or second.category != TABLE:
        return False
    merged = merge_table_html(first.text, second.text, drop_repeated_header=drop_repeated_header)
    if merged is None:
        return False
    first.text = merged
    first.sources.extend(second.sources)
    first.joins.append("table")
    return True
