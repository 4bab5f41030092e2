"""``JobManager``: documents in, pages through the page service, results kept, a crash lost nothing.

Submission (``submit``): the document is read through the image policy (paths under
``--image-root``, the SSRF guard for URLs, the byte caps), opened and checked before the answer
(an image that decodes; a PDF that opens, is not encrypted, and has at most ``--max-pdf-pages``),
stored under ``<data dir>/documents/<job id>`` unless that would pass ``--max-job-storage``, and
the job and its pages are written in one transaction (``store``).

Running: ``--job-slots`` worker threads (default ``--max-batch-size`` - 1, at least 1) take the
oldest job's next queued page, render it from the stored document (no generation slot held),
then wait for a free generation slot (yielding to requests waiting in the /v1 queue) and run it
through the page service, as the route ``/jobs``, batched with whatever else runs. So jobs use at
most ``--job-slots`` slots and, with ``--max-batch-size`` >= 2, an ``/ocr`` request finds a slot
free; at 1, a job page holds the slot like any request and ``/ocr`` gets its 429 meanwhile.

A page fails for a model error, an answer the repetition guard ended, or a layout that cannot be
read even after repair; it is tried again (``--job-page-retries``, default once: an answer that
looped or would not parse at 0.95 of the page's size, a remedy reported upstream for such pages),
then marked failed with its reason, and the job goes on. The pictures of a finished page are
cropped at once (``<data dir>/jobs/<id>/figures``), so the document can be served after its file
is removed when the job ends.

Stopping: a cancelled job's running page stops at its next decoding step; at shutdown the workers
take no new page, the running one may finish within the grace time, and one stopped by the
shutdown goes back to the queue for the next start (``recover``), which resumes every unfinished job.
Finished jobs older than ``--job-retention`` are deleted with their files.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from image_utils import ImageInputError, decode_image_bytes, is_pdf_bytes, pdf_page_count
from image_utils.loader import load_bytes

from ..document.quality import RETRY_SCALE
from ..errors import RequestError
from .schemas import JobRequest, parse_pages
from .store import FINISHED, JobRow, JobStore, PageRow

log = logging.getLogger("dots_ocr_server")

__all__ = ["JobManager", "JOB_ROUTE", "StorageFull"]

JOB_ROUTE = "/jobs"  # the route label of a job page's generation in /metrics
DB_NAME = "jobs.db"
IDLE_WAIT_S = 1.0  # how long an idle worker waits before looking at the queue again
KEEPALIVE_S = 15.0  # an events stream with nothing to say for this long sends a status event
RETENTION_EVERY_S = 600.0


class StorageFull(RequestError):
    """A new job's document would pass ``--max-job-storage`` (507)."""


def _job_dir(root: Path, job_id: str) -> Path:
    return root / "jobs" / job_id


