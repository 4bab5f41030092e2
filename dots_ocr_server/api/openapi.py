"""``GET /openapi.json``: an OpenAPI 3.1 description of every JSON route (``/health``, ``/ocr``,
``/v1/...``, ``/inspect``, ``/ui/config``, ``/ui/render``), generated from the pydantic models the
server validates requests with (``OCRRequest``, ``ChatCompletionRequest``, the models built from
their fields for ``/inspect`` and ``/ui/render``) and builds the OpenAI answers with, so the
document cannot drift from the code. The answers that the server writes as plain dicts are
described by the small models below. (``/metrics`` is Prometheus text, ``/ui`` the page's files.)
"""
from __future__ import annotations

import copy
import functools
from typing import Any

from flask import Blueprint
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from image_utils import IMAGE_FORMATS
from model_runner.prompts import PROMPT_TYPES

from .inspect import InspectOptions, PAGE_FIELDS
from .openai_schemas import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ErrorResponse, ModelCard,
                             ModelList)
from .schemas import OCRRequest, page_fields_model
from ..jobs.schemas import JobRequest
from .ui import RENDER_FIELDS

InspectRequest = page_fields_model("InspectRequest", PAGE_FIELDS, InspectOptions)
RenderRequest = page_fields_model("RenderRequest", RENDER_FIELDS)

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"


class HealthResponse(BaseModel):
    """The fields the interface document fixes; the server adds more (device, running, queued, ...)."""

    model_config = ConfigDict(extra="allow")
    status: str
    model_loaded: bool


class OCRResponse(BaseModel):
    """The interface document's answer; extensions add statistics and what the request asked for."""

    model_config = ConfigDict(extra="allow")
    model: str
    response: str
    prompt_type: str


class OCRError(BaseModel):
    """The interface document's error shape (every route but ``/v1``)."""

    error: str


class InspectResponse(BaseModel):
    """``/inspect``'s answer (the api/inspect.py docstring lists every field)."""

    model_config = ConfigDict(extra="allow")
    model: str
    prompt_type: str
    token_count: int
    span: list[int]
    char_span: list[int]
    attention: list[list[float]]
    image_mass: float
    grid: dict[str, Any]


class RenderResponse(BaseModel):
    """``/ui/render``'s answer: the page as the model reads it, as a JPEG data URI."""

    image: str
    width: int
    height: int
    source_kind: str
    page: int
    page_count: int


class JobSubmitted(BaseModel):
    """``POST /jobs``'s 202: the new job and where to follow it."""

    job_id: str
    status: str
    pages_total: int
    links: dict[str, str]


class JobStatus(BaseModel):
    """A job's status (``GET /jobs/<id>`` adds ``pages``: each page's status and attempts)."""

    model_config = ConfigDict(extra="allow")
    job_id: str
    status: str
    pages_total: int
    pages_done: int
    pages_failed: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    eta_s: float | None
    options: dict[str, Any]
    pages_selected: list[int]


class JobPage(BaseModel):
    """``GET /jobs/<id>/pages/<n>``: one page's status, and its answer once it has finished."""

    model_config = ConfigDict(extra="allow")
    job_id: str
    page: int
    status: str


class JobList(BaseModel):
    """``GET /jobs``: newest first; ``next`` is the following page's URL (null on the last)."""

    jobs: list[JobStatus]
    next: str | None


class JobResult(BaseModel):
    """The document (docs/DOCUMENT_FORMAT.md) with the job's status and each page's answer."""

    model_config = ConfigDict(extra="allow")
    job_id: str
    status: str
    pages: list[dict[str, Any]]
    blocks: list[dict[str, Any]]


class UIConfig(BaseModel):
    """``/ui/config``: what the page needs to know about the server."""

    model_config = ConfigDict(extra="allow")
    api_key_required: bool
    max_new_tokens_limit: int


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str, **extra) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}, **extra}


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def _errors(model: type[BaseModel], statuses: dict[int, str]) -> dict[str, Any]:
    out = {}
    for status, text in statuses.items():
        out[str(status)] = _json(model, text, **({"headers": _RETRY_AFTER} if status == 429 else {}))
    return out


_OCR_ERRORS = {400: "invalid request", 401: "missing or wrong API key", 413: "body or image too large",
               429: "every generation slot is busy", 500: "model not loaded, or an internal error"}
