"""The one error type for whatever a client is told went wrong, and the messages the interface
document fixes. Raised by the page service and by every route; the HTTP side turns it into a JSON
error (``api/errors.py``), each route group in its own shape."""
from __future__ import annotations

__all__ = ["RequestError", "MODEL_NAME", "BUSY_MESSAGE", "NOT_LOADED_MESSAGE", "NO_IMAGE_MESSAGE",
           "SHUTDOWN_MESSAGE", "CLIENT_CLOSED_MESSAGE", "CLIENT_CLOSED"]

MODEL_NAME = "dots-ocr"
BUSY_MESSAGE = "Server is busy processing another request"
NOT_LOADED_MESSAGE = "Model not loaded"
NO_IMAGE_MESSAGE = "No image data provided"
SHUTDOWN_MESSAGE = "server shutting down"
CLIENT_CLOSED_MESSAGE = "Client closed the connection"
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first" (only logged)


class RequestError(Exception):
    """An error with an HTTP status and a message for the client. ``field``: the request field at
    fault, when one is (``image``, ``bbox``, ``prompt``, ...: each protocol names it its own way,
    e.g. OpenAI's ``param``); ``code``: a machine-readable kind, when the protocol has one."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None, *,
                 field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers or {}
        self.field = field
        self.code = code

    @classmethod
    def busy(cls) -> "RequestError":
        """429: every generation slot is taken (with ``Retry-After``)."""
        return cls(BUSY_MESSAGE, 429, headers={"Retry-After": "1"})
