"""The OpenAI routes' bodies as pydantic models: the ``/v1/chat/completions`` request the server
validates with, and the answers it builds (completion, stream chunk, model list, error). The same
models generate the OpenAPI document (api.openapi), so the two cannot drift apart.

Every request model forbids unknown fields: a parameter this server does not implement gets a 400
naming it, instead of being silently ignored. Unions carry explicit tags (``Discriminator``) so
that a validation error names the field the client sent, not a pydantic union label.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_serializer, model_validator)

from image_utils import clip_for_message
from model_runner.decoding import MAX_LOGPROBS
from model_runner.defaults import check_temperature

MAX_STOP_STRINGS = 4  # OpenAI's documented limit
MAX_STOP_CHARS = 256

_STRICT = ConfigDict(extra="forbid", strict=True)


# ---------------------------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str = Field(description="a data URL (data:image/...;base64,...) or an http(s) URL")
    # "low" (a 512-px thumbnail) would change what the model reads; the page is always read at
    # the model's own resolution, which is what "auto" and "high" ask for.
    detail: Literal["auto", "high"] | None = None


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL


def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "text-part", "image_url": "image-part"}.get(kind)


ContentPart = Annotated[
    Union[Annotated[TextPart, Tag("text-part")], Annotated[ImagePart, Tag("image-part")]],
    Discriminator(_part_tag, custom_error_type="invalid_part",
                  custom_error_message="must be a content part with type 'text' or 'image_url'"),
]
TextOnlyPart = Annotated[
    Union[Annotated[TextPart, Tag("text-part")]],
    Discriminator(lambda v: "text-part" if _part_tag(v) == "text-part" else None, custom_error_type="invalid_part",
                  custom_error_message="must be a content part with type 'text' (only user messages hold images)"),
]


def _content_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "parts"
    return None


def _content(part: Any) -> Any:
    return Annotated[
        Union[Annotated[str, Tag("string")], Annotated[list[part], Tag("parts"), Field(min_length=1)]],
        Discriminator(_content_tag, custom_error_type="invalid_content",
                      custom_error_message="must be a string or a non-empty list of content parts"),
    ]


class SystemMessage(BaseModel):
    """``developer`` is OpenAI's newer name for the system role; both render as the system turn."""

    model_config = _STRICT
    role: Literal["system", "developer"]
    content: _content(TextOnlyPart)


class UserMessage(BaseModel):
    model_config = _STRICT
    role: Literal["user"]
    content: _content(ContentPart)


class AssistantMessage(BaseModel):
    model_config = _STRICT
    role: Literal["assistant"]
    content: _content(TextOnlyPart)


def _role_tag(value: Any) -> str | None:
    role = value.get("role") if isinstance(value, dict) else getattr(value, "role", None)
    return {"system": "system-turn", "developer": "system-turn", "user": "user-turn",
            "assistant": "assistant-turn"}.get(role) if isinstance(role, str) else None


Message = Annotated[
    Union[Annotated[SystemMessage, Tag("system-turn")], Annotated[UserMessage, Tag("user-turn")],
          Annotated[AssistantMessage, Tag("assistant-turn")]],
    Discriminator(_role_tag, custom_error_type="invalid_role",
                  custom_error_message="must be an object whose role is 'system', 'developer', 'user' or 'assistant'"),
]

#: The labels above, which pydantic puts in an error's location; they are no field names.
UNION_LABELS = frozenset({"text-part", "image-part", "string", "parts", "system-turn", "user-turn",
                          "assistant-turn"})


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions``. Parameters left out (or null) take OpenAI's
    defaults: temperature 1, top_p 1, no penalties, n 1; no ``max_tokens``: up to the server's
    ``--max-new-tokens-limit``."""

    model_config = _STRICT

    messages: list[Message] = Field(min_length=1)
    model: str | None = Field(None, description="any value; the answer names the served model")
    max_completion_tokens: int | None = Field(None, ge=1, description="capped at --max-new-tokens-limit")
    max_tokens: int | None = Field(None, ge=1, description="older name of max_completion_tokens")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1, description="only 1")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Annotated[
        Union[Annotated[StopString, Tag("string")],
              Annotated[list[StopString], Tag("parts"), Field(max_length=MAX_STOP_STRINGS)]],
        Discriminator(_content_tag, custom_error_type="invalid_stop",
                      custom_error_message=f"must be a string or a list of at most {MAX_STOP_STRINGS} strings"),
    ] | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False,
                                             description="vLLM's: above 1 discourages tokens already seen")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    ignore_eos: bool | None = Field(None, description="vLLM's: the answer runs to max_tokens (benchmarks)")

    @field_validator("temperature")
    @classmethod
    def _not_vanishing(cls, value: float | None) -> float | None:
        # the same rule as /ocr's (model_runner.defaults): 0 is greedy, a tiny positive value would
        # make the sampler overflow, so it is refused rather than changed behind the client's back
        return None if value is None else check_temperature(value)

    @field_validator("n")
    @classmethod
    def _only_one(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported (one answer per request)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ChatCompletionRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed with 'stream': true")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return self

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class RequestValidationFailed(Exception):
    """A body that does not fit ``ChatCompletionRequest``: the message and the ``param`` it names."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.message = message
        self.param = param


def _param_path(loc: tuple) -> str | None:
    """``messages[0].content[1].image_url.url`` from a pydantic location (union labels left out)."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item not in UNION_LABELS:
            parts.append(("." if parts else "") + str(item))
    return clip_for_message("".join(parts)) or None


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate the JSON body; raises ``RequestValidationFailed`` with OpenAI-style wording."""
    if not isinstance(body, dict):
        raise RequestValidationFailed("Request body must be a JSON object", None)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _param_path(tuple(error.get("loc", ())))
        kind = error.get("type", "")
        if kind == "extra_forbidden":
            message = f"Unrecognized request argument supplied: '{param}' (not supported by this server)"
        elif kind == "missing":
            message = f"Missing required parameter: '{param}'"
        else:
            msg = error.get("msg", "invalid value").removeprefix("Value error, ")
            if param is None and msg.startswith("'"):  # a whole-body rule names its field first
                param = msg.split("'")[1]
            message = f"Invalid '{param}': {msg}" if param else msg
        raise RequestValidationFailed(message, param) from None


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    index: int = 0
    message: AssistantReply
    finish_reason: FinishReason
    # vLLM's field: the stop string that ended the answer, or "repetition" when the server's
    # repetition guard cut a looping answer (finish_reason "length"); null otherwise.
    stop_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _present_only(self, handler) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: the role once, then content.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
