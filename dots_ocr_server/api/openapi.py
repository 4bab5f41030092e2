"""``GET /openapi.json``: an OpenAPI 3.1 description of every route, generated from the pydantic
models the server validates requests with (``OCRRequest``, ``ChatCompletionRequest``) and builds
the OpenAI answers with, so the document cannot drift from the code. The few ``/health`` and
``/ocr`` answers that the server writes as plain dicts are described by the small models below.
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

from .openai_schemas import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ErrorResponse, ModelCard,
                             ModelList)
from .schemas import OCRRequest

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"


class HealthResponse(BaseModel):
    """The fields API.md fixes; the server adds more (device, running, queued, ...)."""

    model_config = ConfigDict(extra="allow")
    status: str
    model_loaded: bool


class OCRResponse(BaseModel):
    """API.md's answer; extensions add statistics and what the request asked for."""

    model_config = ConfigDict(extra="allow")
    model: str
    response: str
    prompt_type: str


class OCRError(BaseModel):
    """API.md's error shape (``/ocr``, ``/health``)."""

    error: str


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
            "summary": "OCR one page (API.md)", "security": _BEARER,
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
        "/openapi.json": {"get": {"summary": "This document",
                                  "responses": {"200": {"description": "OpenAPI 3.1",
                                                        "content": {"application/json": {
                                                            "schema": {"type": "object"}}}}}}},
    }


def _with_choices(schemas: dict[str, Any]) -> dict[str, Any]:
    """``/ocr``'s prompt_type and image_format are checked against lists the model cannot hold
    (they come from prompts.json and image_utils); the document names them."""
    props = schemas["OCRRequest"]["properties"]
    props["prompt_type"]["enum"] = list(PROMPT_TYPES)
    props["image_format"]["enum"] = list(IMAGE_FORMATS)
    return schemas


@functools.lru_cache(maxsize=1)
def build_document() -> dict[str, Any]:
    """The OpenAPI document (built once per process)."""
    models = [(m, "validation") for m in (OCRRequest, ChatCompletionRequest)]
    models += [(m, "serialization") for m in (ChatCompletion, ChatCompletionChunk, ModelList, ModelCard, ErrorResponse,
                                              HealthResponse, OCRResponse, OCRError)]
    _, top = models_json_schema(models, ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "dots-ocr-server", "version": "0.1.0",
                 "description": "dots.ocr over HTTP: API.md's /ocr and OpenAI's /v1/chat/completions"},
        "paths": _paths(),
        "components": {"schemas": _with_choices(top["$defs"]),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


@bp.get("/openapi.json")
def openapi_json():
    return copy.deepcopy(build_document())
