"""Which page answers cannot be trusted as a layout, and the one remedy tried without the model's
help: asking again with the page image scaled by :data:`RETRY_SCALE`.

The rule is shared by the client (which retries such a page once before it marks it), the
document inputs (which mark it in ``document.json``'s ``issues``) and any other caller holding
``/ocr`` answers or batch-job rows.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["ISSUE_REPETITION", "ISSUE_UNPARSABLE", "RETRY_NOTE", "RETRY_SCALE", "answer_problem", "keep_after_retry"]

ISSUE_REPETITION = "repetition"         # the answer was ended by the repetition guard
ISSUE_UNPARSABLE = "unparsable_layout"  # no layout JSON could be read out of the answer
#: The image scale of the one retry of such a page. A slightly smaller image gives the model a
#: different input grid; users of the upstream model report it as a remedy for pages that loop.
RETRY_SCALE = 0.95
#: The field of the kept answer that records the retry (read back by :mod:`.inputs`).
RETRY_NOTE = "rescaled_retry"


def answer_problem(answer: Mapping[str, Any]) -> str | None:
    """:data:`ISSUE_REPETITION`, :data:`ISSUE_UNPARSABLE` or None for one page's post-processed
    layout answer: ``/ocr``'s JSON (``done_reason``) or a batch-job row (``finish_reason``).

    Unparsable: the server marked the answer ``repaired`` and found no cell in it, although the
    model wrote something (an empty page, ``[]``, is a clean answer)."""
    if answer.get("done_reason", answer.get("finish_reason")) == "repetition":
        return ISSUE_REPETITION
    layout = answer.get("layout")
    if isinstance(layout, str):  # a batch-job row holds the cells as a JSON string
        try:
            layout = json.loads(layout)
        except ValueError:
            layout = None
    text = answer.get("response")
    if answer.get("repaired") is True and not layout and isinstance(text, str) and text.strip():
        return ISSUE_UNPARSABLE
    return None


def keep_after_retry(first: Mapping[str, Any], second: Mapping[str, Any], problem: str,
                     scale: float = RETRY_SCALE) -> dict[str, Any]:
    """The answer to keep after a page with ``problem`` was asked again at ``scale``: ``second``
    (its cells already mapped back to the page's pixels) when it has no problem, else ``first``;
    with a :data:`RETRY_NOTE` field ``{"scale", "problem", "retry_problem", "kept": "retry" |
    "first"}``."""
    after = answer_problem(second)
    note = {"scale": scale, "problem": problem, "retry_problem": after, "kept": "first" if after else "retry"}
    return {**(first if after else second), RETRY_NOTE: note}
