"""Reading the raw bytes of a request's image from a local path or base64 / data-URI text.

(URLs live in :mod:`image_utils.url_fetch`.)

Path rules:

- Relative paths are resolved against the server's working directory (also when
  ``policy.image_root`` is set: the root confines paths, it does not move them). ``~`` is not
  expanded.
- With ``image_root`` set, the fully resolved path (``os.path.realpath``: every symlink followed)
  must lie inside the resolved root; this is checked before the file's existence is reported, so a
  client cannot probe for files outside the root.
- The file must be a regular file (not a directory, FIFO or device) and readable; it is opened
  with ``O_NOFOLLOW`` and re-checked with ``fstat`` on the open descriptor, so swapping the file for
  a symlink or FIFO after the checks does not help an attacker.
- At most ``policy.max_download_bytes`` are read (413 beyond that).
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from typing import Iterable, Iterator

from .errors import ImageInputError, clip_for_message
from .policy import ImagePolicy

__all__ = ["read_path", "decode_base64", "is_data_uri", "too_large_error", "read_capped",
           "reject_lone_surrogates"]

_DATA_URI_PREFIXES = ("data:image/", "data:application/pdf")
_WHITESPACE = re.compile(r"\s+")
_CHUNK = 1 << 20


def too_large_error(limit: int, what: str = "Image data") -> ImageInputError:
    return ImageInputError(f"{what} too large: exceeds the limit of {limit} bytes", status=413)


def read_capped(chunks: Iterable[bytes], limit: int, what: str) -> bytes:
    """Join ``chunks`` (a file's or a download's), failing with 413 as soon as more than ``limit``
    bytes have come, so an oversized input is never held in memory whole."""
    parts = []
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise too_large_error(limit, what)
        parts.append(chunk)
    return b"".join(parts)


def reject_lone_surrogates(value: str, what: str) -> None:
    """Raise ImageInputError (400) when ``value`` holds a lone surrogate (``"\\ud800"``).

    JSON may carry one as an escape, but it is not a character: it cannot be encoded as UTF-8, so
    it can neither name a file nor appear in a URL. (Python would map ``\\udc80``..``\\udcff``
    to raw bytes of a file name; a client cannot mean that through JSON, so those are refused
    too.)"""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = clip_for_message(value[exc.start:exc.start + 1])
        raise ImageInputError(
            f"{what} is not valid Unicode text: it contains a lone surrogate ({bad}) at position {exc.start}"
        ) from None


def is_data_uri(value: str) -> bool:
    """True for a ``data:image/...`` or ``data:application/pdf...`` URI (case-insensitive)."""
    head = value[:32].lstrip().lower()
    return head.startswith(_DATA_URI_PREFIXES)


def _resolve(value: str, policy: ImagePolicy) -> str:
    if not value.strip():
        raise ImageInputError("No image data provided")
    if "\x00" in value:
        raise ImageInputError("Image path contains a NUL character")
    reject_lone_surrogates(value, "Image path")
    if policy.image_root:
        root = os.path.realpath(policy.image_root)
        real = os.path.realpath(os.path.abspath(value))
        if real != root and os.path.commonpath([root, real]) != root:
            raise ImageInputError("Image path is outside the allowed image root")
        return real
    return os.path.realpath(os.path.abspath(value))


def _file_chunks(fd: int, shown: str) -> Iterator[bytes]:
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except OSError:
            raise ImageInputError(f"Image file is not readable: {shown}") from None
        if not chunk:
            return
        yield chunk


def read_path(value: str, policy: ImagePolicy) -> bytes:
    """Return the bytes of the file named by ``value``, enforcing the rules in the module doc."""
    real = _resolve(value, policy)
    shown = clip_for_message(value)
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise ImageInputError(f"Image file not found: {shown}") from None
    except NotADirectoryError:
        raise ImageInputError(f"Image file not found: {shown}") from None
    except PermissionError:
        raise ImageInputError(f"Image file is not readable: {shown}") from None
    except OSError:
        raise ImageInputError(f"Image file could not be accessed: {shown}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageInputError(f"Image path is a directory, not a file: {shown}")
    if not stat.S_ISREG(info.st_mode):
        raise ImageInputError(f"Image path is not a regular file: {shown}")
    limit = policy.max_download_bytes
    if info.st_size > limit:
        raise too_large_error(limit, "Image file")

    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise ImageInputError(f"Image file not found: {shown}") from None
    except OSError:
        # PermissionError, or ELOOP when the file was swapped for a symlink after the checks.
        raise ImageInputError(f"Image file is not readable: {shown}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageInputError(f"Image path is not a regular file: {shown}")
        data = read_capped(_file_chunks(fd, shown), limit, "Image file")
    finally:
        os.close(fd)
    if not data:
        raise ImageInputError(f"Image file is empty: {shown}")
    return data


def decode_base64(value: str, policy: ImagePolicy) -> bytes:
    """Decode raw base64 or a ``data:<type>;base64,<data>`` URI.

    Whitespace (including newlines) anywhere is ignored; missing ``=`` padding is tolerated, and
    the URL-safe alphabet (``-``/``_``) is accepted. The decoded size is capped at
    ``policy.max_download_bytes`` (413), checked from the text length before decoding.
    """
    limit = policy.max_download_bytes
    # Cheap guard before any copying: base64 is 4/3 of the data; allow generous whitespace.
    if len(value) > (limit // 3 + 2) * 4 * 2 + 4096:
        raise too_large_error(limit)
    text = value.strip()
    if text[:5].lower() == "data:":
        header, sep, payload = text.partition(",")
        if not sep:
            raise ImageInputError("Invalid data URI: missing ',' before the data")
        params = [p.strip().lower() for p in header[5:].split(";")]
        if "base64" not in params[1:]:
            raise ImageInputError("Invalid data URI: only base64-encoded data URIs are supported")
        text = payload
    text = _WHITESPACE.sub("", text)
    if not text:
        raise ImageInputError("No image data provided")
    if "-" in text or "_" in text:
        text = text.translate(str.maketrans("-_", "+/"))
    unpadded = text.rstrip("=")
    if len(unpadded) % 4 == 1:
        raise ImageInputError("Invalid base64 image data")
    decoded_len = len(unpadded) * 3 // 4
    if decoded_len > limit:
        raise too_large_error(limit)
    text = unpadded + "=" * (-len(unpadded) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("Invalid base64 image data") from None
    if not data:
        raise ImageInputError("No image data provided")
    return data