class JobManager:
    """The jobs of one server (see the module docstring). ``state``: the server's ``ServerState``
    (config, page service, generation slots, shutdown events). Nothing starts until ``start``."""

    def __init__(self, state):
        config = state.config
        self.state = state
        self.root = Path(config.data_dir)
        self.retention_s = config.job_retention_s
        self.max_storage = config.max_job_storage_bytes
        self.page_retries = config.job_page_retries
        self.slots = config.job_slots if config.job_slots is not None else max(1, config.max_batch_size - 1)
        self._store: JobStore | None = None
        self._workers: list[threading.Thread] = []
        self._start_lock = threading.Lock()
        self._changed = threading.Condition()
        self._version = 0
        self._stopping = threading.Event()
        self._running_pages = 0
        self._last_retention = 0.0
        self._submit_lock = threading.Lock()  # storage check + write: one submission at a time

    # -- life ----------------------------------------------------------------------------------

    @property
    def store(self) -> JobStore:
        if self._store is None:
            with self._start_lock:
                if self._store is None:
                    self._store = JobStore(self.root / DB_NAME)
        return self._store

    def exists(self) -> bool:
        """Whether this server has a job database (a list of jobs is empty without one)."""
        return self._store is not None or (self.root / DB_NAME).is_file()

    def start(self) -> None:
        """Open the store, put pages a crash left running back in the queue, start the workers
        (once; each later call does nothing)."""
        with self._start_lock:
            if self._workers:
                return
            store = self._store = self._store or JobStore(self.root / DB_NAME)
            recovered = store.recover()
            if recovered:
                log.warning("jobs: %d page(s) were running when the server stopped; they run again", recovered)
            for index in range(self.slots):
                worker = threading.Thread(target=self._work, name=f"dots-ocr-job-{index + 1}", daemon=True)
                worker.start()
                self._workers.append(worker)
            log.info("jobs: %d worker(s), data in %s", self.slots, self.root)

    def resume_if_any(self) -> None:
        """At server start: start the workers when the data folder holds unfinished jobs."""
        if self.exists() and self.store.unfinished():
            self.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._notify()
        for worker in self._workers:
            worker.join(timeout)

    @property
    def busy(self) -> bool:
        """A page is being run (the shutdown waits for it, within the grace time)."""
        return self._running_pages > 0

    def _notify(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def wait_for_change(self, version: int, timeout: float) -> int:
        """Block until something changed after ``version`` (or ``timeout``); the new version."""
        with self._changed:
            if self._version == version:
                self._changed.wait(timeout)
            return self._version

    @property
    def version(self) -> int:
        return self._version

    # -- submission ----------------------------------------------------------------------------

    def read_document(self, req: JobRequest, upload: tuple[str, bytes] | None) -> tuple[str, bytes]:
        """(the document's name, its bytes), through the image policy."""
        if upload is not None:
            return upload
        if req.document is None or not req.document.strip():
            from .schemas import NO_DOCUMENT_MESSAGE

            raise RequestError(NO_DOCUMENT_MESSAGE)
        try:
            data = load_bytes(req.document, req.document_format, self.state.policy)
        except ImageInputError as exc:
            raise RequestError(exc.message, exc.status, field="document") from None
        name = req.document if req.document_format != "base64" else "document"
        return name[:500], data

    def check_document(self, data: bytes) -> tuple[str, int]:
        """(kind, page count) of a document that opens: 400 (or 413) and no job otherwise."""
        policy = self.state.policy
        try:
            if is_pdf_bytes(data):
                count = pdf_page_count(data)
                if count > policy.max_pdf_pages:
                    raise ImageInputError(f"PDF has {count} pages, more than the limit of {policy.max_pdf_pages} pages",
                                          status=413)
                if count < 1:
                    raise ImageInputError("PDF has no pages")
                return "pdf", count
            decode_image_bytes(data, policy)
            return "image", 1
        except ImageInputError as exc:
            raise RequestError(exc.message, exc.status, field="document") from None

    def submit(self, req: JobRequest, upload: tuple[str, bytes] | None = None) -> JobRow:
        name, data = self.read_document(req, upload)
        kind, page_count = self.check_document(data)
        pages = parse_pages(req.pages, page_count)
        job_id = uuid.uuid4().hex
        documents = self.root / "documents"
        with self._submit_lock:
            self._check_storage(len(data))
            documents.mkdir(parents=True, exist_ok=True)
            path = documents / job_id
            tmp = documents / f".{job_id}.tmp"
            tmp.write_bytes(data)
            tmp.replace(path)
            try:
                job = self.store.create(job_id, source=name, sha256=hashlib.sha256(data).hexdigest(), kind=kind,
                                        page_count=page_count, pages=pages, file=f"documents/{job_id}",
                                        file_bytes=len(data), options=req.options())
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        self.start()
        self._notify()
        return job

    def storage_used(self) -> int:
        """Bytes under the data folder (documents, figures, the database)."""
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def _check_storage(self, new_bytes: int) -> None:
        if self.max_storage is None:
            return
        used = self.storage_used()
        if used + new_bytes > self.max_storage:
            raise StorageFull(f"Not enough job storage: this document ({new_bytes} bytes) would take the data folder "
                              f"past --max-job-storage ({self.max_storage} bytes; {used} in use). Wait for jobs to "
                              "finish and expire (--job-retention), or cancel some.", 507)

    def cancel(self, job_id: str) -> bool:
        cancelled = self.store.cancel(job_id)
        if cancelled:
            job = self.store.job(job_id)
            if job is not None and not self._page_running(job_id):
                self._remove_document(job)
        self._notify()
        return cancelled

    def _page_running(self, job_id: str) -> bool:
        return any(p.status == "running" for p in self.store.pages(job_id))

    # -- the workers ---------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set() and not self.state.shutting_down.is_set():
            if not self.state.model_loaded:
                self._stopping.wait(0.2)
                continue
            self._expire_if_due()
            version = self._version
            claimed = self.store.claim()
            if claimed is None:
                self.wait_for_change(version, IDLE_WAIT_S)
                continue
            job, page = claimed
            self._running_pages += 1
            try:
                self._run_page(job, page)
            except Exception:  # a bug here must not kill the worker; the page is failed
                log.exception("jobs: page %d of job %s failed", page.page, job.id)
                self._finish(job, page.page, "failed", error="internal error (see the server log)")
            finally:
                self._running_pages -= 1
                self._notify()

    def _should_stop(self, job_id: str) -> Callable[[], bool]:
        store, stop_generation = self.store, self.state.stop_generation
        checked = [0.0, False]

        def should_stop() -> bool:  # polled once per decoding step: read the job's status at most every 0.2 s
            if stop_generation.is_set():
                return True
            now = time.monotonic()
            if now - checked[0] > 0.2:
                job = store.job(job_id)
                checked[0], checked[1] = now, job is None or job.status == "cancelled"
            return checked[1]

        return should_stop

    def _run_page(self, job: JobRow, page: PageRow) -> None:
        from ..document.quality import answer_problem, keep_after_retry
        from .pages import page_answer, page_problem, page_request

        data = self._document_bytes(job)
        if data is None:
            self.store.fail_job(job.id, "the stored document is gone")
            return
        request = page_request(job, page.page, data)
        pages = self.state.pages
        try:
            loaded = pages.load(request.source)
        except RequestError as exc:  # a page that does not render (too complex for the render timeout)
            self._finish(job, page.page, "failed", error=exc.message)
            return
        attempt, scale, first = page.attempts, 1.0, None
        while True:
            image = loaded.image if scale == 1.0 else _scaled(loaded.image, scale)
            outcome = self._generate(job, request, loaded, image)
            if outcome is None:  # stopped: the job was cancelled, or the server is shutting down
                stopped = self.store.job(job.id)
                self._finish(job, page.page, "cancelled" if stopped and stopped.status == "cancelled" else "queued")
                return
            result, error = outcome
            answer = None
            if result is not None:
                answer = page_answer(result, loaded.image.size)
                problem = answer_problem(answer)
                if first is not None:  # the answer of a rescaled retry: the one to keep, with a note
                    answer = keep_after_retry(first[0], answer, first[1], scale)
                    problem = answer_problem(answer)
                error = page_problem(answer)
                if error is None:
                    self._finish(job, page.page, "done", result=answer, done_reason=answer["done_reason"],
                                 image=loaded.image)
                    return
                first = first or (answer, problem)
            if attempt > self.page_retries:  # this was the last try: the page fails with its reason
                self._finish(job, page.page, "failed", error=error, result=answer,
                             done_reason=answer["done_reason"] if answer else None, image=loaded.image)
                return
            attempt += 1
            self.store.count_attempt(job.id, page.page)
            # an answer that looped or would not parse: again at 0.95 of the page's size; an error: as it was
            scale = RETRY_SCALE if result is not None else scale
            log.info("jobs: page %d of job %s: %s; trying again%s", page.page, job.id, error,
                     f" at {scale:g} of its size" if scale != 1.0 else "")

    def _generate(self, job: JobRow, request, loaded, image):
        """(PageResult, None), (None, error) for a model error, or None when it was stopped."""
        import dataclasses

        state, stop = self.state, self._should_stop(job.id)
        if not state.lock.acquire_waiting(stop):
            return None
        try:
            run = state.pages.start(request, dataclasses.replace(loaded, image=image), should_stop=stop)
            result = run.collect()
        except RequestError as exc:
            return None, exc.message
        except Exception as exc:  # the model failed on this page: its error, then a retry
            log.exception("jobs: the model failed on page %d of job %s", request.source.page, job.id)
            return None, f"generation failed: {type(exc).__name__}: {exc}"
        finally:
            state.lock.release()
        if result.stats.finish_reason == "cancelled":
            return None
        if result.stats.finish_reason == "error":
            return None, "generation failed"
        return result, None

    def _finish(self, job: JobRow, page: int, status: str, *, result: dict[str, Any] | None = None,
                error: str | None = None, done_reason: str | None = None, image=None) -> None:
        if image is not None and result is not None:
            from .pages import save_figures

            save_figures(_job_dir(self.root, job.id) / "figures", page, result, image)
        self.store.finish_page(job.id, page, status, result=result, error=error, done_reason=done_reason)
        ended = self.store.job(job.id)
        if ended is not None and ended.finished and not self._page_running(job.id):
            self._remove_document(ended)

    def _document_bytes(self, job: JobRow) -> bytes | None:
        if job.file is None:
            return None
        try:
            return (self.root / job.file).read_bytes()
        except OSError:
            return None

    def _remove_document(self, job: JobRow) -> None:
        """The stored document of a finished job (its answers and figures stay)."""
        if job.file is not None:
            (self.root / job.file).unlink(missing_ok=True)
            self.store.set_file(job.id, None)

    # -- retention -----------------------------------------------------------------------------

    def _expire_if_due(self) -> None:
        now = time.time()
        if now - self._last_retention < RETENTION_EVERY_S:
            return
        self._last_retention = now
        self.expire()

    def expire(self, now: float | None = None) -> int:
        """Delete the finished jobs older than the retention, with their files; how many."""
        if self.retention_s is None:
            return 0
        now = time.time() if now is None else now
        expired = self.store.expired(now - self.retention_s)
        for job in expired:
            if job.file is not None:
                (self.root / job.file).unlink(missing_ok=True)
            shutil.rmtree(_job_dir(self.root, job.id), ignore_errors=True)
            self.store.delete(job.id)
        if expired:
            log.info("jobs: %d finished job(s) older than the retention deleted", len(expired))
            self._notify()
        return len(expired)

    # -- reading -------------------------------------------------------------------------------

    def figures_dir(self, job_id: str) -> Path:
        return _job_dir(self.root, job_id) / "figures"

    def events(self, job_id: str, poll_s: float = 1.0, keepalive_s: float = KEEPALIVE_S) -> Iterator[dict[str, Any]]:
        """One event per page finished (those finished before the call first), then the job's end;
        a ``status`` event (the counts, the running pages) after ``keepalive_s`` without one, so that a
        proxy does not close a quiet stream."""
        from .views import job_summary, page_event, status_event

        reported: set[int] = set()
        last_sent = time.monotonic()
        while True:
            version = self.version
            job = self.store.job(job_id)
            if job is None:
                return
            pages = self.store.pages(job_id)
            for page in pages:
                if page.status in FINISHED and page.page not in reported:
                    reported.add(page.page)
                    last_sent = time.monotonic()
                    yield page_event(job, page, pages)
            if job.finished and not any(p.status == "running" for p in pages):
                yield {"event": "end", **job_summary(job, pages)}
                return
            if time.monotonic() - last_sent >= keepalive_s:
                last_sent = time.monotonic()
                yield status_event(job, pages)
            self.wait_for_change(version, poll_s)


def _scaled(image, scale: float):
    from PIL import Image

    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)
