"""The handlers that make every error JSON ``{"error": ...}``; the error type and the fixed
messages live in ``dots_ocr_server/errors.py`` (re-exported here for the routes)."""
from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from ..errors import (BUSY_MESSAGE, CLIENT_CLOSED, CLIENT_CLOSED_MESSAGE, MODEL_NAME, NO_IMAGE_MESSAGE,
                      NOT_LOADED_MESSAGE, SHUTDOWN_MESSAGE, RequestError)

__all__ = ["RequestError", "MODEL_NAME", "BUSY_MESSAGE", "NOT_LOADED_MESSAGE", "NO_IMAGE_MESSAGE",
           "SHUTDOWN_MESSAGE", "CLIENT_CLOSED", "CLIENT_CLOSED_MESSAGE", "error_response", "register_error_handlers"]

log = logging.getLogger("dots_ocr_server")


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

