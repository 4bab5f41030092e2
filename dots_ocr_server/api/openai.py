"""OpenAI's protocol as a blueprint: ``POST /v1/chat/completions``, ``GET /v1/models`` (and
``GET /v1/models/<id>``), so that upstream's parser and every OpenAI SDK work unchanged; an
adapter over the page service (``dots_ocr_server.pages``), like ``/ocr``.

Same model, generation slots, API key, image policy, limits and sampling rules as ``/ocr`` (a
temperature below the minimum is refused on both). Differences, as OpenAI clients expect them:

- a request that finds every slot busy waits in a bounded FIFO line (``--max-queue``) instead
  of getting 429; past the line it gets 429 with ``Retry-After``; a queued request whose client
  hangs up leaves the line at once;
- errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` (handlers of
  this blueprint only; ``/ocr`` keeps its ``{"error": "..."}``);
- streaming is server-sent events of ``chat.completion.chunk`` objects ending with ``[DONE]``.

The chat goes through the checkpoint's chat template (``DotsOCRProcessor.page_inputs(messages=...)``),
as upstream's vLLM server renders it: upstream's text ``<|img|><|imgpad|><|endofimg|>`` + prompt
is recognised as the image's place, so its prompts reach the model exactly as under vLLM.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import HTTPException

from image_utils import clip_for_message
from model_runner.processing import IMAGE_END, IMAGE_PAD, IMAGE_PLACEHOLDER, IMAGE_START

from model_runner.decoding import DecodingOptions

from ..pages import PageRequest, PageRun, PageSource
from .errors import CLIENT_CLOSED, MODEL_NAME, NOT_LOADED_MESSAGE, SHUTDOWN_MESSAGE, RequestError
from .http import any_of, check_api_key, json_body, once, streaming_response
from .metrics import access_note
from .openai_schemas import (AssistantReply, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                             ChoiceLogprobs, ChunkChoice, Delta, ErrorDetail, ErrorResponse, ImagePart, ModelCard,
                             ModelList, RequestValidationFailed, TextPart, TokenLogprob, TopLogprob, Usage,
                             parse_chat_request)
from .state import QueueFull, ServerState

log = logging.getLogger("dots_ocr_server")

bp = Blueprint("openai", __name__)

OWNER = "dots-ocr-server"
QUEUE_FULL_MESSAGE = "Server is busy: every generation slot is taken and {n} requests already wait (--max-queue)"
IMAGE_COUNT_MESSAGE = ("Exactly one image per request is supported: one image_url part in a user message "
                       "(this request has {n})")
_IMAGE_TOKENS = (IMAGE_START, IMAGE_PAD, IMAGE_END)


def current_state() -> ServerState:
    return current_app.extensions["dots_ocr"]


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape (this blueprint's routes only)
# ---------------------------------------------------------------------------------------------


class OpenAIError(RequestError):
    """A ``RequestError`` that also names the request field at fault (``param``) and a ``code``."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, status, headers)
        self.param = param
        self.code = code


# OpenAI's error types by status (the SDKs pick their exception class from the status).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
_ERROR_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                429: "queue_full"}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    detail = ErrorDetail(message=message, type=kind, param=param, code=code or _ERROR_CODES.get(status))
    return ErrorResponse(error=detail).model_dump(mode="json")


