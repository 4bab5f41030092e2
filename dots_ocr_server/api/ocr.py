"""The interface document's routes as a blueprint: ``GET /health`` and ``POST /ocr`` (JSON or
NDJSON streaming), an adapter over the page service (``dots_ocr_server.pages``).

The order of a request: the body is validated; a free generation slot is checked for (500 while
the model loads, 429 when busy: answered at once); the page is loaded (read, fetched, decoded or
rendered) without holding a slot, so a slow fetch or a complex PDF page never blocks the model;
then a slot is taken (``state.lock``: at ``--max-batch-size 1`` the single processing lock) until
the answer, or its stream, has ended. It is released exactly once on every path (``once``), also
when the client goes away mid-stream.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

from flask import Blueprint, current_app, jsonify, request

from image_utils import clip_for_message
from model_runner.prompts import PROMPT_TYPES

from ..pages import PageRun
from ..pages.result import token_json
from .errors import MODEL_NAME, SHUTDOWN_MESSAGE, RequestError
from .http import check_api_key, json_body, ndjson, now_iso, streaming_response
from .metrics import access_note
from .request_log import current_request_id
from .schemas import OCRRequest, validate_request
from .state import DEMO_NOTICE, ServerState

log = logging.getLogger("dots_ocr_server")

bp = Blueprint("ocr", __name__)


def current_state() -> ServerState:
    return current_app.extensions["dots_ocr"]


@bp.get("/health")
def health():
    state = current_state()
    config, runner = state.config, state.runner
    body = {"status": "healthy", "model_loaded": state.model_loaded}
    body["demo"] = config.demo
    if config.demo:
        body["warning"] = DEMO_NOTICE
    if state.load_error:
        body["load_error"] = state.load_error
    if state.gpu_warning:
        body["gpu_warning"] = state.gpu_warning
    if state.model_loaded:
        body["device"] = str(runner.device)
        body["dtype"] = str(runner.dtype).removeprefix("torch.")
        body["fast_path"] = bool(getattr(runner, "fast_path", False))
    body["default_max_new_tokens"] = config.max_new_tokens_default
    body["max_batch_size"] = state.lock.size
    body["running"] = state.lock.running
    body["queued"] = state.lock.queued
    body["prompt_types"] = list(PROMPT_TYPES)
    if state.shutting_down.is_set():
        body["shutting_down"] = True
    return jsonify(body)


@bp.post("/ocr")
def ocr():
    state = current_state()
    state.refuse_when_shutting_down()
    check_api_key(state.config)
    req = validate_request(json_body(), state.config)
    page_request = req.page_request()
    started = time.perf_counter()
    state.require_free_slot()
    page = state.pages.load(page_request.source)
    load_s = time.perf_counter() - started
    release = state.take_slot()
    try:
        run = state.pages.start(page_request, page, started=started, load_s=load_s,
                                should_stop=state.generation_should_stop(request.environ),
                                wake_interval_s=state.wake_interval_s(bool(req.stream)), on_finish=access_note())
    except BaseException:
        release()
        raise
    stopped_by_shutdown = _shutdown_probe(state, run)
    if req.stream:
        return streaming_response(_stream_lines(req, run, release, stopped_by_shutdown, current_request_id()),
                                  "application/x-ndjson", run.close, release)
    try:
        result = run.collect()
        if stopped_by_shutdown():
            raise RequestError(SHUTDOWN_MESSAGE, 503)
        body = {"model": MODEL_NAME, "response": result.text, "prompt_type": req.prompt_type}
        body.update(result.extra_fields())
        if req.logprobs:
            body["logprobs"] = [token_json(t) for t in result.tokens]
    finally:
        run.close()
        release()
    return jsonify(body)


def _shutdown_probe(state: ServerState, run: PageRun) -> Callable[[], bool]:
    """True once the run was cancelled because the shutdown's grace time is over."""
    return lambda: run.stats.finish_reason == "cancelled" and state.stop_generation.is_set()


def _stream_lines(req: OCRRequest, run: PageRun, release: Callable[[], None],
                  stopped_by_shutdown: Callable[[], bool], request_id: str | None) -> Iterator[bytes]:
    """NDJSON lines, one per text piece (with its tokens' logprobs when asked for), then the
    closing ``done`` line (which carries the statistics and the extra fields the request asked
    for). An error after the first line ends the stream with a last line carrying ``error`` and
    ``done: true``."""
    def line(response: str, done: bool, tokens=(), **extra) -> bytes:
        body = {"model": MODEL_NAME, "created_at": now_iso(), "response": response, "done": done}
        if req.logprobs and not done:
            body["logprobs"] = [token_json(t) for t in tokens]
        return ndjson({**body, **extra})

    text: list[str] = []
    tokens: list = []  # the whole answer's, for the result (confidence)
    pending: list = []  # not yet sent with a line
    try:
        try:
            for piece in run.pieces():
                pending.extend(piece.tokens)
                tokens.extend(piece.tokens)
                if not piece.text:
                    continue
                text.append(piece.text)
                yield line(piece.text, False, pending)
                pending = []
            run.close()
            result = run.result("".join(text), tokens)
            if stopped_by_shutdown():
                yield line("", True, error=SHUTDOWN_MESSAGE, request_id=request_id, **result.statistics())
                return
            extra = result.extra_fields()
        except Exception as exc:  # the client gets it as the stream's last line
            log.exception("generation failed mid-stream")
            yield line("", True, error=f"Generation failed: {clip_for_message(exc)}", request_id=request_id)
            return
        if req.logprobs and pending:
            extra["logprobs"] = [token_json(t) for t in pending]
        yield line("", True, **extra)
    finally:
        run.close()  # cancels generation if the client went away mid-stream
        release()
