"""``PageService``: load a page, check the request against it, run the model through the runner's
one decoding path, and count every generation, whichever entry point asked.

The stages, each a method, so that an entry point can put its own step between them (the HTTP
routes take a generation slot after ``load`` and before ``start``: a page that is slow to fetch or
to render never holds a slot):

    load(source)                      -> LoadedImage      reading, decoding, rendering (no model)
    start(request, page, ...)         -> PageRun          generation up to its first text piece
    PageRun.pieces() / .collect()     -> pieces / PageResult
    run(request)                      =  load + start + collect (the batch job, the document jobs)
    trace(request, page, ...)         -> TraceResult      /inspect: the answer's attention maps

``start`` reads the answer up to its first text piece before returning, so that a request the
model cannot run (an impossible page size, a full batch) is still a plain error, before any
streamed line. Every failure becomes a ``RequestError`` (with the request field at fault), and
every generation, finished, cancelled or failed, reaches the ``PageObserver`` (the metrics) once.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterator, Protocol

from image_utils import ImageInputError, ImagePolicy, LoadedImage, load_document
from model_runner.batching import BatchFullError
from model_runner.decoding import GenerationInputError, Piece, TokenRecord
from model_runner.generation import BATCHED_WAKE_INTERVAL_S, GenerationHandle, GenerationRequest, PagePrompt

from ..errors import RequestError
from .request import PageRequest, PageSource
from .result import PageResult

log = logging.getLogger("dots_ocr_server")

__all__ = ["PageObserver", "PageRun", "PageService"]


class PageObserver(Protocol):
    """Told once about every generation when it has ended (its stats are final)."""

    def page_finished(self, run: "PageRun") -> None: ...


class PageRun:
    """One page's generation in progress. ``pieces()`` yields the answer (the pieces read by
    ``start`` first); ``collect()`` is a loop over it; ``close()`` (idempotent) stops the
    generation if it still runs and reports it to the observer; ``result(text, tokens)`` is the
    finished page."""

    def __init__(self, service: "PageService", request: PageRequest, page: LoadedImage,
                 handle: GenerationHandle, started: float, load_s: float,
                 on_finish: Callable[["PageRun"], None] | None = None):
        self.request = request
        self.page = page
        self.handle = handle
        self.started = started
        self.load_s = load_s
        self.head: list[Piece] = []
        self.on_finish = on_finish
        self._service = service
        self._rest: Iterator[Piece] = handle.pieces()
        self._closed = False

    @property
    def stats(self):
        return self.handle.stats

    @property
    def first_text(self) -> str:
        return "".join(piece.text for piece in self.head)

    def pieces(self) -> Iterator[Piece]:
        yield from self.head
        yield from self._rest

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.handle.close()
        self._service._finished(self)

    def statistics(self) -> dict[str, Any]:
        """How the generation ended and what it cost so far (``PageResult.statistics``)."""
        return self.result("", []).statistics()

    def result(self, text: str, tokens: list[TokenRecord]) -> PageResult:
        return PageResult(request=self.request, page=self.page, text=text, tokens=tokens, stats=self.stats,
                          started=self.started, load_s=self.load_s)

    def collect(self) -> PageResult:
        """The whole answer (then the run is closed)."""
        parts: list[str] = []
        tokens: list[TokenRecord] = []
        try:
            for piece in self.pieces():
                parts.append(piece.text)
                tokens.extend(piece.tokens)
        finally:
            self.close()
        return self.result("".join(parts), tokens)


class PageService:
    """The page pipeline over one runner and one image policy (see the module docstring)."""

    def __init__(self, runner, policy: ImagePolicy, observer: PageObserver | None = None):
        self.runner = runner
        self.policy = policy
        self.observer = observer

    # -- loading -------------------------------------------------------------------------------

    def load(self, source: PageSource) -> LoadedImage:
        """The page as an RGB image (a PDF page rendered): 400 / 413 ``RequestError`` for what
        cannot be read, decoded or rendered within the policy's limits."""
        try:
            if source.image is not None:
                image = source.image if source.image.mode == "RGB" else source.image.convert("RGB")
                return LoadedImage(image=image)
            if source.data is not None:
                from image_utils import load_bytes_document

                return load_bytes_document(source.data, self.policy, page=source.page, dpi=source.dpi)
            return load_document(source.value, source.transport, self.policy, page=source.page, dpi=source.dpi)
        except ImageInputError as exc:
            raise RequestError(exc.message, exc.status, field="image") from None

    @staticmethod
    def check_bbox(request: PageRequest, page: LoadedImage) -> None:
        if request.bbox is None:
            return
        width, height = page.image.size
        x1, y1, _, _ = request.bbox
        if x1 >= width or y1 >= height:
            raise RequestError(f"Invalid 'bbox': {list(request.bbox)} lies entirely outside the image "
                               f"({width} x {height} pixels)", field="bbox")

    # -- generation ----------------------------------------------------------------------------

    def generation_request(self, request: PageRequest, page: LoadedImage, should_stop=None,
                           wake_interval_s: float = BATCHED_WAKE_INTERVAL_S) -> GenerationRequest:
        """The runner's request for a page request. Per-cell confidence needs the chosen tokens'
        logprobs (k = 0: one log_softmax per step), so layout post-processing asks for them."""
        decoding = request.decoding
        if request.postprocess.layout and decoding.logprobs is None:
            decoding = dataclasses.replace(decoding, logprobs=0)
        prompt = PagePrompt(page.image, request.prompt_type, bbox=request.bbox, question=request.question,
                            messages=request.messages)
        return GenerationRequest(prompt, decoding, max_new_tokens=request.max_new_tokens,
                                 ignore_eos=request.ignore_eos, should_stop=should_stop,
                                 wake_interval_s=wake_interval_s)

    def start(self, request: PageRequest, page: LoadedImage, *, started: float | None = None, load_s: float = 0.0,
              should_stop: Callable[[], bool] | None = None, wake_interval_s: float = BATCHED_WAKE_INTERVAL_S,
              on_finish: Callable[[PageRun], None] | None = None) -> PageRun:
        """Generation for ``page``, read up to its first text piece (see the module docstring).
        ``started``: when the request began (default: now); ``load_s``: what loading took."""
        started = time.perf_counter() if started is None else started
        self.check_bbox(request, page)
        try:
            handle = self.runner.start(self.generation_request(request, page, should_stop, wake_interval_s))
        except GenerationInputError as exc:
            raise RequestError(str(exc), 400, field="prompt") from None
        run = PageRun(self, request, page, handle, started, load_s, on_finish)
        try:
            for piece in run._rest:
                run.head.append(piece)
                if piece.text:
                    break
        except GenerationInputError as exc:
            run.close()
            raise RequestError(str(exc), 400, field="prompt") from None
        except BatchFullError:
            # The runner has fewer generation slots than the server (a runner given to create_app
            # with another max_batch_size): it is busy, which is a 429, not a server error.
            run.close()
            raise RequestError.busy() from None
        except BaseException:
            run.close()
            raise
        return run

    def run(self, request: PageRequest, *, should_stop: Callable[[], bool] | None = None) -> PageResult:
        """One whole page: ``load``, ``start``, ``collect``."""
        started = time.perf_counter()
        page = self.load(request.source)
        load_s = time.perf_counter() - started
        return self.start(request, page, started=started, load_s=load_s, should_stop=should_stop).collect()

    def _finished(self, run: PageRun) -> None:
        """Once per run, when its generation has ended: the observer, then the run's own hook."""
        for hook in (self.observer.page_finished if self.observer is not None else None, run.on_finish):
            if hook is None:
                continue
            try:
                hook(run)
            except Exception:  # bookkeeping must not turn an answer into an error
                log.exception("recording a finished page failed")

    # -- looking inside ------------------------------------------------------------------------

    def trace(self, request: PageRequest, page: LoadedImage, *, text: str | None, max_text_tokens: int,
              should_stop: Callable[[], bool] | None = None, **trace_options: Any):
        """The attention maps of one answer to ``page``: ``text`` (teacher-forced; at most
        ``max_text_tokens`` tokens), or, without it, an answer generated here through the runner
        like any request (it shows in the metrics as the request's route). ``TraceStopped`` when
        ``should_stop`` ended that generation."""
        from model_runner.trace import TraceStopped, trace_answer

        self.check_bbox(request, page)
        runner = self.runner
        generator = runner.generator
        prompt = PagePrompt(page.image, request.prompt_type, bbox=request.bbox, question=request.question)
        try:
            if text is not None:
                count = len(runner.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
                if count > max_text_tokens:
                    raise RequestError(f"Invalid 'text': longer than {max_text_tokens} tokens (the server's "
                                       "--max-new-tokens-limit)", field="text")
                inputs, token_ids = generator.prepare(prompt), None
            else:
                run = self.start(request, page, should_stop=should_stop)
                answer = run.collect()
                if answer.stats.finish_reason == "cancelled":
                    raise TraceStopped("the generation of the answer to trace was stopped")
                token_ids = [t.id for t in answer.tokens]
                while token_ids and token_ids[-1] in generator.eos_ids:
                    token_ids.pop()
                inputs = run.handle.inputs
            return generator.run_on_model_thread(lambda: trace_answer(
                runner.model, runner.processor, inputs, request.prompt_type, token_ids=token_ids, text=text,
                **trace_options))
        except GenerationInputError as exc:
            raise RequestError(str(exc), 400) from None
