"""``POST /inspect``: where an answer looked on the page; an adapter over the page service.

For one page and one answer (``text``, e.g. what ``/ocr`` returned, teacher-forced; or, without
``text``, a greedy answer generated here through the decoding engine like any request, counted in
``/metrics`` under this route) it traces the answer (``PageService.trace``) and returns the
attention from a span of the answer's tokens to the image-token grid, averaged over the chosen
layers, heads and the span's tokens, with the grid's geometry so that a client can lay it over
the page.

Request (JSON): the page fields of ``/ocr`` (``image``, ``image_format``, ``page``, ``dpi``,
``prompt_type``, ``bbox``, ``prompt``; checked by the same code, with the same messages), and

    text           str    the answer to trace (absent: generate one; ``max_new_tokens``, ``temperature``
                          default 0 = greedy)
    span           [s, e] answer tokens [s, e)          } at most one; absent: the whole answer
    char_span      [s, e] answer characters [s, e)      } (code points, as Python indexes str)
    cell           int    a layout cell of ``text``     } (as postprocess numbers them: the tokens
                                                          that wrote it, the span of its confidence)
    layers         [int]  decoder layers (negative: from the end); absent: all
    heads          [int]  query heads; absent: all
    average_heads  bool   (default true) average heads while tracing (false: per-head masses too)
    per_layer      bool   (default false) add each layer's own map and masses

Response: ``attention`` (``grid.rows`` x ``grid.cols`` floats: mean attention probability per
image token), ``image_mass`` (the share of the attention that went to the page at all), ``grid``
(``rows``, ``cols``, ``cell_pixels``, ``model_size``, ``original_size``: cell (r, c) covers
``[c, r, c + 1, r + 1] * cell_pixels`` model pixels, i.e. ``* original_size / model_size`` original
pixels), the span's ``tokens`` (``token``, ``id``, ``logprob``, ``offset``), ``span``, ``char_span``,
``token_count``, ``layers``, ``heads``; ``text`` when the server generated it; ``per_layer`` when
asked: ``[{"layer", "attention", "image_mass": [per head], "other_mass": [per head]}]`` where, per
head, ``image_mass + other_mass == 1`` (a softmax row sums to 1 over all keys).

It holds a generation slot like ``/ocr`` (429 with ``Retry-After`` when none is free) and obeys
the same limits (body size, pixels, PDF pages, ``--max-new-tokens-limit`` for the answer's tokens).
As on ``/ocr``, a shutdown refuses new requests with 503 and stops an answer being generated here
(503 too), and a client that hangs up stops that generation (logged as 499, nginx's "client closed
request": nobody reads the answer).
"""
from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import CLIENT_CLOSED, CLIENT_CLOSED_MESSAGE, MODEL_NAME, SHUTDOWN_MESSAGE, RequestError
from .http import check_api_key, json_body
from .schemas import OCRRequest, _validation_message, validate_request
from .state import ServerState

bp = Blueprint("inspect", __name__)

# The fields /inspect shares with /ocr (validated by validate_request, the same messages).
PAGE_FIELDS = ("image", "image_format", "page", "dpi", "prompt_type", "bbox", "prompt", "temperature",
               "max_new_tokens")
DEFAULT_GENERATED_TOKENS = 1024  # without ``text`` and ``max_new_tokens``: how long an answer to generate
SIGNIFICANT_DIGITS = 6  # of the floats in the JSON (float32 maps; more digits would be noise)


