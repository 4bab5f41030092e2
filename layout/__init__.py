"""Post-processing of dots.ocr layout answers: parse/repair the JSON, map boxes to the original
image, convert to Markdown, draw the layout. Pure functions; no model needed."""
from .categories import CATEGORY_COLORS, FALLBACK_COLOR, LAYOUT_CATEGORIES, canonical_category
from .coords import scale_bbox, scale_cells
from .draw import draw_layout, label_font_size, visualize_png_base64
from .markdown import cells_to_markdown, normalize_formula, picture_data_uri
from .parse import ParseResult, clean_cells, parse_layout
from .postprocess import LAYOUT_PROMPT_TYPES, postprocess_response

__all__ = [
    "LAYOUT_CATEGORIES", "CATEGORY_COLORS", "FALLBACK_COLOR", "LAYOUT_PROMPT_TYPES",
    "ParseResult", "parse_layout", "clean_cells", "canonical_category",
    "scale_bbox", "scale_cells",
    "cells_to_markdown", "normalize_formula", "picture_data_uri",
    "draw_layout", "visualize_png_base64", "label_font_size",
    "postprocess_response",
]
