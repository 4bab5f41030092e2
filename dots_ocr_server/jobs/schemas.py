"""What ``POST /jobs`` takes: the document (JSON: ``document`` + ``document_format``; or a
multipart upload's ``file``), /ocr's generation fields, and ``pages`` (which pages: ``"1-3,7"``).
Checked with /ocr's own field definitions and messages; multipart form fields are text, so the
numbers among them are read as numbers first."""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from image_utils import IMAGE_FORMATS
from model_runner.defaults import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, check_temperature
from model_runner.prompts import BBOX_PROMPT_TYPES, PROMPT_TYPES, QUESTION_PROMPT_TYPES, default_temperature

from ..document.page_ranges import parse_page_ranges
from ..errors import RequestError
from ..pages import DEFAULT_PROMPT_TYPE

__all__ = ["JobRequest", "validate_job_request", "parse_pages", "NO_DOCUMENT_MESSAGE", "MAX_PAGES_SPEC"]

NO_DOCUMENT_MESSAGE = "No document provided: send 'document' (JSON) or a 'file' (multipart upload)"
MAX_PAGES_SPEC = 2000  # characters of a 'pages' selection
# The form fields that are numbers (a multipart upload sends every field as text)
_NUMBER_FIELDS = ("temperature", "top_p", "max_new_tokens", "dpi", "seed")


class JobRequest(BaseModel):
    """A document job's settings (the document itself travels beside them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    document: str | None = None
    document_format: str = "path"
    prompt_type: str = DEFAULT_PROMPT_TYPE
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, allow_inf_nan=False)
    top_p: float = Field(DEFAULT_TOP_P, gt=0, le=1, allow_inf_nan=False)
    max_new_tokens: int = Field(1, ge=1)
    dpi: int | None = Field(None, ge=36, le=600)
    prompt: str | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    pages: str | None = Field(None, max_length=MAX_PAGES_SPEC)

    @field_validator("temperature")
    @classmethod
    def _not_vanishing(cls, value: float) -> float:
        return check_temperature(value)

    @property
    def sampling_temperature(self) -> float:
        if "temperature" in self.model_fields_set:
            return self.temperature
        return default_temperature(self.prompt_type)

    def options(self) -> dict[str, Any]:
        """What the job is run with, stored with it (the document aside)."""
        return {"prompt_type": self.prompt_type, "temperature": self.sampling_temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "dpi": self.dpi, "prompt": self.prompt, "seed": self.seed}


def parse_pages(spec: str | None, page_count: int) -> list[int]:
    """``"1-3,7"`` -> [1, 2, 3, 7] (sorted, each once); None: every page. 400 for a selection
    that is malformed, empty or past the document's pages."""
    try:
        return parse_page_ranges(spec, page_count)
    except ValueError as exc:
        raise RequestError(f"Invalid 'pages': {exc}", field="pages") from None


def _form_values(form) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, value in form.items():
        if name in _NUMBER_FIELDS:
            try:
                value = json.loads(value)
            except ValueError:
                pass  # left as text: the model says it is not a number
        values[name] = value
    return values


def validate_job_request(body: Any, config, *, form=None) -> JobRequest:
    """The JSON body (or, for an upload, its form fields) as a ``JobRequest``, with /ocr's
    messages; ``config``: the server's (limits and the default answer length)."""
    from ..api.schemas import _validation_message

    if form is not None:
        body = _form_values(form)
    if not isinstance(body, dict):
        raise RequestError("Request body must be a JSON object")
    prompt_type = body.get("prompt_type", DEFAULT_PROMPT_TYPE)
    if not isinstance(prompt_type, str) or prompt_type not in PROMPT_TYPES:
        raise RequestError(f"Invalid prompt_type. Must be one of: {list(PROMPT_TYPES)}")
    if prompt_type in BBOX_PROMPT_TYPES:
        raise RequestError(f"Invalid prompt_type for a document job: {prompt_type} needs a box on one page "
                           "(send that page to /ocr)")
    document_format = body.get("document_format", "path")
    if not isinstance(document_format, str) or document_format not in IMAGE_FORMATS:
        raise RequestError(f"Invalid document_format. Must be one of: {list(IMAGE_FORMATS)}")
    body = {**body}
    body.setdefault("max_new_tokens", config.max_new_tokens_default)
    try:
        req = JobRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestError(_validation_message(exc.errors()[0])) from None
    if req.max_new_tokens > config.max_new_tokens_limit:
        raise RequestError(f"Invalid 'max_new_tokens': must be at most {config.max_new_tokens_limit} (the server's "
                           "--max-new-tokens-limit)")
    if req.prompt_type in QUESTION_PROMPT_TYPES:
        if req.prompt is None or not req.prompt.strip():
            raise RequestError("'prompt' (the question) is required for prompt_general")
        if len(req.prompt) > config.max_prompt_chars:
            raise RequestError(f"Invalid 'prompt': must be at most {config.max_prompt_chars} characters "
                               "(the server's --max-prompt-chars)")
    elif req.prompt is not None:
        raise RequestError("'prompt' is only used with prompt_general")
    return req
