"""The two calls the server makes: :func:`postprocess_response` for ``"postprocess": true`` and
:func:`visualize_response` for ``"visualize": true``. Both dispatch on the prompt type."""
from __future__ import annotations

from typing import Any, Literal

from model_runner.prompts import (
    GROUNDING_PROMPT_TYPE,
    LAYOUT_PROMPT_TYPES,
    POSTPROCESS_PROMPT_TYPES,
    SCENE_SPOTTING_PROMPT_TYPE,
    SVG_PROMPT_TYPE,
)

from .coords import scale_cells, scale_spots
from .draw import spots_png_base64, visualize_png_base64
from .markdown import cells_to_markdown
from .parse import _as_text, parse_layout
from .spots import parse_spots, spots_to_markdown
from .svg import extract_svg, svg_visualization

__all__ = ["LAYOUT_PROMPT_TYPES", "POSTPROCESS_PROMPT_TYPES", "postprocess_response", "visualize_response"]

# Types whose answer goes through the layout parser: the layout JSON types, and grounding (upstream
# runs its layout step for it too; there a plain-text answer is the normal case).
_LAYOUT_PARSED = LAYOUT_PROMPT_TYPES + (GROUNDING_PROMPT_TYPE,)


def postprocess_response(text: str, *, prompt_type: str, model_size: tuple[int, int],
                         original_size: tuple[int, int], image=None,
                         skip_headers_footers: bool = False,
                         picture_mode: Literal["ref", "embed"] | None = None,
                         grounding_bbox: list[int] | None = None) -> dict[str, Any]:
    """Parse, repair and map a model answer, by prompt type.

    Layout types (``prompt_layout_all_en``, ``prompt_layout_only_en``, ``prompt_web_parsing``) and
    ``prompt_grounding_ocr`` -> ``{"layout", "markdown", "repaired"}``:

    * ``layout``: the cells with bboxes in original-image pixels (``original_size`` = (w, h) of the
      image the client sent; ``model_size`` = (w, h) of the resized model input).
    * ``markdown``: :func:`cells_to_markdown` of those cells. ``picture_mode`` None means "embed"
      (PNG data URIs cropped from ``image``) when ``image`` is given, else "ref"
      (``![Picture](picture_<index>.png)``, index into ``layout``).
    * ``repaired``: the answer was not a clean layout JSON (repaired, cells dropped/changed, or
      not JSON at all).

    Not JSON at all (nothing usable): ``layout`` [], ``markdown`` = the answer stripped and
    ``repaired`` True, so the client still gets the text and can tell it is not a real layout.
    Exception: for ``prompt_grounding_ocr`` a plain-text answer is the normal case (the model
    returns the text inside the box), so there ``repaired`` is False. With ``grounding_bbox`` (the
    client's box, original pixels) a plain-text grounding answer becomes one cell holding that box
    as given, so the box the client sent comes back unchanged (exact round trip).

    ``prompt_scene_spotting`` -> ``{"spots", "markdown", "repaired"}``: ``spots`` =
    ``[{"quad": [[x, y] x 4], "text"}]`` in original-image pixels (mapped like the boxes, with
    ``to_original``), ``markdown`` = the texts in order, one block each; nothing parsable: no spots,
    ``markdown`` = the answer stripped, ``repaired`` True (see :mod:`layout.spots`).

    ``prompt_image_to_svg`` -> ``{"svg", "repaired"}``: the SVG document out of the answer, unclosed
    elements closed (None when the answer has none; see :mod:`layout.svg`).

    Other types (``prompt_ocr``, ``prompt_general``) pass through: layout [], markdown = the text
    stripped, repaired False. Never raises because of the model's text; raises ValueError only for
    non-positive sizes or an unknown ``picture_mode`` (caller bugs).
    """
    if picture_mode is None:
        picture_mode = "embed" if image is not None else "ref"
    if picture_mode not in ("ref", "embed"):
        raise ValueError(f"picture_mode must be 'ref' or 'embed', got {picture_mode!r}")
    raw = _as_text(text)
    if prompt_type == SCENE_SPOTTING_PROMPT_TYPE:
        return _postprocess_spots(raw, model_size, original_size)
    if prompt_type == SVG_PROMPT_TYPE:
        result = extract_svg(raw)
        return {"svg": result.svg, "repaired": result.repaired}
    if prompt_type not in _LAYOUT_PARSED:
        return {"layout": [], "markdown": raw.strip(), "repaired": False}
    result = parse_layout(raw)
    if not result.ok and prompt_type == GROUNDING_PROMPT_TYPE and grounding_bbox is not None:
        text = raw.strip()
        cell = {"bbox": list(grounding_bbox), "category": "Text", "text": text}
        return {"layout": [cell], "markdown": text, "repaired": False}
    if not result.ok:
        return {"layout": [], "markdown": result.fallback_text or "",
                "repaired": prompt_type != GROUNDING_PROMPT_TYPE}
    cells = scale_cells(result.cells, model_size, original_size)
    markdown = cells_to_markdown(cells, image, skip_headers_footers=skip_headers_footers,
                                 picture_mode=picture_mode)
    return {"layout": cells, "markdown": markdown, "repaired": result.repaired}


def _postprocess_spots(raw: str, model_size, original_size) -> dict[str, Any]:
    result = parse_spots(raw)
    if not result.ok:
        return {"spots": [], "markdown": raw.strip(), "repaired": result.repaired}
    spots = scale_spots(result.spots, model_size, original_size)
    return {"spots": spots, "markdown": spots_to_markdown(spots), "repaired": result.repaired}


def visualize_response(processed: dict[str, Any], *, prompt_type: str, image) -> dict[str, str]:
    """The picture for ``"visualize": true``, from :func:`postprocess_response`'s ``processed``
    output and the original ``image`` (PIL). -> ``{"visualization": <base64 PNG>}``, or for
    ``prompt_image_to_svg`` possibly ``{"visualization_error": <message>}``.

    * layout types and grounding: the page with ``processed["layout"]`` drawn (:func:`draw_layout`);
    * ``prompt_scene_spotting``: the page with the quadrilaterals and their texts (:func:`draw_spots`);
    * ``prompt_image_to_svg``: ``processed["svg"]`` rendered to PNG, fitted to the image's size;
      an SVG that does not render (or none) gives ``visualization_error``, never an exception;
    * other types: the plain page.
    """
    if prompt_type == SVG_PROMPT_TYPE:
        return svg_visualization(processed.get("svg"), image.size)
    if prompt_type == SCENE_SPOTTING_PROMPT_TYPE:
        return {"visualization": spots_png_base64(image, processed.get("spots") or [])}
    return {"visualization": visualize_png_base64(image, processed.get("layout") or [])}
