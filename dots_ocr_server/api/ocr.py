"""API.md's routes as a blueprint: ``GET /health`` and ``POST /ocr`` (JSON or NDJSON streaming).

A request holds one generation slot (``state.lock``: at ``--max-batch-size 1`` the single
processing lock of API.md) from validation until its answer, or its stream, has ended; the slot is
released exactly once on every path (``once``), also when the client goes away mid-stream.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from flask import Blueprint, Response, current_app, jsonify, request

from image_utils import clip_for_message
from model_runner.prompts import PROMPT_TYPES

from .errors import BUSY_MESSAGE, MODEL_NAME, SHUTDOWN_MESSAGE, RequestError
from .http import check_api_key, json_body, ndjson, now_iso
from .metrics import job_observer
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
    config = state.config
    state.refuse_when_shutting_down()
    check_api_key(config)
    req = validate_request(json_body(), config)
    release = state.take_slot()
    try:
        should_stop = state.generation_should_stop(request.environ)
        job = _start_job(state.runner, state.policy, req, should_stop, state.wake_interval_s(bool(req.stream)))
        job.halted = state.stop_generation.is_set
    except BaseException:
        release()
        raise
    job.request_id, job.on_finish = current_request_id(), job_observer()
    if req.stream:
        response = Response(_stream_lines(job, release), mimetype="application/x-ndjson")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        # If the client is gone before the body is iterated, the WSGI server still closes it.
        response.call_on_close(job.pieces.close)
        response.call_on_close(release)
        response.call_on_close(job.finish)
        return response
    try:
        parts, tokens = [job.first], list(job.first_tokens)
        for piece in job.pieces:
            parts.append(piece.text)
            tokens.extend(piece.tokens)
        if job.stopped_by_shutdown():
            raise RequestError(SHUTDOWN_MESSAGE, 503)
        text = "".join(parts)
        body = {"model": MODEL_NAME, "response": text, "prompt_type": req.prompt_type}
        body.update(job.extra_fields(text, tokens))
        if req.logprobs:
            body["logprobs"] = [_token_json(t) for t in tokens]
    finally:
        job.pieces.close()
        release()
        job.finish()
    return jsonify(body)


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
    tokenizer: Any = None  # the runner's, to place the tokens in the answer (layout confidence)
    request_id: str | None = None
    on_finish: Callable[["_Job"], None] | None = None  # metrics and the access line (once)
    halted: Callable[[], bool] = lambda: False  # true once a shutdown stops generations

    def stopped_by_shutdown(self) -> bool:
        return self.stats.finish_reason == "cancelled" and self.halted()

    def finish(self) -> None:
        """The generation has ended (stats are final): tell the metrics and the access log."""
        on_finish, self.on_finish = self.on_finish, None  # once: both ends of a stream call it
        if on_finish is not None:
            on_finish(self)

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

    def extra_fields(self, text: str, tokens=()) -> dict[str, Any]:
        """The fields beyond API.md: the statistics, and what the request asked for. ``tokens``:
        the answer's token records (with logprobs when postprocess is on) for the cells' confidence."""
        from image_utils import to_original_coords

        extra: dict[str, Any] = self.statistics()
        if self.document.source_kind == "pdf":
            extra["page"] = self.document.page
            extra["page_count"] = self.document.page_count
        if self.req.postprocess or self.req.visualize:
            from dots_ocr_server.layout import postprocess_response, visualize_response

            processed = postprocess_response(
                text, prompt_type=self.req.prompt_type, model_size=self.stats.model_size,
                original_size=self.stats.original_size, image=self.document.image,
                skip_headers_footers=self.req.skip_headers_footers, picture_mode="ref",
                to_original=to_original_coords, grounding_bbox=self.req.bbox)
            if self.req.postprocess:
                if processed.get("layout"):
                    processed["layout"] = self._with_confidence(processed["layout"], tokens)
                extra.update(processed)
            if self.req.visualize:
                extra.update(visualize_response(processed, prompt_type=self.req.prompt_type,
                                                image=self.document.image))
        return extra

    def _with_confidence(self, cells: list[dict], tokens) -> list[dict]:
        """Each cell with ``confidence`` (layout.confidence); unchanged without token logprobs."""
        if self.tokenizer is None or not tokens or any(t.logprob is None for t in tokens):
            return cells
        from dots_ocr_server.layout import add_confidence
        from model_runner.trace import token_offsets

        answer, _, offsets = token_offsets(self.tokenizer, [t.id for t in tokens])
        return add_confidence(cells, answer, offsets, [t.logprob for t in tokens])


def _check_bbox_inside(req: OCRRequest, size: tuple[int, int]) -> None:
    if req.bbox is None:
        return
    width, height = size
    x1, y1, _, _ = req.bbox
    if x1 >= width or y1 >= height:
        raise RequestError(f"Invalid 'bbox': {req.bbox} lies entirely outside the image ({width} x {height} pixels)")


def _start_job(runner, policy, req: OCRRequest, should_stop, wake_interval_s: float = 0.0) -> _Job:
    """Load the page and run generation up to its first text piece, so that a bad image or an
    impossible request is still answered with a plain JSON error (before any streamed line)."""
    from image_utils import ImageInputError, load_document
    from model_runner.runner import BatchFullError, GenerationInputError, GenerationStats

    started = time.perf_counter()
    try:
        document = load_document(req.image, req.image_format, policy, page=req.page, dpi=req.dpi)
    except ImageInputError as exc:
        raise RequestError(exc.message, exc.status) from None
    load_s = time.perf_counter() - started
    _check_bbox_inside(req, document.image.size)
    stats = GenerationStats()
    # postprocess: the chosen tokens' logprobs (k = 0, one log_softmax per step) for the cells' confidence
    logprobs = (req.top_logprobs or 0) if req.logprobs else (0 if req.postprocess else None)
    pieces = runner.stream_pieces(document.image, req.prompt_type, bbox=req.bbox,
                                  temperature=req.sampling_temperature, top_p=req.top_p,
                                  max_new_tokens=req.max_new_tokens, stats=stats, should_stop=should_stop,
                                  question=req.prompt, seed=req.seed, logprobs=logprobs,
                                  wake_interval_s=wake_interval_s)
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
    except BatchFullError:
        # The runner has fewer generation slots than the server (a runner given to create_app
        # with another max_batch_size): it is busy, which is a 429, not a server error.
        raise RequestError(BUSY_MESSAGE, 429, headers={"Retry-After": "1"}) from None
    return _Job(req=req, document=document, pieces=pieces, first=first, first_tokens=first_tokens,
                stats=stats, started=started, load_s=load_s,
                tokenizer=getattr(getattr(runner, "processor", None), "tokenizer", None))


def _stream_lines(job: _Job, release: Callable[[], None]) -> Iterator[bytes]:
    """NDJSON lines, one per text piece (with its tokens' logprobs when asked for), then the
    closing ``done`` line (which carries the statistics and the extra fields the request asked
    for). An error after the first line ends the stream with a last line carrying ``error`` and
    ``done: true``."""
    def line(response: str, done: bool, tokens=(), **extra) -> bytes:
        body = {"model": MODEL_NAME, "created_at": now_iso(), "response": response, "done": done}
        if job.req.logprobs and not done:
            body["logprobs"] = [_token_json(t) for t in tokens]
        return ndjson({**body, **extra})

    text = [job.first]
    pending = list(job.first_tokens)
    tokens = list(job.first_tokens) if job.req.postprocess else []  # the whole answer's, for confidence
    try:
        if job.first:
            yield line(job.first, False, pending)
            pending = []
        try:
            for piece in job.pieces:
                pending.extend(piece.tokens)
                if job.req.postprocess:
                    tokens.extend(piece.tokens)
                if not piece.text:
                    continue
                text.append(piece.text)
                yield line(piece.text, False, pending)
                pending = []
            if job.stopped_by_shutdown():
                yield line("", True, error=SHUTDOWN_MESSAGE, request_id=job.request_id, **job.statistics())
                return
            extra = job.extra_fields("".join(text), tokens)
        except Exception as exc:  # noqa: BLE001 - the client gets it as the stream's last line
            log.exception("generation failed mid-stream")
            yield line("", True, error=f"Generation failed: {clip_for_message(exc)}", request_id=job.request_id)
            return
        if job.req.logprobs and pending:
            extra["logprobs"] = [_token_json(t) for t in pending]
        yield line("", True, **extra)
    finally:
        job.pieces.close()  # cancels generation if the client went away mid-stream
        release()
        job.finish()

