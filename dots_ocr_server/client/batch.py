"""Pages in flight: K worker threads, each taking the next page, rendering its upload, sending it,
and writing its outputs. The main thread collects the results in completion order.

A stop (a fatal error, Ctrl-C) lets no new page start, drops answers that arrive afterwards
(those pages stay not-done, so a resumed run redoes them), and waits for pages whose outputs are
being written at that moment, so no half-written temporary file is left behind.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

from dots_ocr_server.document.quality import RETRY_NOTE, RETRY_SCALE, answer_problem, keep_after_retry
from dots_ocr_server.layout import scale_cells
from model_runner.prompts import LAYOUT_PROMPT_TYPES, POSTPROCESS_PROMPT_TYPES

from .errors import PageError
from .http_client import OCRClient
from .inputs import InputFile, Upload, label, prepare_upload, scaled_upload
from .outputs import MARKER_NAME, PageRecord, write_page_outputs

__all__ = ["PageTask", "Progress", "RequestOptions", "RunControl", "build_payload", "process_page", "run_pages"]


@dataclass(frozen=True)
class RequestOptions:
    """What every page's request asks for (from the command line)."""

    prompt_type: str
    dpi: int
    temperature: Optional[float] = None  # None: the server's default for the prompt type
    top_p: Optional[float] = None
    max_new_tokens: Optional[int] = None
    stream: bool = False
    skip_headers_footers: bool = False
    question: Optional[str] = None  # prompt_general's question
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    rescaled_retry: bool = True  # layout types: ask once more at RETRY_SCALE when the answer loops or is no layout


@dataclass(frozen=True)
class PageTask:
    index: int          # the page's place in the run's list of records
    item: InputFile
    page: int           # 1-based
    directory: Path     # OUT/<input>/page_NNNN


def build_payload(options: RequestOptions, upload: Upload) -> dict[str, Any]:
    """The /ocr body: always one image as base64 (a PDF page arrives already rendered, so the
    request carries no ``page``/``dpi``)."""
    payload: dict[str, Any] = {
        "image": upload.image_b64,
        "image_format": "base64",
        "prompt_type": options.prompt_type,
        "stream": options.stream,
    }
    if options.temperature is not None:
        payload["temperature"] = options.temperature
    if options.question is not None:
        payload["prompt"] = options.question
    if options.top_p is not None:
        payload["top_p"] = options.top_p
    if options.max_new_tokens is not None:
        payload["max_new_tokens"] = options.max_new_tokens
    if options.logprobs:
        payload["logprobs"] = True
        if options.top_logprobs:
            payload["top_logprobs"] = options.top_logprobs
    if options.prompt_type in POSTPROCESS_PROMPT_TYPES:  # layout, spots or the SVG, in original pixels
        payload["postprocess"] = True
    if options.prompt_type in LAYOUT_PROMPT_TYPES:
        if options.skip_headers_footers:
            payload["skip_headers_footers"] = True
    return payload


def _complete_result(result: dict[str, Any], prompt_type: str, upload: Upload) -> dict[str, Any]:
    """response.json's content: the server's answer with ``prompt_type`` (a streamed answer lacks
    it) and, for a PDF page, ``page``/``page_count`` (the server saw one image, so the client
    knows them), in the order a server that rendered the PDF itself would give them."""
    head = {key: result[key] for key in ("model", "response") if key in result}
    head["prompt_type"] = result.get("prompt_type", prompt_type)
    if upload.page is not None:
        head["page"], head["page_count"] = upload.page, upload.page_count
    return {**head, **{key: value for key, value in result.items() if key not in head}}


class Progress:
    """The tqdm bar, shared by the main thread (pages done) and the workers (characters streamed
    so far, summed over the pages in flight, shown at most twice a second)."""

    def __init__(self, bar):
        self.bar = bar
        self._lock = threading.Lock()
        self._chars: dict[int, int] = {}
        self._shown = 0.0

    def advance(self, count: int = 1, description: Optional[str] = None) -> None:
        with self._lock:
            if description is not None:
                self.bar.set_description_str(description[-60:], refresh=False)
            self.bar.update(count)

    def text_callback(self, key: int) -> Callable[[int], None]:
        def on_text(chars: int) -> None:
            with self._lock:
                self._chars[key] = chars
                now = time.monotonic()
                if now - self._shown >= 0.5:
                    self._shown = now
                    self.bar.set_postfix_str(f"{sum(self._chars.values())} chars")
        return on_text

    def page_finished(self, key: int) -> None:
        with self._lock:
            if self._chars.pop(key, None) is not None and not self._chars:
                self.bar.set_postfix_str("")