def error_response(message: str, status: int, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    response = current_app.response_class(json.dumps(error_body(message, status, param, code), ensure_ascii=False),
                                          status=status, mimetype="application/json")
    response.headers.update(headers or {})
    return response


# The request field the page service names at fault -> where it is in an OpenAI request.
_FIELD_PARAMS = {"image": "image_url.url", "prompt": "messages", "bbox": "messages"}


@bp.errorhandler(RequestError)
def _request_error(exc: RequestError):
    param = getattr(exc, "param", None) or _FIELD_PARAMS.get(exc.field)
    return error_response(exc.message, exc.status, param, exc.code, exc.headers)


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    if exc.code == 413:
        return error_response("Request body too large (limit: --max-body-mb)", 413)
    return error_response(exc.description or exc.name, exc.code or 500)


@bp.errorhandler(Exception)
def _unexpected(exc: Exception):
    log.exception("unhandled error in %s %s", request.method, request.path)
    return error_response(f"Internal server error: {type(exc).__name__}", 500)


@bp.route("/v1/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def _unknown_route(rest: str):
    """Any other /v1 path or method. A route of its own, because the app-wide 404/405 handlers
    run for requests no blueprint route matched and would answer in /ocr's shape."""
    allowed = sorted({m for rule in current_app.url_map.iter_rules()
                      if rule.rule == request.path and rule.endpoint != "openai._unknown_route"
                      for m in rule.methods or () if m not in ("HEAD", "OPTIONS")})
    if allowed:
        raise OpenAIError(f"Method {request.method} not allowed on {request.path}", 405,
                          headers={"Allow": ", ".join(allowed)})
    raise OpenAIError(f"Unknown route {clip_for_message(request.path)}", 404)


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


def _model_card() -> ModelCard:
    return ModelCard(id=MODEL_NAME, created=int(time.time()), owned_by=OWNER)


@bp.get("/v1/models")
def list_models():
    state = current_state()
    check_api_key(state.config)
    return ModelList(data=[_model_card()]).model_dump(mode="json")


@bp.get("/v1/models/<path:model>")
def retrieve_model(model: str):
    state = current_state()
    check_api_key(state.config)
    if model != MODEL_NAME:
        raise OpenAIError(f"The model '{clip_for_message(model)}' does not exist; this server serves "
                          f"'{MODEL_NAME}'", 404, param="model", code="model_not_found")
    return _model_card().model_dump(mode="json")


@bp.post("/v1/chat/completions")
def chat_completions():
    state = current_state()
    config = state.config
    state.refuse_when_shutting_down()
    check_api_key(config)
    try:
        req = parse_chat_request(json_body())
    except RequestValidationFailed as exc:
        raise OpenAIError(exc.message, 400, param=exc.param) from None
    turns, image_url = chat_turns(req)
    if not state.model_loaded:
        raise OpenAIError(NOT_LOADED_MESSAGE, 500)
    page_request = _page_request(req, turns, image_url, config)
    started = time.perf_counter()
    page = state.pages.load(page_request.source)  # before the queue: a slow fetch holds no slot
    load_s = time.perf_counter() - started
    # a shutdown stops the queue's waiting and the running generations, as for /ocr
    should_stop = state.generation_should_stop(request.environ)
    release = _take_slot(state, any_of(should_stop, state.shutting_down.is_set))
    if release is None:
        state.refuse_when_shutting_down()
        # the client hung up while queued: nobody reads an answer
        log.info("a queued /v1/chat/completions request left the queue: its client disconnected")
        return Response(status=CLIENT_CLOSED)
    try:
        page_run = state.pages.start(page_request, page, started=started, load_s=load_s, should_stop=should_stop,
                                     wake_interval_s=state.wake_interval_s(bool(req.stream)),
                                     on_finish=access_note())
    except BaseException:
        release()
        raise
    run = _Run(req=req, page_run=page_run)
    if req.stream:
        return streaming_response(_sse(run, release), "text/event-stream", run.close, release)
    try:
        deltas = list(run.deltas())
        if state.stop_generation.is_set():
            raise OpenAIError(SHUTDOWN_MESSAGE, 503)
        body = run.completion("".join(d.text for d in deltas), [t for d in deltas for t in d.tokens])
    finally:
        run.close()
        release()
    return body.model_dump(mode="json")


def _take_slot(state: ServerState, should_stop: Callable[[], bool] | None) -> Callable[[], None] | None:
    """A generation slot, waiting in the FIFO line when all are busy; the release function, or
    None when the client left the line. 429 when the line is full."""
    try:
        taken = state.lock.acquire_queued(state.config.max_queue, should_stop)
    except QueueFull:
        raise OpenAIError(QUEUE_FULL_MESSAGE.format(n=state.lock.queued), 429,
                          headers={"Retry-After": "1"}) from None
    return once(state.lock.release) if taken else None


# ---------------------------------------------------------------------------------------------
# Messages -> the runner's chat turns
# ---------------------------------------------------------------------------------------------


def _check_text(text: str, param: str, placeholder_ok: bool) -> None:
    """The image tokens may appear only as upstream's whole placeholder, once, in the message that
    holds the image (it marks the image's place); anywhere else they would desynchronise the
    prompt from the image features."""
    rest = text.replace(IMAGE_PLACEHOLDER, "", 1) if placeholder_ok else text
    if any(token in rest for token in _IMAGE_TOKENS):
        where = "at most once, in the text of the user message holding the image"
        raise OpenAIError(f"Invalid '{param}': the image placeholder {IMAGE_PLACEHOLDER} (or one of its tokens) "
                          f"may appear only {where}", 400, param=param)


def chat_turns(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], str]:
    """-> (messages for ``ModelRunner.prepare(messages=...)``, the image's URL). Exactly one image
    (400 naming the limit); text is passed as sent."""
    images = [(i, j, part) for i, message in enumerate(req.messages) if isinstance(message.content, list)
              for j, part in enumerate(message.content) if isinstance(part, ImagePart)]
    if len(images) != 1:
        raise OpenAIError(IMAGE_COUNT_MESSAGE.format(n=len(images)), 400, param="messages")
    image_message, _, image_part = images[0]
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(req.messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            _check_text(message.content, f"messages[{i}].content", False)
            turns.append({"role": role, "content": message.content})
            continue
        placeholders = sum(p.text.count(IMAGE_PLACEHOLDER) for p in message.content if isinstance(p, TextPart))
        allowed = i == image_message and placeholders <= 1
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            if isinstance(part, TextPart):
                _check_text(part.text, f"messages[{i}].content[{j}].text", allowed)
                parts.append({"type": "text", "text": part.text})
            else:
                parts.append({"type": "image_url"})
        turns.append({"role": role, "content": parts})
    return turns, image_part.image_url.url


def _image_source(url: str) -> PageSource:
    """The page source of a data URL or an http(s) URL (loaded by the page service through /ocr's
    loader: the same policy, SSRF guard, --allow-private-urls, byte and pixel caps, timeouts)."""
    head = url[:16].lstrip().lower()
    if head.startswith("data:"):
        return PageSource(value=url, transport="base64")
    if urlsplit(url.strip()).scheme.lower() in ("http", "https"):
        return PageSource(value=url, transport="url")
    raise OpenAIError("Invalid 'image_url.url': must be a data URL (data:image/...;base64,...) "
                      "or an http(s) URL", 400, param="image_url.url")


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


class StopScanner:
    """Cuts the answer at the first stop string, which the answer does not include (OpenAI's
    meaning). Text that could be the start of a stop string is held back until it is not."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buffer = ""
        self.hit: str | None = None

    def feed(self, text: str) -> str:
        """The text that is now safe to send; sets ``hit`` when a stop string appeared."""
        if not self.stops:
            return text
        self.buffer += text
        found = [(self.buffer.find(s), s) for s in self.stops if s in self.buffer]
        if found:
            at, self.hit = min(found)
            out, self.buffer = self.buffer[:at], ""
            return out
        cut = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


@dataclass
class _Delta:
    text: str
    tokens: list[Any] = field(default_factory=list)  # model_runner.decoding.TokenRecord


@dataclass
class _Run:
    """One chat completion in progress: the page run's pieces, then what ended the answer."""

    req: ChatCompletionRequest
    page_run: PageRun
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0
    finish_reason: str = "stop"
    stop_reason: str | None = None

    @property
    def stats(self):
        return self.page_run.stats

    def close(self) -> None:
        self.page_run.close()  # cancels generation if it still runs

    def deltas(self) -> Iterator[_Delta]:
        """The answer as text deltas (stop strings applied), each with the tokens consumed for it.
        When it ends, ``finish_reason`` / ``stop_reason`` / ``completion_tokens`` are set."""
        scanner = StopScanner(self.req.stop_strings)
        pending: list[Any] = []
        for piece in self.page_run.pieces():
            self.completion_tokens += len(piece.tokens)
            pending.extend(piece.tokens)
            text = scanner.feed(piece.text)
            if text or scanner.hit:
                yield _Delta(text, pending)
                pending = []
            if scanner.hit:
                self.close()
                self.finish_reason, self.stop_reason = "stop", scanner.hit
                return
        tail = scanner.flush()
        if tail or pending:
            yield _Delta(tail, pending)
        reason = self.stats.finish_reason
        self.finish_reason = "length" if reason in ("length", "repetition") else "stop"
        self.stop_reason = "repetition" if reason == "repetition" else None

    @property
    def usage(self) -> Usage:
        prompt = self.stats.prompt_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=self.completion_tokens,
                     total_tokens=prompt + self.completion_tokens)

    def logprobs(self, tokens: list[Any]) -> ChoiceLogprobs | None:
        if not self.req.logprobs:
            return None
        return ChoiceLogprobs(content=[_token_logprob(t) for t in tokens])

    def completion(self, text: str, tokens: list[Any]) -> ChatCompletion:
        choice = Choice(message=AssistantReply(content=text), finish_reason=self.finish_reason,
                        stop_reason=self.stop_reason, logprobs=self.logprobs(tokens))
        return ChatCompletion(id=self.id, created=self.created, model=MODEL_NAME, choices=[choice], usage=self.usage)

    def chunk(self, delta: Delta, *, finish: bool = False, tokens: list[Any] | None = None) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, logprobs=self.logprobs(tokens) if tokens else None)
        if finish:
            choice.finish_reason, choice.stop_reason = self.finish_reason, self.stop_reason
        return ChatCompletionChunk(id=self.id, created=self.created, model=MODEL_NAME, choices=[choice])


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def _token_logprob(token) -> TokenLogprob:
    top = [TopLogprob(token=text, logprob=lp, bytes=_token_bytes(text)) for _, text, lp in token.top]
    return TokenLogprob(token=token.text, logprob=token.logprob, bytes=_token_bytes(token.text), top_logprobs=top)