_OPENAI_ERRORS = {400: "invalid request", 401: "missing or wrong API key", 413: "body or image too large",
                  429: "every slot busy and the queue full (--max-queue)",
                  500: "model not loaded, or an internal error"}
_BEARER = [{"bearer": []}, {}]  # required only when the server runs with --api-key


def _paths() -> dict[str, Any]:
    return {
        "/health": {"get": {"summary": "Server and model status",
                            "responses": {"200": _json(HealthResponse, "status")}}},
        "/ocr": {"post": {
            "summary": "OCR one page (the dots.ocr API document's route)", "security": _BEARER,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(OCRRequest)}}},
            "responses": {"200": {"description": "the answer; with stream: true, NDJSON lines",
                                  "content": {"application/json": {"schema": _ref(OCRResponse)},
                                              "application/x-ndjson": {"schema": {"type": "string"}}}},
                          **_errors(OCRError, _OCR_ERRORS)}}},
        "/v1/chat/completions": {"post": {
            "summary": "OpenAI chat completion over one page image", "security": _BEARER,
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref(ChatCompletionRequest)}}},
            "responses": {"200": {"description": "a chat.completion; with stream: true, server-sent events of "
                                                 "chat.completion.chunk objects ending with data: [DONE]",
                                  "content": {"application/json": {"schema": _ref(ChatCompletion)},
                                              "text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(ErrorResponse, _OPENAI_ERRORS)}}},
        "/v1/models": {"get": {"summary": "The served model", "security": _BEARER,
                               "responses": {"200": _json(ModelList, "the model list"),
                                             **_errors(ErrorResponse, {401: "missing or wrong API key"})}}},
        "/v1/models/{model}": {"get": {
            "summary": "One model", "security": _BEARER,
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json(ModelCard, "the model"),
                          **_errors(ErrorResponse, {401: "missing or wrong API key", 404: "no such model"})}}},
        "/inspect": {"post": {
            "summary": "Where an answer looked on the page (attention to the image-token grid)", "security": _BEARER,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(InspectRequest)}}},
            "responses": {"200": _json(InspectResponse, "the attention maps"),
                          **_errors(OCRError, {**_OCR_ERRORS, 503: "the server is shutting down"})}}},
        "/ui/config": {"get": {"summary": "Settings the /ui page adapts to", "security": _BEARER,
                               "responses": {"200": _json(UIConfig, "the settings"),
                                             **_errors(OCRError, {401: "missing or wrong API key"})}}},
        "/ui/render": {"post": {
            "summary": "The page exactly as the server reads it, as a JPEG", "security": _BEARER,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(RenderRequest)}}},
            "responses": {"200": _json(RenderResponse, "the page"),
                          **_errors(OCRError, {400: "invalid request", 401: "missing or wrong API key",
                                               413: "body or image too large", 500: "an internal error"})}}},
        **_job_paths(),
        "/openapi.json": {"get": {"summary": "This document",
                                  "responses": {"200": {"description": "OpenAPI 3.1",
                                                        "content": {"application/json": {
                                                            "schema": {"type": "object"}}}}}}},
    }


_JOB_ID = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
_JOB_ERRORS = {401: "missing or wrong API key", 404: "no such job"}