class RunControl:
    """The stop flag, plus a count of pages writing their outputs right now (see the module
    docstring): ``stop()`` waits for those, up to ``wait_s``."""

    def __init__(self):
        self._cond = threading.Condition()
        self._stopped = False
        self._writing = 0

    @property
    def stopped(self) -> bool:
        with self._cond:
            return self._stopped

    def begin_writing(self) -> bool:
        """False once stopped (the page's outputs must not be written); else call end_writing()."""
        with self._cond:
            if self._stopped:
                return False
            self._writing += 1
            return True

    def end_writing(self) -> None:
        with self._cond:
            self._writing -= 1
            self._cond.notify_all()

    def request_stop(self) -> None:
        """No new page starts (a worker calls this on a fatal error, before it is reported)."""
        with self._cond:
            self._stopped = True

    def stop(self, wait_s: float = 30.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.wait_for(lambda: self._writing == 0, timeout=wait_s)


def _retry_rescaled(client: OCRClient, options: RequestOptions, upload: Upload, first: dict[str, Any],
                    problem: str, on_text: Callable[[int], None]) -> dict[str, Any]:
    """The page asked once more with its image scaled by RETRY_SCALE, for an answer that ended in
    the repetition guard or held no layout (``problem``), with its cells mapped back to the page's
    pixels; which answer is kept, and the note that says so, is the document package's rule
    (``keep_after_retry``). A retry that fails (PageError) keeps the first answer."""
    image = upload.page_image()
    scaled, size = scaled_upload(image, RETRY_SCALE)
    try:
        second = client.ocr(build_payload(options, scaled), on_text)
    except PageError as exc:
        note = {"scale": RETRY_SCALE, "problem": problem, "kept": "first", "retry_error": str(exc)}
        return {**first, RETRY_NOTE: note}
    if isinstance(second.get("layout"), list):
        second = {**second, "layout": scale_cells(second["layout"], size, image.size)}
    return keep_after_retry(first, second, problem)


def process_page(client: OCRClient, options: RequestOptions, task: PageTask, progress: Progress,
                 control: RunControl) -> Optional[PageRecord]:
    """One page: upload, request, outputs. PageError / OSError become a failed record; None when
    the run was stopped before the outputs were written."""
    record = PageRecord(input=task.item.label, page=task.page, status="ok", dir=label(task.directory))
    started = time.monotonic()
    try:
        (task.directory / MARKER_NAME).unlink(missing_ok=True)  # with --force: not done until done again
        upload = prepare_upload(task.item, task.page, options.dpi)
        result = client.ocr(build_payload(options, upload), progress.text_callback(task.index))
        problem = answer_problem(result) if options.prompt_type in LAYOUT_PROMPT_TYPES else None
        if problem and options.rescaled_retry:
            result = _retry_rescaled(client, options, upload, result, problem, progress.text_callback(task.index))
            record.retried = True
        result = _complete_result(result, options.prompt_type, upload)
        image = upload.page_image()
        if not control.begin_writing():
            return None
        try:
            write_page_outputs(task.directory, result, options.prompt_type, image)
        finally:
            control.end_writing()
        if "repaired" in result:
            record.repaired = bool(result["repaired"])
    except PageError as exc:
        record.status, record.error = "failed", str(exc)
    except OSError as exc:  # writing the outputs
        record.status, record.error = "failed", f"cannot write the results in {record.dir}: {exc}"
    finally:
        progress.page_finished(task.index)
    record.seconds = round(time.monotonic() - started, 3)
    return record


Task = TypeVar("Task")
Result = TypeVar("Result")


def run_pages(tasks: list[Task], work: Callable[[Task], Optional[Result]], concurrency: int,
              control: RunControl) -> Iterator[tuple[Task, Result]]:
    """Run ``work`` on every task (a page; with ``--jobs``, a document) with ``concurrency`` in
    flight; yield ``(task, result)`` as they finish (a None result, after a stop, is left out).
    An exception from ``work`` (FatalError, or a bug) is raised here. Leaving the loop early
    (exception, Ctrl-C, ``close()``) stops the run (``control.stop()``).

    Written with plain daemon threads rather than concurrent.futures: a ThreadPoolExecutor's
    threads are joined when the interpreter exits, so Ctrl-C would hang until every page in
    flight got its answer (up to --timeout each).
    """
    todo: queue.SimpleQueue[Task] = queue.SimpleQueue()
    for task in tasks:
        todo.put(task)
    # queue.Queue, not SimpleQueue: its blocking get() can be interrupted by Ctrl-C.
    done: queue.Queue[tuple[Task, Union[Optional[Result], BaseException]]] = queue.Queue()

    def worker() -> None:
        while not control.stopped:
            try:
                task = todo.get_nowait()
            except queue.Empty:
                return
            try:
                outcome: Union[Optional[Result], BaseException] = work(task)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                control.request_stop()
                outcome = exc
            done.put((task, outcome))

    for number in range(min(concurrency, len(tasks))):
        threading.Thread(target=worker, name=f"ocr-page-{number + 1}", daemon=True).start()
    try:
        for _ in range(len(tasks)):
            task, outcome = done.get()
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is None:  # only after a stop, which ends this loop first
                continue
            yield task, outcome
    finally:
        control.stop()
