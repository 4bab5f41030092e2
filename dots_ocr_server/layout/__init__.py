"""Post-processing of dots.ocr / dots.mocr answers: parse/repair the layout JSON, the scene-text
spots or the SVG; map boxes and quadrilaterals to the original image; convert to Markdown; draw
or render. Pure functions; no model needed."""
from .categories import CATEGORY_COLORS, FALLBACK_COLOR, LAYOUT_CATEGORIES, canonical_category
from .confidence import add_confidence, cell_spans, span_confidence
from .coords import scale_cells, scale_spots
from .draw import draw_layout, draw_spots, label_font_size, spots_png_base64, visualize_png_base64
from .markdown import cells_to_markdown, normalize_formula, picture_data_uri
from .parse import ParseResult, clean_cells, parse_layout
from .postprocess import LAYOUT_PROMPT_TYPES, POSTPROCESS_PROMPT_TYPES, postprocess_response, visualize_response
from .spots import SpotsResult, parse_spots, spots_to_markdown
from .svg import SvgRenderError, SvgResult, extract_svg, render_svg_png, svg_visualization

__all__ = [
    "LAYOUT_CATEGORIES", "CATEGORY_COLORS", "FALLBACK_COLOR", "LAYOUT_PROMPT_TYPES",
    "POSTPROCESS_PROMPT_TYPES",
    "ParseResult", "parse_layout", "clean_cells", "canonical_category",
    "SpotsResult", "parse_spots", "spots_to_markdown",
    "SvgResult", "SvgRenderError", "extract_svg", "render_svg_png", "svg_visualization",
    "scale_cells", "scale_spots",
    "cells_to_markdown", "normalize_formula", "picture_data_uri",
    "draw_layout", "draw_spots", "visualize_png_base64", "spots_png_base64", "label_font_size",
    "postprocess_response", "visualize_response",
    "add_confidence", "cell_spans", "span_confidence",
]
