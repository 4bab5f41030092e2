"""The one exception type image_utils raises for problems a client caused."""
from __future__ import annotations

__all__ = ["ImageInputError"]


class ImageInputError(ValueError):
    """A problem with the request's image that the client caused.

    ``message`` is safe to show to the client (it never contains a stack trace or a path the
    client did not send, other than what it sent itself).  ``status`` is the HTTP status the
    server should answer with: 400 for bad input, 413 when the input is too large.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message

    def __repr__(self) -> str:
        return f"ImageInputError({self.message!r}, status={self.status})"
