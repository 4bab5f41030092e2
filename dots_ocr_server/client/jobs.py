"""``--jobs``: every input (a PDF or an image) becomes one document job on the server instead of
one ``/ocr`` request per page.

Per input, in input order, ``--concurrency`` inputs at a time:

1. **Plan**: an input whose selected pages (``--pages``, default all) all have their
   ``response.json`` is skipped, as without ``--jobs`` (``--force`` runs it again).
2. **Find or submit**: the file's SHA-256 is looked up on the server (``GET /jobs?sha256=``). The
   job recorded in ``OUT/<input>/job.json`` by an earlier run is re-attached when the server
   still lists it under that hash with the same prompt type and the run asks for the same options
   (as recorded there: the fields this client sent, ``--pages`` as typed), and it is queued,
   running, or done and not yet downloaded (a done job whose failed pages were already reported
   is not: a new job tries them again). Otherwise, or with
   ``--force``, the file is uploaded (multipart: the server need not see the client's files) and
   the new job is recorded at once, so a client stopped at any moment finds it again.
3. **Follow**: a tqdm bar per document, fed by the job's events (pages done and failed of
   ``pages_total``), one line per document below an overall bar of documents.
4. **Download** the result as a ZIP and write it into ``OUT/<input>/`` (:mod:`.job_results`).

Jobs are submitted in input order (the server runs them in submission order). A stop (Ctrl-C, a
fatal error) leaves the jobs running on the server; running the same command again re-attaches.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import queue
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from dots_ocr_server.document.page_ranges import parse_page_ranges
from dots_ocr_server.document.writer import write_bytes_atomic

from .batch import RunControl, run_pages
from .errors import FatalError, PageError
from .http_client import OCRClient
from .inputs import InputFile, label
from .job_results import read_result, write_result
from .jobs_api import JobsAPI
from .outputs import MARKER_NAME, PageRecord, is_done, page_dir

__all__ = ["JOB_RECORD_NAME", "JobOptions", "JobTask", "JobsRun", "plan_jobs", "run_jobs", "select_pages"]

JOB_RECORD_NAME = "job.json"  # OUT/<input>/job.json: the job of the input, for a restart


@dataclass(frozen=True)
class JobOptions:
    """What every job asks for (from the command line); None: the server's default."""

    prompt_type: str
    dpi: int
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_new_tokens: Optional[int] = None
    prompt: Optional[str] = None  # prompt_general's question
    pages: Optional[str] = None   # "1-3,7"; None: every page
    keep_headers: bool = False    # of the result (document.md), not of the job
    chunks: bool = False          # of the result too: chunks.jsonl beside the document

    def fields(self) -> dict[str, Any]:
        """The job's fields for ``POST /jobs`` (those set), also what a restart compares."""
        values = {"prompt_type": self.prompt_type, "dpi": self.dpi, "temperature": self.temperature,
                  "top_p": self.top_p, "max_new_tokens": self.max_new_tokens, "prompt": self.prompt,
                  "pages": self.pages}
        return {name: value for name, value in values.items() if value is not None}


def select_pages(spec: Optional[str], page_count: int) -> list[int]:
    """``"1-3,7"`` -> [1, 2, 3, 7] (sorted, each once) within ``page_count``; None: every page.
    PageError for a selection that is malformed or past the document's pages (the server's rule)."""
    try:
        return parse_page_ranges(spec, page_count)
    except ValueError as exc:
        raise PageError(f"--pages: {exc}") from None


@dataclass(frozen=True)
class JobTask:
    order: int          # the input's place among the tasks (submission order)
    index: int          # its place in the run's list of inputs
    item: InputFile
    pages: tuple[int, ...]

    def folder(self, out: Path) -> Path:
        return out / self.item.name


