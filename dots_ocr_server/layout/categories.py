"""Layout categories of dots.ocr and their drawing colours."""
from __future__ import annotations

# The 11 categories named in the layout prompts and the dots.ocr API document, in that order.
LAYOUT_CATEGORIES: tuple[str, ...] = (
    "Caption",
    "Footnote",
    "Formula",
    "List-item",
    "Page-footer",
    "Page-header",
    "Picture",
    "Section-header",
    "Table",
    "Text",
    "Title",
)

# Category -> RGB colour used by draw_layout (chosen to be distinguishable from each other).
CATEGORY_COLORS: dict[str, tuple[int, int, int]] = {
    "Caption": (230, 126, 34),        # orange
    "Footnote": (142, 68, 173),       # purple
    "Formula": (231, 76, 60),         # red
    "List-item": (39, 174, 96),       # green
    "Page-footer": (127, 140, 141),   # grey-teal
    "Page-header": (52, 73, 94),      # dark slate
    "Picture": (241, 196, 15),        # yellow
    "Section-header": (22, 160, 133), # teal
    "Table": (211, 84, 0),            # burnt orange
    "Text": (41, 128, 185),           # blue
    "Title": (192, 57, 43),           # dark red
}
FALLBACK_COLOR: tuple[int, int, int] = (255, 0, 255)  # magenta for unknown categories

_CANONICAL = {c.lower(): c for c in LAYOUT_CATEGORIES}
# A few spellings the model (or other tools) might produce for the same thing.
_CANONICAL.update({
    "list item": "List-item", "listitem": "List-item", "list_item": "List-item",
    "page header": "Page-header", "page_header": "Page-header", "pageheader": "Page-header",
    "page footer": "Page-footer", "page_footer": "Page-footer", "pagefooter": "Page-footer",
    "section header": "Section-header", "section_header": "Section-header",
    "sectionheader": "Section-header",
})


def canonical_category(value: object) -> str:
    """Map a category as the model wrote it to the canonical spelling (case-insensitive);
    unknown categories are returned stripped but otherwise unchanged."""
    s = value if isinstance(value, str) else str(value)
    s = s.strip()
    return _CANONICAL.get(s.lower(), s)


def category_color(category: object) -> tuple[int, int, int]:
    return CATEGORY_COLORS.get(category if isinstance(category, str) else "", FALLBACK_COLOR)
