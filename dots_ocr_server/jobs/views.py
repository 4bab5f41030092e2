"""What the job routes answer, built from the store's rows: a job's summary and its detail, the
progress events, and the result: the document of docs/DOCUMENT_FORMAT.md (``assemble`` over the
pages' answers, the same call as the client's and the batch job's), with each page's answer and
statistics, as JSON, as Markdown, or as a ZIP with the figures cropped when the pages finished."""
from __future__ import annotations

import datetime as _dt
import io
import zipfile
from pathlib import Path
from typing import Any

from model_runner.prompts import LAYOUT_PROMPT_TYPES

from .store import FINISHED, JobRow, PageRow

__all__ = ["job_summary", "job_detail", "status_event", "page_detail", "page_event", "job_document", "document_json",
           "document_zip_bytes", "links"]

_STATISTICS = ("done_reason", "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
               "eval_count", "eval_duration")


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="milliseconds")


def links(job_id: str) -> dict[str, str]:
    base = f"/jobs/{job_id}"
    return {"self": base, "result": f"{base}/result", "events": f"{base}/events"}


def _eta_s(job: JobRow, pages: list[PageRow]) -> float | None:
    """Seconds until the last page, at the pace of the pages finished so far (None before one)."""
    if job.finished:
        return 0.0
    finished = [p for p in pages if p.status in ("done", "failed") and p.started_at and p.finished_at]
    left = sum(p.status in ("queued", "running") for p in pages)
    if not finished or not job.started_at:
        return None
    pace = (max(p.finished_at for p in finished) - job.started_at) / len(finished)
    return round(pace * left, 1)


def job_summary(job: JobRow, pages: list[PageRow]) -> dict[str, Any]:
    """The job's status, counts and times (a ``GET /jobs`` entry; ``GET /jobs/<id>`` adds the pages)."""
    return {
        "job_id": job.id, "status": job.status, "source": job.source, "sha256": job.sha256,
        "prompt_type": job.options["prompt_type"], "page_count": job.page_count,
        "pages_total": job.pages_total, "pages_done": sum(p.status == "done" for p in pages),
        "pages_failed": sum(p.status == "failed" for p in pages),
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at),
        "eta_s": _eta_s(job, pages), "options": job.options, "pages_selected": [p.page for p in pages],
        **({"error": job.error} if job.error else {}), "links": links(job.id),
    }


def _page_status(page: PageRow) -> dict[str, Any]:
    entry: dict[str, Any] = {"page": page.page, "status": page.status, "attempts": page.attempts}
    if page.error:
        entry["error"] = page.error
    if page.done_reason:
        entry["done_reason"] = page.done_reason
    return entry


def job_detail(job: JobRow, pages: list[PageRow]) -> dict[str, Any]:
    return {**job_summary(job, pages), "pages": [_page_status(page) for page in pages]}


def status_event(job: JobRow, pages: list[PageRow]) -> dict[str, Any]:
    """The keep-alive event of a quiet stream: the counts, and which pages run now."""
    summary = job_summary(job, pages)
    return {"event": "status", "job_id": job.id, "status": job.status,
            "running": [p.page for p in pages if p.status == "running"],
            **{key: summary[key] for key in ("pages_total", "pages_done", "pages_failed", "eta_s")}}


def page_detail(job: JobRow, page: PageRow) -> dict[str, Any]:
    """One page of a job, as soon as it has finished: its entry in ``document.json`` built from
    this page alone (its cells in page pixels, its Markdown, its answer and statistics). Rules that
    look across pages (repeated headers, a paragraph a page break cut) wait for the whole result."""
    document = job_document(job, [page])
    return {"job_id": job.id, **document_json(job, [page], document)["pages"][0]}


def page_event(job: JobRow, page: PageRow, pages: list[PageRow]) -> dict[str, Any]:
    """A progress event: the page that finished, and the job's counts at that moment."""
    summary = job_summary(job, pages)
    return {"event": "page", "job_id": job.id, **_page_status(page),
            **{key: summary[key] for key in ("pages_total", "pages_done", "pages_failed", "eta_s")}}


# -- the result: the document --------------------------------------------------------------------


def _page_input(job: JobRow, page: PageRow):
    """The document's page from a job page's answer (a page with none: no cells)."""
    from ..document import Cell, PageInput
    from ..document.inputs import page_from_answer

    answer = page.result
    if answer is None:
        return None
    if job.options["prompt_type"] in LAYOUT_PROMPT_TYPES:
        return page_from_answer(page.page, answer["width"], answer["height"], answer)
    # the other prompt types answer with text: one text block covering the page
    text = (answer.get("markdown") or answer.get("response") or "").strip()
    cells = (Cell("Text", (0, 0, answer["width"], answer["height"]), text),) if text else ()
    return PageInput(page=page.page, width=answer["width"], height=answer["height"], cells=cells)


def job_document(job: JobRow, pages: list[PageRow], *, keep_headers: bool = False):
    """The ``Document`` of a finished job (``dots_ocr_server.document.assemble``)."""
    from ..document import AssembleOptions, assemble

    inputs = [page_input for page in pages if (page_input := _page_input(job, page)) is not None]
    options = job.options
    metadata = {"model": "dots-ocr", "prompt_type": options["prompt_type"], "dpi": options.get("dpi") or 200,
                "page_count": job.page_count, "pages": [p.page for p in pages]}
    return assemble(inputs, AssembleOptions(keep_headers=keep_headers), source=job.source, metadata=metadata)


def document_json(job: JobRow, pages: list[PageRow], document) -> dict[str, Any]:
    """``document.json`` with the job's status in front and, for every page, its status, attempts,
    answer and statistics (a page that failed without an answer is listed too, with no cells)."""
    data = document.to_json()
    by_number = {page["page"]: page for page in data["pages"]}
    pages_out = []
    for page in pages:
        entry = dict(by_number.get(page.page) or {"page": page.page, "cells": [], "markdown": ""})
        entry.update(_page_status(page))
        if page.result is not None:
            entry["answer"] = page.result.get("response")
            entry.update({key: page.result[key] for key in ("repaired", "spots", "svg") if key in page.result})
            entry["statistics"] = {key: page.result[key] for key in _STATISTICS if key in page.result}
        pages_out.append(entry)
    data["pages"] = pages_out
    return {"job_id": job.id, "status": job.status, "pages_total": job.pages_total,
            "pages_done": sum(p.status == "done" for p in pages),
            "pages_failed": sum(p.status == "failed" for p in pages),
            **data}


def document_zip_bytes(job: JobRow, pages: list[PageRow], document, figures: Path, *, chunks: bool = False) -> bytes:
    """``document.md``, ``document.json`` and ``figures/`` in one ZIP (the figures as they were
    cropped when their pages finished), and ``chunks.jsonl`` with ``chunks``."""
    import json

    from ..document import chunk_document

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for figure in document.figures:
            path = figures / Path(figure.file).name
            if path.is_file():
                archive.writestr(figure.file, path.read_bytes(), compress_type=zipfile.ZIP_STORED)
        if chunks:
            archive.writestr("chunks.jsonl", "".join(json.dumps(chunk.to_json(), ensure_ascii=False) + "\n"
                                                     for chunk in chunk_document(document)))
        archive.writestr("document.md", document.markdown)
        archive.writestr("document.json", json.dumps(document_json(job, pages, document), ensure_ascii=False, indent=2))
    return buffer.getvalue()


def finished(job: JobRow, pages: list[PageRow]) -> bool:
    """The result is ready: the job ended and no page of it still runs."""
    return job.status in FINISHED and not any(p.status == "running" for p in pages)
