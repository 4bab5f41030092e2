"""dots-ocr-server: the HTTP API of ../shared/spec/API.md on our own dots.ocr runner.

``create_app(config=None, runner=None)`` builds the Flask app; ``main()`` parses the command line
and serves it with gunicorn (a production WSGI server: one process, several threads, so a second
request is answered 429 at once while the first one runs). Nothing happens at import time.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime as _dt
import hmac
import json
import logging
import os
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from flask import Flask, Response, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from werkzeug.exceptions import HTTPException

from image_utils import IMAGE_FORMATS, clip_for_message
from model_runner.prompts import (BBOX_PROMPT_TYPES, POSTPROCESS_PROMPT_TYPES, PROMPT_TYPES, QUESTION_PROMPT_TYPES,
                                  default_temperature)

log = logging.getLogger("dots_ocr_server")

MODEL_NAME = "dots-ocr"
BUSY_MESSAGE = "Server is busy processing another request"
NOT_LOADED_MESSAGE = "Model not loaded"
NO_IMAGE_MESSAGE = "No image data provided"
DEFAULT_TEMPERATURE = 0.1
MIN_TEMPERATURE = 1e-4
MAX_JSON_DEPTH = 64  # deeper bodies are refused before parsing (the parser would recurse)
DEMO_NOTICE = ("DEMO MODE: serving a tiny checkpoint with RANDOM weights; its output is meaningless. "
               "Download the real weights and start without --demo for real OCR.")


# ---------------------------------------------------------------------------------------------
# Configuration: one object, filled from flags and DOTS_OCR_* environment variables
# ---------------------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    model_path: str = "./weights/DotsOCR"
    host: str = "127.0.0.1"
    port: int = 5000
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    demo: bool = False
    image_root: str | None = None
    allow_private_urls: bool = False
    api_key: str | None = None
    max_body_mb: float = 64.0
    max_image_pixels: int = 100_000_000
    max_new_tokens_limit: int = 24000
    repetition_window: int = 512
    compile: bool | None = None  # CUDA fast path (static cache + compiled decode): None = on for CUDA
    threads: int = 16
    max_batch_size: int = 1
    max_pdf_pages: int = 2000
    max_prompt_chars: int = 4000
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> "ServerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = dict(values or {})
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        return cls(**values)


# Command-line flags; each also reads DOTS_OCR_<NAME> from the environment.
_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--model-path", dict(help="checkpoint folder (config.json, safetensors, tokenizer)")),
    ("--host", dict(help="address to bind (default 127.0.0.1: this machine only)")),
    ("--port", dict(type=int)),
    ("--device", dict(help="auto | cpu | cuda | cuda:N")),
    ("--dtype", dict(choices=["auto", "bfloat16", "float16", "float32"])),
    ("--attn-implementation", dict(choices=["auto", "sdpa", "flash_attention_2", "eager"])),
    ("--demo", dict(action="store_true", help="build and serve a tiny RANDOM checkpoint (no real OCR)")),
    ("--image-root", dict(help="confine `path` images to this folder")),
    ("--allow-private-urls", dict(action="store_true",
                                  help="let `url` images come from loopback/private/link-local addresses")),
    ("--api-key", dict(help="require `Authorization: Bearer KEY` on /ocr")),
    ("--max-body-mb", dict(type=float, help="largest request body accepted")),
    ("--max-image-pixels", dict(type=int, help="largest decoded image (width x height)")),
    ("--max-new-tokens-limit", dict(type=int, help="largest max_new_tokens a request may ask for")),
    ("--repetition-window", dict(type=int, help="tokens of exact repetition that stop a looping page (0: off)")),
    ("--compile", dict(action=argparse.BooleanOptionalAction,
                       help="CUDA fast path: static KV cache + compiled decode step (default: on with CUDA, off on CPU)")),
    ("--threads", dict(type=int, help="request threads (one request runs; the others get 429)")),
    ("--max-batch-size", dict(type=int, help="requests that generate together (1: one at a time, as API.md)")),
    ("--max-pdf-pages", dict(type=int, help="largest PDF (pages) accepted, checked when it is opened")),
    ("--max-prompt-chars", dict(type=int, help="longest `prompt` (question) for prompt_general")),
]


def _env_value(name: str, spec: dict[str, Any]):
    raw = os.environ.get("DOTS_OCR_" + name.upper())
    if raw is None:
        return None
    if spec.get("action") in ("store_true", argparse.BooleanOptionalAction):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return spec.get("type", str)(raw)


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="server.py", description="dots.ocr HTTP server (transformers, no vLLM)")
    for flag, spec in _FLAGS:
        dest = flag[2:].replace("-", "_")
        env = _env_value(dest, spec)
        default = env if env is not None else getattr(defaults, dest)
        help_text = (spec.get("help", "") + f" [env DOTS_OCR_{dest.upper()}; default {default!r}]").strip()
        parser.add_argument(flag, dest=dest, default=default, **{**spec, "help": help_text})
    args = parser.parse_args(argv)
    return ServerConfig.from_mapping(vars(args))


# ---------------------------------------------------------------------------------------------
# Request validation
# ---------------------------------------------------------------------------------------------


class RequestError(Exception):
    """An error with an HTTP status and a message for the client."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers or {}


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
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    max_new_tokens: int = Field(12000, ge=1)
    stream: bool = False
    bbox: list[int | float] | None = None
    # Extensions (issue 5); absent, the request and its response are exactly API.md's.
    page: int = Field(1, ge=1)  # PDF page, 1-based
    dpi: int | None = Field(None, ge=36, le=600)  # PDF render resolution (default 200)
    postprocess: bool = False  # add layout (original pixels), markdown, repaired
    skip_headers_footers: bool = False  # markdown without Page-header / Page-footer
    visualize: bool = False  # add a base64 PNG of the page with its layout drawn
    prompt: str | None = None  # the question, for prompt_general only
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # reproducible sampling
    logprobs: bool = False  # add per-token log-probabilities
    top_logprobs: int | None = Field(None, ge=1, le=5)  # with logprobs: k alternatives per token

    @field_validator("temperature")
    @classmethod
    def _not_vanishing(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

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
        return default_temperature(self.prompt_type, DEFAULT_TEMPERATURE)


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


def validate_request(body: Any, max_new_tokens_limit: int, max_prompt_chars: int = 4000) -> OCRRequest:
    """Check the JSON body in the order API.md documents its messages."""
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
    try:
        return OCRRequest.model_validate(body, context={"max_new_tokens_limit": max_new_tokens_limit,
                                                        "max_prompt_chars": max_prompt_chars})
    except ValidationError as exc:
        raise RequestError(_validation_message(exc.errors()[0])) from None


# ---------------------------------------------------------------------------------------------
# Application state: the runner, its background loading, the processing lock
# ---------------------------------------------------------------------------------------------


class SlotPool:
    """``size`` generation slots, with the non-blocking part of ``threading.Lock``'s interface:
    at size 1 it is the single processing lock of API.md; at N > 1 up to N requests hold a slot
    (and generate together in the runner's batch). A plain counter under a lock: a
    ``BoundedSemaphore`` cannot say how many are taken."""

    def __init__(self, size: int = 1):
        if size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.size = size
        self._taken = 0
        self._mutex = threading.Lock()

    def acquire(self, blocking: bool = False) -> bool:
        if blocking:
            raise ValueError("SlotPool only acquires without blocking")
        with self._mutex:
            if self._taken >= self.size:
                return False
            self._taken += 1
            return True

    def release(self) -> None:
        with self._mutex:
            if self._taken <= 0:
                raise RuntimeError("release of a slot that was not taken")
            self._taken -= 1

    @property
    def running(self) -> int:
        return self._taken

    def locked(self) -> bool:
        """True when no slot is free (a full pool, like a held lock)."""
        return self._taken >= self.size


class ServerState:
    def __init__(self, config: ServerConfig, runner):
        self.config = config
        self.runner = runner
        self.lock = SlotPool(config.max_batch_size)
        self.load_error: str | None = None
        self.loader: threading.Thread | None = None

    @property
    def model_loaded(self) -> bool:
        return self.runner is not None and self.runner.loaded

    def start_loading(self) -> None:
        self.loader = threading.Thread(target=self._load, name="dots-ocr-load", daemon=True)
        self.loader.start()

    def _load(self) -> None:
        try:
            if self.config.demo:
                from model_runner.tiny import build_tiny_checkpoint

                build_tiny_checkpoint(self.runner.model_path, seed=0)
                log.warning(DEMO_NOTICE)
            self.runner.load()
        except Exception as exc:  # noqa: BLE001 - reported in /health and the log, the server keeps serving
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed; /ocr answers 500 '%s'", NOT_LOADED_MESSAGE)


def _client_gone_probe(environ) -> Callable[[], bool] | None:
    """A cheap check, for the generation thread, that the HTTP client has closed its connection.

    Streams notice a gone client when a write fails; a non-streaming request writes nothing until
    the end, so it looks at the socket: readable with nothing to read means the peer closed it.
    gunicorn exposes the socket in the WSGI environ; no WSGI-level API tells this.
    """
    sock = environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return None
    last = [0.0]
    gone = [False]

    def probe() -> bool:
        now = time.monotonic()
        if gone[0] or now - last[0] < 0.25:
            return gone[0]
        last[0] = now
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                gone[0] = True
        except BlockingIOError:
            pass
        except OSError:
            gone[0] = True
        return gone[0]

    return probe


def _now_iso() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S.%f")


def _ndjson(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def _error(message: str, status: int):
    response = jsonify({"error": message})
    response.status_code = status
    return response


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_app(config: ServerConfig | dict | None = None, runner=None) -> Flask:
    """Build the Flask app. With no ``runner`` one is made from ``config`` and loaded on a
    background thread (``/health`` answers at once, ``model_loaded`` false until it is ready); a
    given runner that is not loaded yet is loaded the same way."""
    if not isinstance(config, ServerConfig):
        config = ServerConfig.from_mapping(config)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(config.max_body_mb * 1024 * 1024)
    app.json.ensure_ascii = False
    app.json.sort_keys = False

    if runner is None:
        from model_runner.runner import ModelRunner

        if config.demo:
            demo_dir = Path(tempfile.mkdtemp(prefix="dots-ocr-demo-"))
            atexit.register(shutil.rmtree, demo_dir, ignore_errors=True)
            config = dataclasses.replace(config, model_path=str(demo_dir / "DotsOCR-tiny-random"))
        runner = ModelRunner.from_config(config)
    state = ServerState(config, runner)
    app.extensions["dots_ocr"] = state
    if not runner.loaded:
        state.start_loading()

    from image_utils import ImagePolicy

    policy = ImagePolicy(image_root=config.image_root, allow_private_urls=config.allow_private_urls,
                         max_image_pixels=config.max_image_pixels, max_pdf_pages=config.max_pdf_pages)

    _register_error_handlers(app)

    @app.get("/health")
    def health():
        body = {"status": "healthy", "model_loaded": state.model_loaded}
        body["demo"] = config.demo
        if config.demo:
            body["warning"] = DEMO_NOTICE
        if state.load_error:
            body["load_error"] = state.load_error
        if state.model_loaded:
            body["device"] = str(runner.device)
            body["dtype"] = str(runner.dtype).removeprefix("torch.")
            body["fast_path"] = bool(getattr(runner, "fast_path", False))
        body["max_batch_size"] = state.lock.size
        body["running"] = state.lock.running
        body["prompt_types"] = list(PROMPT_TYPES)
        return jsonify(body)

    @app.post("/ocr")
    def ocr():
        _check_api_key(config)
        body = _json_body()
        req = validate_request(body, config.max_new_tokens_limit, config.max_prompt_chars)
        if not state.model_loaded:
            raise RequestError(NOT_LOADED_MESSAGE, 500)
        if not state.lock.acquire(blocking=False):
            raise RequestError(BUSY_MESSAGE, 429, headers={"Retry-After": "1"})
        release = _once(state.lock.release)
        try:
            job = _start_job(runner, policy, req, _client_gone_probe(request.environ))
        except BaseException:
            release()
            raise
        if req.stream:
            response = Response(_stream_lines(job, release), mimetype="application/x-ndjson")
            response.headers["Cache-Control"] = "no-cache"
            response.headers["X-Accel-Buffering"] = "no"
            # If the client is gone before the body is iterated, the WSGI server still closes it.
            response.call_on_close(job.pieces.close)
            response.call_on_close(release)
            return response
        try:
            parts, tokens = [job.first], list(job.first_tokens)
            for piece in job.pieces:
                parts.append(piece.text)
                tokens.extend(piece.tokens)
            text = "".join(parts)
            body = {"model": MODEL_NAME, "response": text, "prompt_type": req.prompt_type}
            body.update(job.extra_fields(text))
            if req.logprobs:
                body["logprobs"] = [_token_json(t) for t in tokens]
        finally:
            job.pieces.close()
            release()
        return jsonify(body)

    return app


def _json_depth_exceeds(data: bytes, limit: int) -> bool:
    """True when brackets nest deeper than ``limit`` (strings skipped). Checked before parsing:
    Python's json module recurses per level and a body nested thousands deep (closed or not) ends
    in RecursionError. Hand-written because no parser option bounds the depth."""
    depth = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def _json_body() -> Any:
    """The request's JSON body (None when empty); 400 for invalid or too deeply nested JSON."""
    data = request.get_data(cache=True)
    if _json_depth_exceeds(data, MAX_JSON_DEPTH):
        raise RequestError(f"Invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels")
    body = request.get_json(force=True, silent=True)
    if body is None and data:
        raise RequestError("Invalid JSON body")
    return body


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = threading.Lock()

    def wrapper() -> None:
        if done.acquire(blocking=False):
            fn()

    return wrapper


def _check_api_key(config: ServerConfig) -> None:
    if not config.api_key:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
        raise RequestError("Unauthorized: send 'Authorization: Bearer <api key>'", 401)


# Ollama's names for how an answer ended (issue 12); the runner's "eos" is Ollama's "stop".
DONE_REASONS = {"eos": "stop", "length": "length", "repetition": "repetition", "cancelled": "cancelled"}


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def _token_json(token) -> dict[str, Any]:
    entry: dict[str, Any] = {"token": token.text, "id": token.id, "logprob": token.logprob}
    if token.top:
        entry["top_logprobs"] = [{"token": text, "id": tid, "logprob": lp} for tid, text, lp in token.top]
    return entry


@dataclass
class _Job:
    """One /ocr request past validation: its page, the running generation, its first text piece
    (with the tokens generated up to it)."""

    req: OCRRequest
    document: Any  # image_utils.LoadedImage
    pieces: Iterator[Any]  # model_runner.decoding.Piece
    first: str
    first_tokens: list[Any]
    stats: Any  # model_runner.runner.GenerationStats
    started: float  # time.perf_counter() when the request began
    load_s: float  # reading, decoding or rendering the image

    def statistics(self) -> dict[str, Any]:
        """How the answer ended and what it cost, with Ollama's field names (durations in ns)."""
        stats = self.stats
        fields: dict[str, Any] = {
            "done_reason": DONE_REASONS.get(stats.finish_reason, stats.finish_reason),
            "total_duration": _ns(time.perf_counter() - self.started),
            "load_duration": _ns(self.load_s),
            "prompt_eval_count": stats.prompt_tokens,
            "prompt_eval_duration": _ns(stats.prompt_eval_s),
            "eval_count": stats.new_tokens,
            "eval_duration": _ns(stats.decode_s),
        }
        if stats.seed is not None and self.req.seed is not None:
            fields["seed"] = stats.seed
        return fields

    def extra_fields(self, text: str) -> dict[str, Any]:
        """The fields beyond API.md: the statistics, and what the request asked for."""
        from image_utils import to_original_coords

        extra: dict[str, Any] = self.statistics()
        if self.document.source_kind == "pdf":
            extra["page"] = self.document.page
            extra["page_count"] = self.document.page_count
        if self.req.postprocess or self.req.visualize:
            from layout import postprocess_response, visualize_response

            processed = postprocess_response(
                text, prompt_type=self.req.prompt_type, model_size=self.stats.model_size,
                original_size=self.stats.original_size, image=self.document.image,
                skip_headers_footers=self.req.skip_headers_footers, picture_mode="ref",
                to_original=to_original_coords, grounding_bbox=self.req.bbox)
            if self.req.postprocess:
                extra.update(processed)
            if self.req.visualize:
                extra.update(visualize_response(processed, prompt_type=self.req.prompt_type,
                                                image=self.document.image))
        return extra


def _check_bbox_inside(req: OCRRequest, size: tuple[int, int]) -> None:
    if req.bbox is None:
        return
    width, height = size
    x1, y1, _, _ = req.bbox
    if x1 >= width or y1 >= height:
        raise RequestError(f"Invalid 'bbox': {req.bbox} lies entirely outside the image ({width} x {height} pixels)")


def _start_job(runner, policy, req: OCRRequest, should_stop) -> _Job:
    """Load the page and run generation up to its first text piece, so that a bad image or an
    impossible request is still answered with a plain JSON error (before any streamed line)."""
    from image_utils import ImageInputError, load_document
    from model_runner.runner import GenerationInputError, GenerationStats

    started = time.perf_counter()
    try:
        document = load_document(req.image, req.image_format, policy, page=req.page, dpi=req.dpi)
    except ImageInputError as exc:
        raise RequestError(exc.message, exc.status) from None
    load_s = time.perf_counter() - started
    _check_bbox_inside(req, document.image.size)
    stats = GenerationStats()
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    pieces = runner.stream_pieces(document.image, req.prompt_type, bbox=req.bbox,
                                  temperature=req.sampling_temperature, top_p=req.top_p,
                                  max_new_tokens=req.max_new_tokens, stats=stats, should_stop=should_stop,
                                  question=req.prompt, seed=req.seed, logprobs=logprobs)
    first_tokens: list[Any] = []
    first = ""
    try:
        for piece in pieces:
            first_tokens.extend(piece.tokens)
            if piece.text:
                first = piece.text
                break
    except GenerationInputError as exc:
        raise RequestError(str(exc), 400) from None
    return _Job(req=req, document=document, pieces=pieces, first=first, first_tokens=first_tokens,
                stats=stats, started=started, load_s=load_s)


def _stream_lines(job: _Job, release: Callable[[], None]) -> Iterator[bytes]:
    """NDJSON lines, one per text piece (with its tokens' logprobs when asked for), then the
    closing ``done`` line (which carries the statistics and the extra fields the request asked
    for). An error after the first line ends the stream with a last line carrying ``error`` and
    ``done: true``."""
    def line(response: str, done: bool, tokens=(), **extra) -> bytes:
        body = {"model": MODEL_NAME, "created_at": _now_iso(), "response": response, "done": done}
        if job.req.logprobs and not done:
            body["logprobs"] = [_token_json(t) for t in tokens]
        return _ndjson({**body, **extra})

    text = [job.first]
    pending = list(job.first_tokens)
    try:
        if job.first:
            yield line(job.first, False, pending)
            pending = []
        try:
            for piece in job.pieces:
                pending.extend(piece.tokens)
                if not piece.text:
                    continue
                text.append(piece.text)
                yield line(piece.text, False, pending)
                pending = []
            extra = job.extra_fields("".join(text))
        except Exception as exc:  # noqa: BLE001 - the client gets it as the stream's last line
            log.exception("generation failed mid-stream")
            yield line("", True, error=f"Generation failed: {clip_for_message(exc)}")
            return
        if job.req.logprobs and pending:
            extra["logprobs"] = [_token_json(t) for t in pending]
        yield line("", True, **extra)
    finally:
        job.pieces.close()  # cancels generation if the client went away mid-stream
        release()


def _register_error_handlers(app: Flask) -> None:
    """Every error is JSON ``{"error": ...}``, 404/405/413 and unexpected ones included."""

    @app.errorhandler(RequestError)
    def request_error(exc: RequestError):
        response = _error(exc.message, exc.status)
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        messages = {404: "Not found", 405: "Method not allowed",
                    413: "Request body too large (limit: --max-body-mb)"}
        response = _error(messages.get(exc.code, exc.description or exc.name), exc.code or 500)
        if exc.code == 405 and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error(f"Internal server error: {type(exc).__name__}", 500)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


MISSING_WEIGHTS = """\
No dots.ocr checkpoint at {path} (config.json is missing).
Fix it one of these ways:
  * download the weights into that folder (see README, "Real weights"), e.g.
      python scripts/download_weights.py ./weights/DotsOCR
  * point the server at a downloaded folder:  python server.py --model-path /path/to/DotsOCR
  * try the server without weights:           python server.py --demo   (tiny random model, no real OCR)"""


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not config.demo and not (Path(config.model_path) / "config.json").is_file():
        print(MISSING_WEIGHTS.format(path=config.model_path), file=sys.stderr)
        return 2
    if config.demo:
        banner = "*" * len(DEMO_NOTICE)
        log.warning("\n%s\n%s\n%s", banner, DEMO_NOTICE, banner)
    serve(config)
    return 0


def serve(config: ServerConfig) -> None:
    """Serve with gunicorn: one worker process (the model lives there), ``threads`` threads."""
    from gunicorn.app.base import BaseApplication

    class _Gunicorn(BaseApplication):
        def load_config(self):
            settings = {
                "bind": f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}",
                "workers": 1,
                "worker_class": "gthread",
                "threads": max(2, config.threads),
                "timeout": 300,
                "graceful_timeout": 10,
                "keepalive": 5,
                "accesslog": "-",
                "errorlog": "-",
                "loglevel": "info",
            }
            # gunicorn >= 25.1 opens a control socket at one fixed path per user; two servers
            # on one machine would fight over it, and nothing here uses it.
            if "control_socket_disable" in self.cfg.settings:
                settings["control_socket_disable"] = True
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self):
            return create_app(config)

    _Gunicorn().run()


if __name__ == "__main__":
    sys.exit(main())
