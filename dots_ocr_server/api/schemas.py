"""The ``/ocr`` request body: a pydantic model, checked in the order the interface document lists
its messages, and its translation into the page service's ``PageRequest``."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from image_utils import IMAGE_FORMATS, clip_for_message
from image_utils.policy import MAX_PDF_DPI, MIN_PDF_DPI
from model_runner.defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, check_temperature
from model_runner.prompts import (BBOX_PROMPT_TYPES, POSTPROCESS_PROMPT_TYPES, PROMPT_TYPES, QUESTION_PROMPT_TYPES,
                                  default_temperature)

from ..pages import PageRequest, PageSource, Postprocess
from .errors import NO_IMAGE_MESSAGE, RequestError


class OCRRequest(BaseModel):
    """The body of ``POST /ocr``: strict types (a string is not a number, a boolean is not a number),
    unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image: str
    image_format: str = "path"
    prompt_type: str = "prompt_layout_all_en"
    # Not sent: the prompt type's default (0.1; 0.9 for prompt_image_to_svg). Below
    # MIN_TEMPERATURE (but not 0) it is refused: sampling would divide the logits into inf/nan.
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, allow_inf_nan=False)
    top_p: float = Field(DEFAULT_TOP_P, gt=0, le=1, allow_inf_nan=False)
    # Not sent: the server's default (12000, or 256 in demo mode; validate_request fills it in)
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1)
    stream: bool = False
    bbox: list[int | float] | None = None
    # Extensions; absent, the request and its response are exactly the API document's.
    page: int = Field(1, ge=1)  # PDF page, 1-based
    dpi: int | None = Field(None, ge=MIN_PDF_DPI, le=MAX_PDF_DPI)  # PDF render resolution (default 200)
    postprocess: bool = False  # add layout (original pixels), markdown, repaired
    skip_headers_footers: bool = False  # markdown without Page-header / Page-footer
    visualize: bool = False  # add a base64 PNG of the page with its layout drawn
    prompt: str | None = None  # the question, for prompt_general only
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # reproducible sampling
    logprobs: bool = False  # add per-token log-probabilities
    top_logprobs: int | None = Field(None, ge=1, le=5)  # with logprobs: k alternatives per token
    ignore_eos: bool = False  # the answer runs to max_new_tokens (benchmarks; as vLLM's ignore_eos)

    @field_validator("temperature")
    @classmethod
    def _not_vanishing(cls, value: float) -> float:
        return check_temperature(value)

    @field_validator("prompt")
    @classmethod
    def _prompt_length(cls, value: str | None, info: ValidationInfo) -> str | None:
        limit = (info.context or {}).get("max_prompt_chars")
        if value is not None and limit is not None and len(value) > limit:
            raise ValueError(f"must be at most {limit} characters (the server's --max-prompt-chars)")
        if value is not None and not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("max_new_tokens")
    @classmethod
    def _within_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_new_tokens_limit")
        if limit is not None and value > limit:
            raise ValueError(f"must be at most {limit} (the server's --max-new-tokens-limit)")
        return value

    @field_validator("bbox")
    @classmethod
    def _box_shape(cls, value: list[int | float] | None) -> list[int | float] | None:
        if value is None:
            return value
        if len(value) != 4:
            raise ValueError("must be [x1, y1, x2, y2]: four numbers")
        x1, y1, x2, y2 = value
        if any(v != v or v in (float("inf"), float("-inf")) for v in value):
            raise ValueError("must hold finite numbers")
        if min(value) < 0 or x2 <= x1 or y2 <= y1:
            raise ValueError("must satisfy 0 <= x1 < x2 and 0 <= y1 < y2 (original-image pixels)")
        return value

    @model_validator(mode="after")
    def _bbox_matches_prompt(self) -> "OCRRequest":
        if self.prompt_type in BBOX_PROMPT_TYPES and self.bbox is None:
            raise ValueError("'bbox' is required for prompt_grounding_ocr: [x1, y1, x2, y2] in image pixels")
        if self.prompt_type not in BBOX_PROMPT_TYPES and self.bbox is not None:
            raise ValueError("'bbox' is only used with prompt_grounding_ocr")
        if self.prompt_type in QUESTION_PROMPT_TYPES and self.prompt is None:
            raise ValueError("'prompt' (the question) is required for prompt_general")
        if self.prompt_type not in QUESTION_PROMPT_TYPES and self.prompt is not None:
            raise ValueError("'prompt' is only used with prompt_general")
        for name in ("postprocess", "visualize"):
            if getattr(self, name) and self.prompt_type not in POSTPROCESS_PROMPT_TYPES:
                raise ValueError(f"'{name}' applies to the prompt types {list(POSTPROCESS_PROMPT_TYPES)}")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        if self.skip_headers_footers and not self.postprocess:
            raise ValueError("'skip_headers_footers' needs 'postprocess': true")
        return self

    @property
    def sampling_temperature(self) -> float:
        """The temperature asked for, or the prompt type's default."""
        if "temperature" in self.model_fields_set:
            return self.temperature
        return default_temperature(self.prompt_type)

    @property
    def source(self) -> PageSource:
        return PageSource(value=self.image, transport=self.image_format, page=self.page, dpi=self.dpi)

    def page_request(self, route: str = "/ocr", temperature: float | None = None) -> PageRequest:
        """This request for the page service (``temperature``: instead of the one asked for)."""
        from model_runner.decoding import DecodingOptions

        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        decoding = DecodingOptions(temperature=self.sampling_temperature if temperature is None else temperature,
                                   top_p=self.top_p, seed=self.seed, logprobs=logprobs)
        return PageRequest(source=self.source, prompt_type=self.prompt_type, bbox=self.bbox, question=self.prompt,
                           decoding=decoding, max_new_tokens=self.max_new_tokens, ignore_eos=self.ignore_eos,
                           postprocess=Postprocess(layout=self.postprocess, visualize=self.visualize,
                                                   skip_headers_footers=self.skip_headers_footers),
                           route=route)


