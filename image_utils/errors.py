"""The one exception type image_utils raises for problems a client caused, and the helper that
makes client input safe to quote in its message."""
from __future__ import annotations

__all__ = ["ImageInputError", "clip_for_message", "MESSAGE_QUOTE_LIMIT"]

#: Default number of characters of client input quoted in an error message.
MESSAGE_QUOTE_LIMIT = 200


def _escaped(ch: str) -> str:
    # Unprintable characters (controls, lone surrogates, separators, format marks) are written as
    # Python escapes: a lone surrogate cannot be encoded as UTF-8, so quoting it raw would make the
    # message itself fail to encode, and raw controls would garble logs.
    return ch if ch.isprintable() else ascii(ch)[1:-1]


def clip_for_message(text, limit: int = MESSAGE_QUOTE_LIMIT) -> str:
    """``text`` (any object, via ``str``) made safe to quote in an error message.

    Unprintable characters, including lone surrogates, become escapes such as ``\\udc80``, so the
    result always encodes as UTF-8 and as JSON. When the escaped text is longer than ``limit``
    characters it is cut there and ends with ``... (N characters in all)``, so a huge input is
    never echoed whole. Only the characters that are kept are looked at.
    """
    if not isinstance(text, str):
        try:
            text = str(text)
        except ValueError:  # an int too long for str() (Python's digit limit)
            return f"<{type(text).__name__} too long to show>"
    parts = []
    used = 0
    for ch in text:  # stops after at most limit + 1 characters: each piece is >= 1 long
        piece = _escaped(ch)
        if used + len(piece) > limit:
            return "".join(parts) + f"... ({len(text)} characters in all)"
        parts.append(piece)
        used += len(piece)
    return "".join(parts)


class ImageInputError(ValueError):
    """A problem with the request's image that the client caused.

    ``message`` is safe to show to the client: it never contains a stack trace or a path the
    client did not send, client input in it is clipped (:func:`clip_for_message`), and it always
    encodes as UTF-8 (a lone surrogate that got in anyway is escaped). ``status`` is the HTTP
    status the server should answer with: 400 for bad input, 413 when the input is over a limit
    (size, pixels, pages, rendering time).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.message = message
        self.status = int(status)

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message

    def __repr__(self) -> str:
        return f"ImageInputError({self.message!r}, status={self.status})"
