"""The two ways a page can go wrong: it alone fails (the run goes on), or the whole run stops."""
from __future__ import annotations

from typing import Optional

__all__ = ["FatalError", "PageError"]


class FatalError(Exception):
    """Stops the whole run (exit code 2): server unreachable, API key refused, server too old."""


class PageError(Exception):
    """One page (or one input) failed; the run goes on. ``status``: the HTTP status, when the
    server answered with an error."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status
