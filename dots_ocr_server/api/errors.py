"""Errors: the messages API.md fixes, ``RequestError``, and the handlers that make every error JSON."""
from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("dots_ocr_server")

MODEL_NAME = "dots-ocr"
BUSY_MESSAGE = "Server is busy processing another request"
NOT_LOADED_MESSAGE = "Model not loaded"
NO_IMAGE_MESSAGE = "No image data provided"
SHUTDOWN_MESSAGE = "server shutting down"
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first" (only logged)


class RequestError(Exception):
    """An error with an HTTP status and a message for the client."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers or {}


def error_response(message: str, status: int):
    response = jsonify({"error": message})
    response.status_code = status
    return response


def register_error_handlers(app: Flask) -> None:
    """Every error is JSON ``{"error": ...}``, 404/405/413 and unexpected ones included."""

    @app.errorhandler(RequestError)
    def requesterror_response(exc: RequestError):
        response = error_response(exc.message, exc.status)
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(HTTPException)
    def httperror_response(exc: HTTPException):
        messages = {404: "Not found", 405: "Method not allowed",
                    413: "Request body too large (limit: --max-body-mb)"}
        response = error_response(messages.get(exc.code, exc.description or exc.name), exc.code or 500)
        if exc.code == 405 and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(f"Internal server error: {type(exc).__name__}", 500)

