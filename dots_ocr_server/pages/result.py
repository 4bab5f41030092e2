"""A finished page: the answer, how it ended and what it cost (Ollama's field names), and what the
request asked to make of it (layout with per-cell confidence, Markdown, spots, SVG, a drawing)."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

from image_utils import LoadedImage
from model_runner.decoding import TokenRecord, answer_offsets
from model_runner.generation import GenerationStats

from .request import PageRequest

__all__ = ["DONE_REASONS", "done_reason", "PageResult", "token_json"]

#: Ollama's names for how an answer ended; the runner's "eos" is Ollama's "stop" (and "error"
#: stays "error"). The one table: the answers, the metrics and the batch job's rows use it.
DONE_REASONS = {"eos": "stop", "length": "length", "repetition": "repetition", "cancelled": "cancelled",
                "error": "error"}


def done_reason(finish_reason: str | None) -> str | None:
    return DONE_REASONS.get(finish_reason, finish_reason)


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def token_json(token: TokenRecord) -> dict[str, Any]:
    """A token with its log-probability (and its alternatives), as /ocr answers list them."""
    entry: dict[str, Any] = {"token": token.text, "id": token.id, "logprob": token.logprob}
    if token.top:
        entry["top_logprobs"] = [{"token": text, "id": tid, "logprob": lp} for tid, text, lp in token.top]
    return entry


@dataclass
class PageResult:
    """One page's answer. ``started``: ``time.perf_counter()`` when the request began; ``load_s``:
    reading, decoding or rendering the page; ``finished``: when the generation had ended."""

    request: PageRequest
    page: LoadedImage
    text: str
    tokens: list[TokenRecord]
    stats: GenerationStats
    started: float
    load_s: float
    finished: float = field(default_factory=time.perf_counter)

    @property
    def done_reason(self) -> str | None:
        return done_reason(self.stats.finish_reason)

    def statistics(self) -> dict[str, Any]:
        """How the answer ended and what it cost, with Ollama's field names (durations in ns)."""
        stats = self.stats
        fields: dict[str, Any] = {
            "done_reason": self.done_reason,
            "total_duration": _ns(time.perf_counter() - self.started),
            "load_duration": _ns(self.load_s),
            "prompt_eval_count": stats.prompt_tokens,
            "prompt_eval_duration": _ns(stats.prompt_eval_s),
            "eval_count": stats.new_tokens,
            "eval_duration": _ns(stats.decode_s),
        }
        if stats.seed is not None and self.request.decoding.seed is not None:
            fields["seed"] = stats.seed
        return fields

    def page_fields(self) -> dict[str, Any]:
        """``page`` and ``page_count`` of a PDF page (nothing for an image)."""
        if self.page.source_kind != "pdf":
            return {}
        return {"page": self.page.page, "page_count": self.page.page_count}

    @functools.cached_property
    def processed(self) -> dict[str, Any]:
        """The answer post-processed by prompt type (``layout.postprocess_response``), each layout
        cell with its ``confidence`` when the tokens carry their logprobs."""
        from ..layout import add_confidence, postprocess_response

        request, stats = self.request, self.stats
        processed = postprocess_response(
            self.text, prompt_type=request.prompt_type, model_size=stats.model_size,
            original_size=stats.original_size, image=self.page.image,
            skip_headers_footers=request.postprocess.skip_headers_footers,
            picture_mode=request.postprocess.picture_mode, grounding_bbox=request.bbox)
        tokens = self.tokens
        if processed.get("layout") and tokens and all(t.logprob is not None for t in tokens):
            processed["layout"] = add_confidence(processed["layout"], self.text, answer_offsets(tokens),
                                                 [t.logprob for t in tokens])
        return processed

    def extra_fields(self) -> dict[str, Any]:
        """The fields beyond the interface document's: the statistics, the PDF page, and what the
        request's ``postprocess`` asked for."""
        extra: dict[str, Any] = self.statistics()
        extra.update(self.page_fields())
        options = self.request.postprocess
        if options.layout:
            extra.update(self.processed)
        if options.visualize:
            from ..layout import visualize_response

            extra.update(visualize_response(self.processed, prompt_type=self.request.prompt_type,
                                            image=self.page.image))
        return extra
