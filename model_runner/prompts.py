"""The prompt texts of the released dots.ocr model, per ``prompt_type``.

The strings live in ``prompts.json`` beside this file, byte for byte as the model was trained and
evaluated with (see the ``_source`` field there). They are data, not code, so they stay in JSON and
are never retyped here.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

# The order is the one API.md prints in its error message.
PROMPT_TYPES: tuple[str, ...] = (
    "prompt_layout_all_en",
    "prompt_layout_only_en",
    "prompt_ocr",
    "prompt_grounding_ocr",
)
LAYOUT_PROMPT_TYPES: frozenset[str] = frozenset({"prompt_layout_all_en", "prompt_layout_only_en"})
GROUNDING_PROMPT_TYPE = "prompt_grounding_ocr"


@functools.cache
def _prompt_table() -> dict[str, str]:
    with open(Path(__file__).with_name("prompts.json"), encoding="utf-8") as f:
        return json.load(f)["prompts"]


def prompt_text(prompt_type: str, bbox: list[int] | None = None) -> str:
    """The user text for ``prompt_type``.

    For ``prompt_grounding_ocr`` the box (already in model-input pixels) is appended as a Python
    list literal, e.g. ``[163, 241, 1536, 705]``, exactly as the upstream parser does.
    """
    if prompt_type not in PROMPT_TYPES:
        raise ValueError(f"Invalid prompt_type. Must be one of: {list(PROMPT_TYPES)}")
    text = _prompt_table()[prompt_type]
    if prompt_type == GROUNDING_PROMPT_TYPE:
        if bbox is None:
            raise ValueError("bbox is required for prompt_grounding_ocr")
        text += str([int(v) for v in bbox])
    return text