def _page_request(req: ChatCompletionRequest, turns: list[dict[str, Any]], image_url: str, config) -> PageRequest:
    """The page service's request for the chat: its image, its turns (no prompt type: the chat
    template renders them), and OpenAI's defaults for the parameters left out (temperature 1; no
    ``max_tokens``: up to the server's limit, or its default in demo mode)."""
    asked = req.max_completion_tokens or req.max_tokens
    limit = config.max_new_tokens_limit
    seed = req.seed % 2**64 if req.seed is not None else None  # OpenAI allows negative seeds
    decoding = DecodingOptions(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, seed=seed,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0)
    return PageRequest(source=_image_source(image_url), prompt_type=None, messages=turns, decoding=decoding,
                       max_new_tokens=min(asked or config.open_ended_max_new_tokens, limit),
                       ignore_eos=bool(req.ignore_eos), route="/v1/chat/completions")


# ---------------------------------------------------------------------------------------------
# Server-sent events
# ---------------------------------------------------------------------------------------------


def _event(payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")


def _sse(run: _Run, release: Callable[[], None]) -> Iterator[bytes]:
    """``data: {chunk}`` events: the role, the content deltas, the chunk with ``finish_reason``,
    the usage chunk when ``stream_options.include_usage``, then ``data: [DONE]``. An error after
    the first event arrives as an error event, then ``[DONE]``."""
    def send(chunk: ChatCompletionChunk) -> bytes:
        body = chunk.model_dump(mode="json")
        if not run.req.include_usage:
            body.pop("usage")  # OpenAI sends usage: null on every chunk only when usage was asked for
        return _event(body)

    try:
        yield send(run.chunk(Delta(role="assistant", content="")))
        try:
            for delta in run.deltas():
                if delta.text or (run.req.logprobs and delta.tokens):
                    yield send(run.chunk(Delta(content=delta.text), tokens=delta.tokens))
        except Exception as exc:  # the client gets it as an error event
            log.exception("generation failed mid-stream")
            yield _event(error_body(f"Generation failed: {clip_for_message(exc)}", 500))
            yield _event("[DONE]")
            return
        yield send(run.chunk(Delta(), finish=True))
        if run.req.include_usage:
            usage = ChatCompletionChunk(id=run.id, created=run.created, model=MODEL_NAME, choices=[],
                                        usage=run.usage)
            yield _event(usage.model_dump(mode="json"))
        yield _event("[DONE]")
    finally:
        run.close()  # cancels generation if the client went away mid-stream
        release()
