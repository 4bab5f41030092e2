"""dots.ocr in our own code: the architecture, its processor, loading, and the one decoding path.

Names are imported lazily (PEP 562) so that ``import model_runner`` stays cheap and does no work.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DotsOCRConfig": "modeling_dots_ocr",
    "DotsVisionConfig": "modeling_dots_ocr",
    "DotsOCRForCausalLM": "modeling_dots_ocr",
    "DotsOCRProcessor": "processing",
    "load_processor": "processing",
    "ModelRunner": "runner",
    "GenerationRequest": "generation",
    "GenerationHandle": "generation",
    "GenerationStats": "generation",
    "GenerationResult": "generation",
    "PagePrompt": "generation",
    "GenerationInputError": "decoding",
    "DecodingOptions": "decoding",
    "PROMPT_TYPES": "prompts",
    "build_tiny_checkpoint": "tiny",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