class InspectOptions(BaseModel):
    """The fields of ``/inspect`` beyond the page fields of ``/ocr``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | None = None
    span: list[int] | None = None
    char_span: list[int] | None = None
    cell: int | None = Field(None, ge=0)
    layers: list[int] | None = Field(None, min_length=1, max_length=1024)
    heads: list[int] | None = Field(None, min_length=1, max_length=1024)
    average_heads: bool = True
    per_layer: bool = False

    @field_validator("text")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("must not be empty (leave it out to generate an answer)")
        return value

    @field_validator("span", "char_span")
    @classmethod
    def _range(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) != 2 or not 0 <= value[0] < value[1]):
            raise ValueError("must be [start, end] with 0 <= start < end")
        return value


def _state() -> ServerState:
    return current_app.extensions["dots_ocr"]


def validate_inspect(body: Any, config) -> tuple[OCRRequest, InspectOptions, bool]:
    """(the page part as an ``OCRRequest``, the inspect options, whether ``temperature`` was sent)."""
    if not isinstance(body, dict):
        raise RequestError("Request body must be a JSON object")
    page = {key: value for key, value in body.items() if key in PAGE_FIELDS}
    rest = {key: value for key, value in body.items() if key not in PAGE_FIELDS}
    if "max_new_tokens" not in page:  # an answer to generate here: shorter than /ocr's by default
        page["max_new_tokens"] = min(DEFAULT_GENERATED_TOKENS, config.max_new_tokens_default)
    req = validate_request(page, config)
    try:
        options = InspectOptions.model_validate(rest)
    except ValidationError as exc:
        raise RequestError(_validation_message(exc.errors()[0])) from None
    if sum(value is not None for value in (options.span, options.char_span, options.cell)) > 1:
        raise RequestError("Give one of 'span' (tokens), 'char_span' (characters) or 'cell' (a layout cell)")
    if options.cell is not None and options.text is None:
        raise RequestError("'cell' needs 'text': the answer whose layout cell to trace")
    return req, options, "temperature" in body


def _rounded(values) -> Any:
    """Nested lists of floats with SIGNIFICANT_DIGITS digits (a tensor's ``tolist()``)."""
    if isinstance(values, list):
        return [_rounded(v) for v in values]
    return float(f"{values:.{SIGNIFICANT_DIGITS}g}")


@bp.post("/inspect")
def inspect():
    state = _state()
    config = state.config
    state.refuse_when_shutting_down()
    check_api_key(config)
    req, options, temperature_sent = validate_inspect(json_body(), config)
    # the answer generated here is greedy unless a temperature is sent
    page_request = req.page_request(route="/inspect", temperature=None if temperature_sent else 0.0)
    started = time.perf_counter()
    state.require_free_slot()
    page = state.pages.load(page_request.source)
    release = state.take_slot()
    try:
        return jsonify(_run(state, page_request, page, options, request.environ, started))
    finally:
        release()


def _run(state: ServerState, page_request, page, options: InspectOptions, environ, started: float) -> dict[str, Any]:
    from model_runner.trace import TraceStopped

    try:
        result = state.pages.trace(
            page_request, page, text=options.text, max_text_tokens=state.config.max_new_tokens_limit,
            should_stop=state.generation_should_stop(environ), span=options.span,
            char_span=_cell_span(options) if options.cell is not None else options.char_span,
            layers=options.layers, heads=options.heads, average_heads=options.average_heads, average_span=True)
    except TraceStopped:
        if state.stop_generation.is_set():
            raise RequestError(SHUTDOWN_MESSAGE, 503) from None
        raise RequestError(CLIENT_CLOSED_MESSAGE, CLIENT_CLOSED) from None
    return _response(result, page_request, options, page, started)


def _cell_span(options: InspectOptions) -> list[int]:
    """The characters of ``text`` whose tokens wrote layout cell ``cell`` (the cells as
    ``postprocess`` numbers them): the span its confidence is computed over (layout.confidence)."""
    from ..layout import cell_spans, parse_layout

    parsed = parse_layout(options.text)
    if not 0 <= options.cell < len(parsed.cells):
        raise RequestError(f"Invalid 'cell': {options.cell} is not a layout cell of 'text' "
                           f"(it has {len(parsed.cells)})", field="cell")
    span = cell_spans(parsed.cells, options.text)[options.cell]
    if span is None:
        raise RequestError(f"Invalid 'cell': cell {options.cell} cannot be found in 'text'", field="cell")
    return list(span)


def _response(result, req, options: InspectOptions, document, started: float) -> dict[str, Any]:
    start, end = result.span
    body: dict[str, Any] = {"model": MODEL_NAME, "prompt_type": req.prompt_type}
    if options.text is None:
        body["text"] = result.text
    body.update({
        "token_count": len(result.token_ids),
        "span": [start, end],
        "char_span": [result.offsets[start][0], result.offsets[end - 1][1]],
        "tokens": [{"token": result.tokens[i], "id": result.token_ids[i], "logprob": result.logprobs[i],
                    "offset": list(result.offsets[i])} for i in range(start, end)],
        "layers": list(result.layers),
        "heads": list(result.heads),
        "heads_averaged": result.heads_averaged,
        "grid": {**result.grid.to_dict(), "first_position": result.grid.first_position},
        "attention": _rounded(result.heatmap().tolist()),
        # attention[layer]: [1, H', rows, cols], the mean over the span's tokens
        "image_mass": _rounded(float(sum(result.attention[layer].sum(dim=(-2, -1)).mean()
                                         for layer in result.layers) / len(result.layers))),
    })
    if options.per_layer:
        body["per_layer"] = [{
            "layer": layer,
            "attention": _rounded(result.attention[layer][0].mean(0).tolist()),
            "image_mass": _rounded(result.attention[layer][0].sum(dim=(-2, -1)).tolist()),
            "other_mass": _rounded(result.other_mass[layer][0].tolist()),
        } for layer in result.layers]
    if document.source_kind == "pdf":
        body["page"] = document.page
        body["page_count"] = document.page_count
    body["total_duration"] = int(round((time.perf_counter() - started) * 1e9))
    return body