def _job_paths() -> dict[str, Any]:
    """The document jobs' routes (api/jobs.py; absent from the server with --no-jobs)."""
    body = {"required": True, "content": {
        "application/json": {"schema": _ref(JobRequest)},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary", "description": "the document (PDF or image)"}},
            "additionalProperties": {"type": "string", "description": "the JSON body's other fields, as text"}}}}}
    return {
        "/jobs": {
            "post": {"summary": "Submit a document (a PDF or an image) as a job", "security": _BEARER,
                     "requestBody": body,
                     "responses": {"202": _json(JobSubmitted, "the job, queued"),
                                   **_errors(OCRError, {400: "invalid request or document", 401: "missing or wrong "
                                                        "API key", 413: "document too large or too many pages",
                                                        503: "the server is shutting down",
                                                        507: "past --max-job-storage"})}},
            "get": {"summary": "The jobs, newest first", "security": _BEARER,
                    "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                                "maximum": 200}},
                                   {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                                   {"name": "sha256", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": _json(JobList, "one page of jobs"),
                                  **_errors(OCRError, {400: "invalid query", 401: "missing or wrong API key"})}}},
        "/jobs/{job_id}": {
            "get": {"summary": "A job's status and its pages", "security": _BEARER, "parameters": _JOB_ID,
                    "responses": {"200": _json(JobStatus, "the job"), **_errors(OCRError, _JOB_ERRORS)}},
            "delete": {"summary": "Cancel a queued or running job (what was done is kept)", "security": _BEARER,
                       "parameters": _JOB_ID,
                       "responses": {"200": _json(JobStatus, "the job, cancelled"),
                                     **_errors(OCRError, {**_JOB_ERRORS, 409: "the job has already finished"})}}},
        "/jobs/{job_id}/pages/{page}": {"get": {
            "summary": "One page of a job: its status, and its answer once it has finished", "security": _BEARER,
            "parameters": _JOB_ID + [{"name": "page", "in": "path", "required": True,
                                      "schema": {"type": "integer", "minimum": 0}}],
            "responses": {"200": _json(JobPage, "the page"),
                          **_errors(OCRError, {**_JOB_ERRORS, 404: "no such job, or no such page in it"})}}},
        "/jobs/{job_id}/result": {"get": {
            "summary": "The whole document: JSON, Markdown (?format=markdown) or a ZIP (?format=zip)",
            "security": _BEARER,
            "parameters": _JOB_ID + [{"name": "format", "in": "query",
                                      "schema": {"type": "string", "enum": ["json", "markdown", "zip"]}},
                                     {"name": "keep_headers", "in": "query", "schema": {"type": "boolean"}},
                                     {"name": "chunks", "in": "query", "schema": {"type": "boolean"}}],
            "responses": {"200": {"description": "the document",
                                  "content": {"application/json": {"schema": _ref(JobResult)},
                                              "text/markdown": {"schema": {"type": "string"}},
                                              "application/zip": {"schema": {"type": "string", "format": "binary"}}}},
                          **_errors(OCRError, {**_JOB_ERRORS, 400: "invalid format",
                                               409: "the job has not finished"})}}},
        "/jobs/{job_id}/events": {"get": {
            "summary": "Progress: one event per page finished, a status event on a quiet stream, then the end "
                       "(NDJSON, or SSE)", "security": _BEARER,
            "parameters": _JOB_ID,
            "responses": {"200": {"description": "the events",
                                  "content": {"application/x-ndjson": {"schema": {"type": "string"}},
                                              "text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(OCRError, _JOB_ERRORS)}}},
    }


def _with_choices(schemas: dict[str, Any]) -> dict[str, Any]:
    """prompt_type and image_format are checked against lists the model cannot hold (they come
    from prompts.json and image_utils); the document names them."""
    for name in ("OCRRequest", "InspectRequest", "RenderRequest", "JobRequest"):
        props = schemas[name]["properties"]
        if "prompt_type" in props:
            props["prompt_type"]["enum"] = list(PROMPT_TYPES)
        props["image_format" if "image_format" in props else "document_format"]["enum"] = list(IMAGE_FORMATS)
    return schemas


def _version() -> str:
    """The installed distribution's version (pyproject.toml's)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dots-ocr-server")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


@functools.lru_cache(maxsize=1)
def build_document() -> dict[str, Any]:
    """The OpenAPI document (built once per process)."""
    models = [(m, "validation") for m in (OCRRequest, ChatCompletionRequest, InspectRequest, RenderRequest,
                                          JobRequest)]
    models += [(m, "serialization") for m in (ChatCompletion, ChatCompletionChunk, ModelList, ModelCard, ErrorResponse,
                                              HealthResponse, OCRResponse, OCRError, InspectResponse, RenderResponse,
                                              UIConfig, JobSubmitted, JobStatus, JobPage, JobList, JobResult)]
    _, top = models_json_schema(models, ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "dots-ocr-server", "version": _version(),
                 "description": "dots.ocr over HTTP: the interface document's /ocr, OpenAI's /v1/chat/completions, "
                                "and the routes for looking inside the model"},
        "paths": _paths(),
        "components": {"schemas": _with_choices(top["$defs"]),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


@bp.get("/openapi.json")
def openapi_json():
    return copy.deepcopy(build_document())