def plan_jobs(items: list[InputFile], out: Path, spec: Optional[str],
              force: bool) -> tuple[list[Optional[list[PageRecord]]], list[JobTask]]:
    """One slot per input, in input order: its records now for an unusable input (failed) and one
    complete already (skipped), None for those to run, which become tasks."""
    slots: list[Optional[list[PageRecord]]] = []
    tasks: list[JobTask] = []
    for item in items:
        if item.kind == "invalid":
            slots.append([PageRecord(input=item.label, page=None, status="failed", error=item.error)])
            continue
        try:
            pages = select_pages(spec, item.page_count)
        except PageError as exc:
            slots.append([PageRecord(input=item.label, page=None, status="failed", error=f"{item.label}: {exc}")])
            continue
        directories = [page_dir(out, item.name, page) for page in pages]
        if not force and all(is_done(directory) for directory in directories):
            slots.append([PageRecord(input=item.label, page=page, status="skipped", dir=label(directory))
                          for page, directory in zip(pages, directories)])
            continue
        tasks.append(JobTask(order=len(tasks), index=len(slots), item=item, pages=tuple(pages)))
        slots.append(None)
    return slots, tasks


# -- the local record of an input's job -------------------------------------------------------


def read_record(folder: Path) -> Optional[dict[str, Any]]:
    """``job.json`` of an earlier run, or None (missing or unreadable: as if there were none)."""
    try:
        record = json.loads((folder / JOB_RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(folder: Path, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(folder / JOB_RECORD_NAME, (json.dumps(record, indent=2) + "\n").encode("utf-8"))


def reusable(summary: dict[str, Any], record: dict[str, Any], fields: dict[str, Any]) -> bool:
    """Whether the recorded job (``summary``: the server's) can be re-attached (module docstring)."""
    if summary.get("prompt_type") != fields["prompt_type"]:
        return False
    status = summary.get("status")
    if status in ("queued", "running"):
        return True
    return status == "done" and not (summary.get("pages_failed") and record.get("downloaded"))


def find_job(api: JobsAPI, record: Optional[dict[str, Any]], sha256: str,
             fields: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The summary of the job to re-attach, or None (see the module docstring)."""
    if record is None or record.get("sha256") != sha256 or record.get("options") != fields:
        return None
    for summary in api.by_hash(sha256):  # newest first
        if summary.get("job_id") == record.get("job_id"):
            return summary if reusable(summary, record, fields) else None
    return None


# -- progress -----------------------------------------------------------------------------------


class JobBars:
    """The overall bar (documents finished, position 0) and one bar per document being followed,
    on lines 1..K (K = documents followed at once), each gone when its document is."""

    def __init__(self, total: int, slots: int, disable: bool):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.disable = disable
        self.overall = tqdm(total=total, unit="doc", desc="documents", position=0, disable=disable, leave=True,
                            file=sys.stderr, dynamic_ncols=True)
        self._lines: queue.SimpleQueue[int] = queue.SimpleQueue()
        for line in range(1, slots + 1):
            self._lines.put(line)

    @contextmanager
    def document(self, name: str, total: Optional[int]) -> Iterator[Callable[[dict[str, Any]], None]]:
        """A bar for one document of ``total`` pages; yields the function that takes the job's
        events or summaries."""
        line = self._lines.get()
        bar = self._tqdm(total=total, unit="page", desc=name[-40:], position=line, leave=False, disable=self.disable,
                         file=sys.stderr, dynamic_ncols=True)

        def show(event: dict[str, Any]) -> None:
            total, done, failed = (event.get(key) for key in ("pages_total", "pages_done", "pages_failed"))
            if isinstance(total, int):
                bar.total = total
            if isinstance(done, int) and isinstance(failed, int):
                bar.n = done + failed
                bar.set_postfix_str(f"{failed} failed" if failed else "", refresh=False)
            bar.refresh()

        try:
            yield show
        finally:
            bar.close()
            self._lines.put(line)

    def close(self) -> None:
        self.overall.close()


# -- one input ----------------------------------------------------------------------------------


@dataclass
class JobOutcome:
    """What became of one input: its page records, its document, and its job."""

    records: list[PageRecord]
    job: Optional[dict[str, Any]] = None  # {"input", "job_id", "status", "reattached"}
    document_written: bool = False
    document_error: Optional[str] = None


class JobWorker:
    """Runs one input as a job (steps 2 to 4 of the module docstring); called by the worker
    threads of :func:`.batch.run_pages`."""

    def __init__(self, api: JobsAPI, options: JobOptions, out: Path, *, force: bool, control: RunControl,
                 bars: JobBars, say: Callable[[str], None]):
        self.api, self.options, self.out, self.force = api, options, out, force
        self.control, self.bars, self.say = control, bars, say
        self.fields = options.fields()
        self.following: set[str] = set()  # jobs submitted or re-attached, not yet downloaded
        self._lock = threading.Lock()
        self._turn = threading.Condition()
        self._next = 0  # the order of the next task allowed to submit

    @contextmanager
    def _in_turn(self, order: int) -> Iterator[None]:
        """Submissions in input order: task ``order`` waits for those before it to have submitted."""
        with self._turn:
            while self._next != order and not self.control.stopped:
                self._turn.wait(0.2)
        try:
            yield
        finally:
            with self._turn:
                self._next = max(self._next, order + 1)
                self._turn.notify_all()

    def __call__(self, task: JobTask) -> Optional[JobOutcome]:
        item = task.item
        try:
            with self._in_turn(task.order):
                if self.control.stopped:
                    return None
                summary, record, reattached = self._find_or_submit(task)
            return self._follow_and_write(task, summary, record, reattached)
        except PageError as exc:
            error = str(exc)
        except OSError as exc:  # the input cannot be read, or its job.json not written
            error = f"cannot read the file or record its job ({exc})"
        return JobOutcome(records=[PageRecord(input=item.label, page=None, status="failed",
                                              error=f"{item.label}: {error}")])

    def _follow_and_write(self, task: JobTask, summary: dict[str, Any], record: dict[str, Any],
                          reattached: bool) -> Optional[JobOutcome]:
        """Steps 3 and 4: the job followed to its end, its result written; None when stopped."""
        item, job_id = task.item, summary["job_id"]
        with self._lock:
            self.following.add(job_id)
        try:
            with self.bars.document(item.label, summary.get("pages_total")) as show:
                show(summary)
                end = self.api.follow(job_id, show)
            result = read_result(self.api.result_zip(job_id, self.options.keep_headers, self.options.chunks))
        except PageError:  # gone from the server, or a result that cannot be read: not followed any more
            with self._lock:
                self.following.discard(job_id)
            raise
        written = write_result(result, item, self.out, prompt_type=self.options.prompt_type, dpi=self.options.dpi,
                               control=self.control)
        if written is None:  # stopped while writing: the rest is written when run again
            return None
        write_record(task.folder(self.out), {**record, "downloaded": True})
        with self._lock:
            self.following.discard(job_id)
        job = {"input": item.label, "job_id": job_id, "status": end.get("status"), "reattached": reattached}
        return JobOutcome(records=written.records, job=job, document_written=written.document_written,
                          document_error=written.document_error)

    def _find_or_submit(self, task: JobTask) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """(the job's summary, its record, whether it was re-attached)."""
        item, folder = task.item, task.folder(self.out)
        data = item.path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        record = None if self.force else read_record(folder)
        summary = find_job(self.api, record, sha256, self.fields)
        if summary is not None and record is not None:
            finished = (summary.get("pages_done") or 0) + (summary.get("pages_failed") or 0)
            self.say(f"job {summary['job_id']}: re-attached {item.label} ({summary.get('status')}, "
                     f"{finished} of {summary.get('pages_total')} pages finished)")
            return summary, record, True
        if self.force:  # not done until this job's result is written
            for page in task.pages:
                (page_dir(self.out, item.name, page) / MARKER_NAME).unlink(missing_ok=True)
        summary = self.api.submit(item.path.name, data, self.fields)
        record = {"job_id": summary["job_id"], "server": self.api.client.server, "sha256": sha256,
                  "options": self.fields, "input": item.label,
                  "submitted_at": _dt.datetime.now().isoformat(timespec="seconds"), "downloaded": False}
        write_record(folder, record)
        self.say(f"job {summary['job_id']}: submitted {item.label} ({summary.get('pages_total')} "
                 f"page{'s' if summary.get('pages_total') != 1 else ''})")
        return summary, record, False


# -- the run ------------------------------------------------------------------------------------


@dataclass
class JobsRun:
    """A ``--jobs`` run's outcome, for the summary."""

    slots: list[Optional[list[PageRecord]]]
    jobs: list[dict[str, Any]] = field(default_factory=list)
    documents_written: int = 0
    documents_failed: list[dict[str, str]] = field(default_factory=list)
    concurrency: Optional[int] = None
    fatal: Optional[str] = None
    interrupted: bool = False

    @property
    def records(self) -> list[PageRecord]:
        """The records of the inputs that finished, in input order."""
        return [record for slot in self.slots if slot is not None for record in slot]

    def documents(self) -> dict[str, Any]:
        return {"written": self.documents_written, "failed": self.documents_failed}

    def add(self, task: JobTask, outcome: JobOutcome) -> None:
        self.slots[task.index] = outcome.records
        if outcome.job is not None:
            self.jobs.append(outcome.job)
        self.documents_written += outcome.document_written
        if outcome.document_error:
            self.documents_failed.append({"input": task.item.label, "error": outcome.document_error})


def run_jobs(client: OCRClient, items: list[InputFile], out: Path, options: JobOptions, *,
             concurrency: Optional[int], force: bool, progress: bool, say: Callable[[str], None]) -> JobsRun:
    """The ``--jobs`` run over ``items`` (see the module docstring)."""
    slots, tasks = plan_jobs(items, out, options.pages, force)
    for item, slot in zip(items, slots):
        if item.kind != "invalid" and slot and slot[0].status == "failed":  # (invalid ones are told already)
            say(f"FAILED {slot[0].error}")
    run = JobsRun(slots=slots)
    api = JobsAPI(client, wait_s=max(client.retry_wait, 0.5))
    control = RunControl()
    bars: Optional[JobBars] = None
    worker: Optional[JobWorker] = None
    try:
        if tasks:
            api.check()
            run.concurrency = concurrency or client.max_batch_size()
            bars = JobBars(len(tasks), min(run.concurrency, len(tasks)), disable=not progress)
            worker = JobWorker(api, options, out, force=force, control=control, bars=bars, say=say)
            for task, outcome in run_pages(tasks, worker, run.concurrency, control):
                run.add(task, outcome)
                _report(task, outcome, say)
                bars.overall.update()
    except FatalError as exc:
        run.fatal = str(exc)
    except KeyboardInterrupt:
        run.interrupted = True
    finally:
        control.stop()
        if bars is not None:
            bars.close()
    if worker is not None and worker.following and (run.fatal or run.interrupted):
        say(f"{len(worker.following)} job(s) keep running on the server ({', '.join(sorted(worker.following))}); "
            "run the same command again to re-attach")
    return run


def _report(task: JobTask, outcome: JobOutcome, say: Callable[[str], None]) -> None:
    for record in outcome.records:
        if record.status == "failed":
            where = f"{task.item.label} page {record.page}: " if record.page is not None else ""
            say(f"FAILED {where}{record.error}")
    failed = [record.page for record in outcome.records if record.status == "failed" and record.page is not None]
    if outcome.job is not None and failed:
        say(f"document of {task.item.label} not written: {len(failed)} page(s) failed (run again to try them "
            "in a new job)")
