"""Request ids and logs.

* An incoming ``X-Request-Id`` (1-128 characters of ``A-Z a-z 0-9 . _ : -``) is kept, any other
  value or none gets a fresh one (32 hex digits); the response always carries it back.
* Log lines written on the request's thread while it runs (its stream included) carry it: the
  ``RequestIdFilter`` on the server's handler adds ``request_id`` to each record ("-" outside
  a request). JSON error bodies get ``"request_id"`` after ``"error"``.
* Each request gets one access line (logger ``dots_ocr_server.access``) when its response is
  closed, so a stream's line comes at its end: method, path, status, duration, and for /ocr the
  tokens and done_reason.
* ``--log-format json``: one JSON object per line (``JsonFormatter``).

The request's scope lives in a ``ContextVar``: Flask runs a request, and waitress iterates its
streamed body, on one request thread, so the value set when the request starts is still there
while its stream runs; it is cleared when the response is closed. Work done for the request on
other threads (the prepare pool, the decoding loop) runs in a copy of its context
(model_runner.generation), so those log lines carry the id too.
"""
from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, request

HEADER = "X-Request-Id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
access_log = logging.getLogger("dots_ocr_server.access")


@dataclass
class RequestScope:
    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    job: dict[str, Any] = field(default_factory=dict)  # the /ocr statistics, once generation ended

    def note_job(self, statistics: dict[str, Any]) -> None:
        self.job = statistics


_scope: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar("dots_ocr_request", default=None)


def current_scope() -> RequestScope | None:
    return _scope.get()


def current_request_id() -> str | None:
    scope = _scope.get()
    return scope.request_id if scope is not None else None


def request_id_from(header: str | None) -> str:
    """The client's id when it is a sane one, else a new one."""
    if header and _VALID_ID.match(header):
        return header
    return uuid.uuid4().hex


def access_fields(scope: RequestScope) -> dict[str, Any]:
    fields: dict[str, Any] = {"method": scope.method, "path": scope.path, "status": scope.status,
                              "duration_ms": round((time.perf_counter() - scope.started) * 1000, 1)}
    for name in ("prompt_eval_count", "eval_count", "done_reason"):
        if name in scope.job:
            fields[name] = scope.job[name]
    return fields


def install(app: Flask) -> None:
    @app.before_request
    def begin():
        _scope.set(RequestScope(request_id_from(request.headers.get(HEADER)), request.method, request.path))

    @app.after_request
    def tag(response):
        scope = _scope.get()
        if scope is None:
            return response
        scope.status = response.status_code
        response.headers[HEADER] = scope.request_id
        if response.status_code >= 400 and response.is_json and not response.is_streamed:
            body = response.get_json(silent=True)
            if isinstance(body, dict) and "error" in body:
                response.set_data(json.dumps({**body, "request_id": scope.request_id}, ensure_ascii=False))
        response.call_on_close(lambda: _close(scope))
        return response


def _close(scope: RequestScope) -> None:
    fields = access_fields(scope)
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    # the line is written with the request's id even if this runs after the scope was cleared
    token = _scope.set(scope)
    try:
        access_log.info("%s", text, extra={"access": fields})
    finally:
        _scope.reset(token)
        _scope.set(None)


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the current request's id, or "-")."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id, the access fields of
    an access line, and the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or current_request_id(),
        }
        entry.update(getattr(record, "access", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> logging.Handler:
    """The root handler of ``server.py``: text (with the request id) or JSON lines."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return handler
