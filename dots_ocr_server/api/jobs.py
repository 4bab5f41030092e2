"""The document jobs' routes as a blueprint (``dots_ocr_server.jobs`` does the work):

    POST   /jobs                     a JSON body (``document`` + ``document_format``) or a multipart
                                     upload (``file``), with /ocr's fields and ``pages``: 202
    GET    /jobs                     the jobs, newest first (``limit``, ``before``, ``sha256``)
    GET    /jobs/<id>                status, counts, times, eta, and every page's status
    GET    /jobs/<id>/pages/<n>      one page's status, and its answer once it has finished
    GET    /jobs/<id>/result         the document (JSON), ``?format=markdown`` or ``?format=zip``
                                     (``&chunks=true``: with chunks.jsonl); 409 while the job runs
    GET    /jobs/<id>/events         NDJSON progress events (SSE for ``Accept: text/event-stream``):
                                     ``page`` per page finished, ``status`` on a quiet stream, ``end``
    DELETE /jobs/<id>                cancel a queued or running job (what was done is kept)

The API key, the image policy and the request limits apply as to ``/ocr``; errors are
``{"error": ...}`` JSON (404 for an unknown job).
"""
from __future__ import annotations

import json
from typing import Any, Iterator

from flask import Blueprint, Response, current_app, jsonify, request

from image_utils import clip_for_message

from .errors import RequestError
from .http import check_api_key, json_body, ndjson, streaming_response
from .state import ServerState

bp = Blueprint("jobs", __name__)

DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 200
RESULT_FORMATS = ("json", "markdown", "zip")


def _state() -> ServerState:
    return current_app.extensions["dots_ocr"]


def _manager():
    state = _state()
    check_api_key(state.config)
    return state, state.jobs


def _job_or_404(jobs, job_id: str):
    job = jobs.store.job(job_id) if jobs.exists() else None
    if job is None:
        raise RequestError(f"Unknown job '{clip_for_message(job_id, 80)}'", 404)
    return job


@bp.post("/jobs")
def submit():
    from ..jobs import validate_job_request

    state, jobs = _manager()
    state.refuse_when_shutting_down()
    upload = None
    if request.mimetype == "multipart/form-data":
        file = request.files.get("file")
        if file is None:
            raise RequestError("No document provided: a multipart upload sends it as the field 'file'")
        if "document" in request.form:
            raise RequestError("Send the document as an uploaded 'file' or as 'document', not both")
        data = file.read(state.policy.max_download_bytes + 1)
        if len(data) > state.policy.max_download_bytes:
            raise RequestError(f"Uploaded document too large: more than {state.policy.max_download_bytes} bytes", 413)
        upload = (file.filename or "upload", data)
        req = validate_job_request(None, state.config, form=request.form)
    else:
        req = validate_job_request(json_body(), state.config)
    job = jobs.submit(req, upload)
    from ..jobs.views import links

    response = jsonify({"job_id": job.id, "status": job.status, "pages_total": job.pages_total,
                        "links": links(job.id)})
    response.status_code = 202
    response.headers["Location"] = f"/jobs/{job.id}"
    return response


def _int_arg(name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RequestError(f"Invalid '{name}': {clip_for_message(raw, 40)} is not an integer") from None
    if value < low or (high is not None and value > high):
        raise RequestError(f"Invalid '{name}': must be between {low} and {high}" if high is not None
                           else f"Invalid '{name}': must be at least {low}")
    return value


@bp.get("/jobs")
def list_jobs():
    from ..jobs.views import job_summary

    _state_, jobs = _manager()
    limit = _int_arg("limit", DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT)
    before = _int_arg("before", None, 1, 2**63 - 1)  # a job's sequence number (SQLite's INTEGER)
    sha256 = request.args.get("sha256")
    if not jobs.exists():
        return jsonify({"jobs": [], "next": None})
    rows = jobs.store.list(limit=limit + 1, before=before, sha256=sha256)
    page, more = rows[:limit], len(rows) > limit
    body = {"jobs": [job_summary(job, jobs.store.pages(job.id)) for job in page], "next": None}
    if more:
        query = f"limit={limit}&before={page[-1].seq}" + (f"&sha256={sha256}" if sha256 else "")
        body["next"] = f"/jobs?{query}"
    return jsonify(body)


@bp.get("/jobs/<job_id>")
def job_status(job_id: str):
    from ..jobs.views import job_detail

    _state_, jobs = _manager()
    job = _job_or_404(jobs, job_id)
    return jsonify(job_detail(job, jobs.store.pages(job.id)))


@bp.get("/jobs/<job_id>/pages/<int:page>")
def job_page(job_id: str, page: int):
    from ..jobs.views import page_detail

    _state_, jobs = _manager()
    job = _job_or_404(jobs, job_id)
    row = jobs.store.page(job.id, page)
    if row is None:
        raise RequestError(f"Job {job.id} has no page {page} (its pages: the 'pages_selected' of the job)", 404)
    return jsonify(page_detail(job, row))


@bp.get("/jobs/<job_id>/result")
def job_result(job_id: str):
    from ..jobs.views import document_json, document_zip_bytes, finished, job_document

    _state_, jobs = _manager()
    job = _job_or_404(jobs, job_id)
    fmt = request.args.get("format", "json")
    if fmt not in RESULT_FORMATS:
        raise RequestError(f"Invalid 'format': must be one of {list(RESULT_FORMATS)}")
    keep_headers = request.args.get("keep_headers", "false").lower() in ("1", "true", "yes")
    chunks = request.args.get("chunks", "false").lower() in ("1", "true", "yes")
    pages = jobs.store.pages(job.id)
    if not finished(job, pages):
        done = sum(p.status == "done" for p in pages)
        raise RequestError(f"Job {job.id} has not finished (status {job.status}, {done} of {job.pages_total} "
                           "pages done): its result is ready when it ends", 409)
    document = job_document(job, pages, keep_headers=keep_headers)
    if fmt == "markdown":
        return Response(document.markdown, mimetype="text/markdown", content_type="text/markdown; charset=utf-8")
    if fmt == "zip":
        response = Response(document_zip_bytes(job, pages, document, jobs.figures_dir(job.id), chunks=chunks),
                            mimetype="application/zip")
        response.headers["Content-Disposition"] = f'attachment; filename="{job.id}.zip"'
        return response
    return jsonify(document_json(job, pages, document))


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['event']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode("utf-8")


@bp.get("/jobs/<job_id>/events")
def job_events(job_id: str):
    _state_, jobs = _manager()
    job = _job_or_404(jobs, job_id)
    sse = request.accept_mimetypes.best_match(["application/x-ndjson", "text/event-stream"]) == "text/event-stream"

    def lines() -> Iterator[bytes]:
        for event in jobs.events(job.id):
            yield _sse(event) if sse else ndjson(event)

    return streaming_response(lines(), "text/event-stream" if sse else "application/x-ndjson")


@bp.delete("/jobs/<job_id>")
def cancel_job(job_id: str):
    from ..jobs.views import job_detail

    _state_, jobs = _manager()
    job = _job_or_404(jobs, job_id)
    if not jobs.cancel(job.id):
        raise RequestError(f"Job {job.id} has already finished (status {job.status}): nothing to cancel", 409)
    return jsonify(job_detail(jobs.store.job(job.id), jobs.store.pages(job.id)))
