"""The prompt types of dots.ocr / dots.mocr and their texts: the one source of these names for the
server, the runner, the layout post-processing and the client.

The strings live in ``prompts.json`` beside this file, byte for byte as upstream trained and
evaluated the models with (see its ``_source`` fields). They are data, not code, so they stay in
JSON and are never retyped here; the same goes for the system turn and the default temperature
that upstream uses for some of the newer types.

This module imports nothing heavy (no torch, no PIL), so the client can use it too.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Sequence

from .defaults import DEFAULT_TEMPERATURE

# The order is the one the dots.ocr API document prints in its error message: the four dots.ocr types first, then the
# four that dots.mocr (dots.ocr 1.5) added.
PROMPT_TYPES: tuple[str, ...] = (
    "prompt_layout_all_en",
    "prompt_layout_only_en",
    "prompt_ocr",
    "prompt_grounding_ocr",
    "prompt_web_parsing",
    "prompt_scene_spotting",
    "prompt_image_to_svg",
    "prompt_general",
)
GROUNDING_PROMPT_TYPE = "prompt_grounding_ocr"
SCENE_SPOTTING_PROMPT_TYPE = "prompt_scene_spotting"
SVG_PROMPT_TYPE = "prompt_image_to_svg"
GENERAL_PROMPT_TYPE = "prompt_general"

#: Types whose answer is a layout JSON (cells with bbox/category/text in model-input pixels).
LAYOUT_PROMPT_TYPES: tuple[str, ...] = ("prompt_layout_all_en", "prompt_layout_only_en", "prompt_web_parsing")
#: Types for which ``postprocess`` / ``visualize`` mean something. Grounding goes through the
#: layout parser too (upstream runs its layout step for it; a plain-text answer is normal there).
POSTPROCESS_PROMPT_TYPES: tuple[str, ...] = LAYOUT_PROMPT_TYPES + (
    GROUNDING_PROMPT_TYPE, SCENE_SPOTTING_PROMPT_TYPE, SVG_PROMPT_TYPE,
)
#: Types that need a request-specific input besides the image: a box, or the user's question.
BBOX_PROMPT_TYPES: tuple[str, ...] = (GROUNDING_PROMPT_TYPE,)
QUESTION_PROMPT_TYPES: tuple[str, ...] = (GENERAL_PROMPT_TYPE,)

# Special-token markup such as <|imgpad|> or <|endofuser|>: in a user's question it would be read
# as the model's control tokens (an extra image slot, a forged turn), so it is refused.
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z_]+\|>")


@functools.cache
def _table() -> dict[str, Any]:
    with open(Path(__file__).with_name("prompts.json"), encoding="utf-8") as f:
        data = json.load(f)
    return {
        "prompts": {**data["prompts"], **data["other_prompts_of_later_releases"]},
        "system": data["system_prompts"],
        "temperature": data["default_temperatures"],
    }


def _check_type(prompt_type: str) -> None:
    if prompt_type not in PROMPT_TYPES:
        raise ValueError(f"Invalid prompt_type. Must be one of: {list(PROMPT_TYPES)}")


def _image_size(image_size: Sequence[int] | None) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in image_size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be the original image's (width, height), got {image_size!r}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return width, height


def prompt_text(prompt_type: str, bbox: Sequence[int] | None = None, *,
                image_size: Sequence[int] | None = None, question: str | None = None) -> str:
    """The user text for ``prompt_type`` (without the image placeholder).

    * ``prompt_grounding_ocr``: ``bbox`` (already in model-input pixels) is appended as a Python
      list literal, e.g. ``[163, 241, 1536, 705]``, exactly as the upstream parser does.
    * ``prompt_image_to_svg``: ``{width}`` / ``{height}`` in ``viewBox="0 0 {width} {height}"`` are
      filled with ``image_size`` = the ORIGINAL image's (width, height), not the model input's, as
      upstream's parser does.
    * ``prompt_general``: the prompt is the user's ``question`` verbatim (upstream replaces the
      placeholder text of prompts.json by the custom prompt). It is required, must not be blank and
      must not hold special-token markup such as ``<|imgpad|>`` (the server checks it before any
      model work, e.g. by calling this function).

    ``bbox`` and ``image_size`` are ignored by the types that do not use them (so a caller may always
    pass them); a ``question`` for any other type is a caller bug. Raises ValueError.
    """
    _check_type(prompt_type)
    if question is not None and prompt_type not in QUESTION_PROMPT_TYPES:
        raise ValueError(f"a question is only used with {GENERAL_PROMPT_TYPE}")
    text = _table()["prompts"][prompt_type]
    if prompt_type == GROUNDING_PROMPT_TYPE:
        if bbox is None:
            raise ValueError("bbox is required for prompt_grounding_ocr")
        return text + str([int(v) for v in bbox])
    if prompt_type == SVG_PROMPT_TYPE:
        width, height = _image_size(image_size)
        # str.replace, as upstream does: the template is not a format string for any other brace.
        return text.replace("{width}", str(width)).replace("{height}", str(height))
    if prompt_type == GENERAL_PROMPT_TYPE:
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"a non-empty question is required for {GENERAL_PROMPT_TYPE}")
        found = _SPECIAL_TOKEN.search(question)
        if found:
            raise ValueError(f"the question must not contain special tokens such as {found.group(0)}")
        return question
    return text


def system_text(prompt_type: str) -> str | None:
    """The system turn upstream sends with ``prompt_type`` ("You are a helpful assistant." for
    ``prompt_general``, as upstream's vLLM path does), or None for no system turn."""
    _check_type(prompt_type)
    return _table()["system"].get(prompt_type)


def default_temperature(prompt_type: str, fallback: float = DEFAULT_TEMPERATURE) -> float:
    """The sampling temperature for a request that did not set one: upstream's per-type default
    (0.9 for ``prompt_image_to_svg``: its SVG demo warns that low temperatures loop), else
    ``fallback`` (``model_runner.defaults.DEFAULT_TEMPERATURE``)."""
    _check_type(prompt_type)
    return float(_table()["temperature"].get(prompt_type, fallback))