def page_fields_model(name: str, fields: tuple[str, ...], extra: type[BaseModel] | None = None) -> type[BaseModel]:
    """A model of ``OCRRequest``'s ``fields`` (the same types, bounds and defaults), plus the fields
    of ``extra``: how a route that takes part of /ocr's body (``/inspect``, ``/ui/render``) is
    described in the OpenAPI document, from the definitions it is validated with."""
    from pydantic import create_model

    definitions = {n: (OCRRequest.model_fields[n].annotation, OCRRequest.model_fields[n]) for n in fields}
    if extra is not None:
        definitions.update({n: (f.annotation, f) for n, f in extra.model_fields.items()})
    return create_model(name, __config__=ConfigDict(extra="forbid", strict=True), **definitions)


def _validation_message(error: dict[str, Any]) -> str:
    # a location or message may hold the client's input (a 1 MB field name): echo a clipped copy
    loc = clip_for_message(".".join(str(p) for p in error.get("loc", ())) or "body")
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return f"Unknown field '{loc}'"
    if kind == "missing":
        return f"Missing required field '{loc}'"
    msg = error.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    return f"Invalid '{loc}': {msg}" if loc != "body" else msg


def validate_request(body: Any, config) -> OCRRequest:
    """Check the JSON body in the order the interface document lists its messages. ``config``:
    the server's (``max_new_tokens_limit``, ``max_prompt_chars``, ``max_new_tokens_default``)."""
    if not isinstance(body, dict):
        raise RequestError("Request body must be a JSON object")
    image = body.get("image")
    if image is None or image == "":
        raise RequestError(NO_IMAGE_MESSAGE)
    prompt_type = body.get("prompt_type", "prompt_layout_all_en")
    if not isinstance(prompt_type, str) or prompt_type not in PROMPT_TYPES:
        raise RequestError(f"Invalid prompt_type. Must be one of: {list(PROMPT_TYPES)}")
    image_format = body.get("image_format", "path")
    if not isinstance(image_format, str) or image_format not in IMAGE_FORMATS:
        raise RequestError(f"Invalid image_format. Must be one of: {list(IMAGE_FORMATS)}")
    if "max_new_tokens" not in body:
        body = {**body, "max_new_tokens": config.max_new_tokens_default}
    try:
        req = OCRRequest.model_validate(body, context={"max_new_tokens_limit": config.max_new_tokens_limit,
                                                       "max_prompt_chars": config.max_prompt_chars})
    except ValidationError as exc:
        raise RequestError(_validation_message(exc.errors()[0])) from None
    return req

