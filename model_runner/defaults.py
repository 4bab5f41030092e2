"""The request defaults and limits of answer generation: one home for each, for the server's
routes, the document jobs, the batch job, the runner and the client.

Pure constants and one rule; imports nothing (the client, which has no torch, uses it too).
What the PDF renderer and the image loader default to (dpi, pixel caps) lives with them, in
``image_utils.policy``; the prompt types and their own defaults in ``model_runner.prompts``.
"""
from __future__ import annotations

#: The sampling temperature of a request that sets none (the interface document's 0.1); a prompt
#: type may have its own (``model_runner.prompts.default_temperature``).
DEFAULT_TEMPERATURE = 0.1
#: The smallest temperature that samples: below it (but above 0) softmax(logits / T) overflows
#: into inf/nan, so such a value is refused, on every API alike. 0 means greedy decoding.
MIN_TEMPERATURE = 1e-4
DEFAULT_TOP_P = 1.0

#: The longest answer of a request that sets none (the interface document's 12000 tokens).
DEFAULT_MAX_NEW_TOKENS = 12000
#: The longest answer a request may ask for (``--max-new-tokens-limit``): a dense page of tables
#: runs to about 16,000 tokens.
MAX_NEW_TOKENS_LIMIT = 24000
#: The default answer length in demo mode (tiny random weights: whatever they write is noise,
#: and 12000 tokens of it take minutes on a laptop's CPU). A request's own value still wins.
DEMO_MAX_NEW_TOKENS = 256

__all__ = ["DEFAULT_TEMPERATURE", "MIN_TEMPERATURE", "DEFAULT_TOP_P", "DEFAULT_MAX_NEW_TOKENS",
           "MAX_NEW_TOKENS_LIMIT", "DEMO_MAX_NEW_TOKENS", "TEMPERATURE_RULE", "check_temperature"]

#: What a refused temperature is told (the end of every API's message for it).
TEMPERATURE_RULE = f"must be 0 (greedy) or at least {MIN_TEMPERATURE}"


def check_temperature(value: float) -> float:
    """``value`` when it is 0 or at least ``MIN_TEMPERATURE``; ValueError(``TEMPERATURE_RULE``)
    otherwise (negative values included). The one rule behind /ocr's, /v1's and the jobs' checks."""
    if value != 0 and not value >= MIN_TEMPERATURE:
        raise ValueError(TEMPERATURE_RULE)
    return value
