"""The one call the server makes for ``"postprocess": true``."""
from __future__ import annotations

from typing import Any, Literal

from .coords import BBoxMapper, scale_cells
from .markdown import cells_to_markdown
from .parse import _as_text, parse_layout

__all__ = ["LAYOUT_PROMPT_TYPES", "postprocess_response"]

# Prompt types whose answer is layout JSON (upstream also runs its layout step for grounding).
LAYOUT_PROMPT_TYPES: tuple[str, ...] = (
    "prompt_layout_all_en", "prompt_layout_only_en", "prompt_grounding_ocr",
)


def postprocess_response(text: str, *, prompt_type: str, model_size: tuple[int, int],
                         original_size: tuple[int, int], image=None,
                         skip_headers_footers: bool = False,
                         picture_mode: Literal["ref", "embed"] | None = None,
                         to_original: BBoxMapper | None = None,
                         grounding_bbox: list[int] | None = None) -> dict[str, Any]:
    """Parse, repair and map a model answer. -> ``{"layout", "markdown", "repaired"}``.

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
    returns the text inside the box), so there ``repaired`` is False. Prompt types outside
    :data:`LAYOUT_PROMPT_TYPES` are passed through the same way (layout [], markdown = text,
    repaired False). With ``grounding_bbox`` (the client's box, original pixels) a plain-text
    grounding answer becomes one cell holding that box as given, so the box the client sent
    comes back unchanged (exact round trip). Never raises because of the model's text; raises ValueError only for
    non-positive sizes or an unknown ``picture_mode`` (caller bugs).
    """
    if picture_mode is None:
        picture_mode = "embed" if image is not None else "ref"
    if picture_mode not in ("ref", "embed"):
        raise ValueError(f"picture_mode must be 'ref' or 'embed', got {picture_mode!r}")
    raw = _as_text(text)
    if prompt_type not in LAYOUT_PROMPT_TYPES:
        return {"layout": [], "markdown": raw.strip(), "repaired": False}
    result = parse_layout(raw)
    if not result.ok and prompt_type == "prompt_grounding_ocr" and grounding_bbox is not None:
        text = raw.strip()
        cell = {"bbox": list(grounding_bbox), "category": "Text", "text": text}
        return {"layout": [cell], "markdown": text, "repaired": False}
    if not result.ok:
        return {"layout": [], "markdown": result.fallback_text or "",
                "repaired": prompt_type != "prompt_grounding_ocr"}
    cells = scale_cells(result.cells, model_size, original_size, to_original=to_original)
    markdown = cells_to_markdown(cells, image, skip_headers_footers=skip_headers_footers,
                                 picture_mode=picture_mode)
    return {"layout": cells, "markdown": markdown, "repaired": result.repaired}
