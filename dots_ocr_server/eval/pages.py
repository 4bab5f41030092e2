"""Pages: what every subcommand sends. Files, folders and PDFs become one :class:`Page` per page
through the client's inputs (``dots_ocr_server.client.inputs``: files recognised by content, PDF
pages rendered locally with the server's own loader), so every server in a comparison gets the
same bytes; a page can also come straight from image bytes (the benchmark scripts' pages).

A page is rendered when it is first sent and kept (``keep=True``, the default: throughput sends
the same few pages again and again) or rendered anew each time (``keep=False``: a benchmark of a
thousand PDFs should not hold them all in memory).
"""
from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dots_ocr_server.client.errors import PageError
from dots_ocr_server.client.inputs import (
    InputFile,
    assign_names,
    collect_inputs,
    prepare_upload,
)

__all__ = ["Page", "PageImage", "collect_pages", "page_from_bytes", "page_from_file"]


@dataclass(frozen=True)
class PageImage:
    """One page as sent: base64 bytes of an image file (PNG for a rendered PDF page), its MIME
    type and its size in pixels."""

    b64: str
    mime: str
    size: tuple[int, int]

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{self.b64}"


def _describe(data: bytes) -> tuple[str, tuple[int, int]]:
    """MIME type and size of image bytes, from the header only (Pillow)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream"), image.size
    except (OSError, ValueError, SyntaxError) as exc:
        raise PageError(f"not an image Pillow can read ({exc})") from None


@dataclass
class Page:
    """One page of one input: ``label`` for people (``file.pdf p2``), ``name`` + ``page`` for
    folders (the client's naming: the file's stem, made unique)."""

    label: str
    name: str
    page: int
    render: Callable[[], PageImage]
    keep: bool = True
    _cached: PageImage | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def forget(self) -> None:
        """Drop the kept bytes (a page that will not be sent again)."""
        with self._lock:
            self._cached = None

    def image(self) -> PageImage:
        """The page's bytes (PageError when the file cannot be read or rendered)."""
        if not self.keep:
            return self.render()
        with self._lock:
            if self._cached is None:
                self._cached = self.render()
            return self._cached


def page_from_bytes(data: bytes, label: str) -> Page:
    """A page made of image bytes (kept as they are)."""
    mime, size = _describe(data)
    image = PageImage(base64.b64encode(data).decode("ascii"), mime, size)
    return Page(label=label, name=Path(label).stem or "page", page=1, render=lambda: image)


def page_from_file(item: InputFile, page: int, dpi: int, keep: bool = True) -> Page:
    """Page ``page`` of a classified input (``client.inputs.classify``): an image file's own
    bytes, or the PDF page rendered at ``dpi`` and sent as PNG."""
    def render() -> PageImage:
        upload = prepare_upload(item, page, dpi)
        if upload.rendered is not None:
            return PageImage(upload.image_b64, "image/png", upload.rendered.size)
        mime, size = _describe(base64.b64decode(upload.image_b64))
        return PageImage(upload.image_b64, mime, size)

    suffix = f" p{page}" if item.kind == "pdf" else ""
    return Page(label=item.label + suffix, name=item.name, page=page, render=render, keep=keep)


def collect_pages(inputs: list[str], dpi: int, keep: bool = True,
                  warn: Callable[[str], None] = lambda _m: None) -> tuple[list[Page], list[str]]:
    """Every page of ``inputs`` (files and folders, as ``dots-ocr-client`` takes them), in order,
    and the errors of the inputs that cannot be used (missing, not an image or PDF)."""
    items = collect_inputs(inputs, warn=warn)
    assign_names(items)
    pages: list[Page] = []
    errors: list[str] = []
    for item in items:
        if item.kind == "invalid":
            errors.append(item.error or f"{item.label}: unusable")
            continue
        pages.extend(page_from_file(item, number, dpi, keep) for number in range(1, item.page_count + 1))
    return pages, errors
