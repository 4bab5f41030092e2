"""The document's files: ``document.md``, ``document.json``, ``figures/*.png`` and, when asked,
``chunks.jsonl``. One generator makes them (:func:`document_entries`); three callers take them:

* :func:`write_document` into a folder, each file atomically (a temporary file renamed over the
  old one), figures first and ``document.json`` last, stale figures and chunks removed;
* :func:`document_files` as ``{name: bytes}``;
* :func:`document_zip` as the bytes of one ZIP file.

``page_images`` gives the page images the figures are cropped from: a mapping or a function
``page number -> PIL image or None``. It is called once per page that has figures, in page order,
so a caller can render PDF pages one at a time.
"""
from __future__ import annotations

import io
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .chunks import DEFAULT_CHUNK_CHARS, chunk_document
from .figures import figure_png
from .model import Document

if TYPE_CHECKING:
    from PIL import Image

    #: Where the figures are cropped from: page number -> page image (or None: not available).
    PageImages = Mapping[int, Image.Image | None] | Callable[[int], Image.Image | None] | None

__all__ = [
    "CHUNKS_NAME", "FIGURES_DIR", "JSON_NAME", "MARKDOWN_NAME", "MissingPageImageError",
    "document_entries", "document_files", "document_zip", "write_bytes_atomic", "write_document",
]

MARKDOWN_NAME = "document.md"
JSON_NAME = "document.json"
CHUNKS_NAME = "chunks.jsonl"
FIGURES_DIR = "figures"
_FIGURE_NAME = re.compile(r"^page-\d+-fig-\d+\.png$")

class MissingPageImageError(ValueError):
    """Figures to crop from pages whose image was not given."""

    def __init__(self, pages: list[int]):
        self.pages = pages
        super().__init__(f"no page image to crop the figures of page(s) {', '.join(map(str, pages))} from")


def _image_getter(page_images: PageImages) -> Callable[[int], Image.Image | None]:
    if page_images is None:
        return lambda _page: None
    if callable(page_images):
        return page_images
    return page_images.get


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def document_entries(document: Document, page_images: PageImages = None, *, chunks: bool = False,
                     max_chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Iterator[tuple[str, bytes | None]]:
    """``(name, bytes)`` for every file of the document, names relative to the document folder:
    the figures (``bytes`` None for a figure whose page image is missing), then ``chunks.jsonl``
    (with ``chunks``), ``document.md`` and ``document.json``."""
    image_of = _image_getter(page_images)
    pages = {page.page: page for page in document.pages}
    loaded_page, image = None, None
    for figure in document.figures:
        if figure.page != loaded_page:
            loaded_page, image = figure.page, image_of(figure.page)
        yield figure.file, (figure_png(image, figure, pages[figure.page]) if image is not None else None)
    image = None
    if chunks:
        lines = [json.dumps(chunk.to_json(), ensure_ascii=False)
                 for chunk in chunk_document(document, max_chars=max_chunk_chars)]
        yield CHUNKS_NAME, "".join(line + "\n" for line in lines).encode("utf-8")
    yield MARKDOWN_NAME, document.markdown.encode("utf-8")
    yield JSON_NAME, _json_bytes(document.to_json())


def document_files(document: Document, page_images: PageImages = None, *, chunks: bool = False,
                   max_chunk_chars: int = DEFAULT_CHUNK_CHARS) -> dict[str, bytes]:
    """Every file of the document as ``{name: bytes}`` (see :func:`document_entries`). Raises
    :class:`MissingPageImageError` when a page with figures has no image."""
    files: dict[str, bytes] = {}
    missing: list[int] = []
    for name, data in document_entries(document, page_images, chunks=chunks, max_chunk_chars=max_chunk_chars):
        if data is None:
            missing.append(next(f.page for f in document.figures if f.file == name))
        else:
            files[name] = data
    if missing:
        raise MissingPageImageError(sorted(set(missing)))
    return files


def document_zip(document: Document, page_images: PageImages = None, *, chunks: bool = False,
                 max_chunk_chars: int = DEFAULT_CHUNK_CHARS) -> bytes:
    """The document's files in one ZIP (``document.md``, ``document.json``, ``figures/...``, and
    ``chunks.jsonl`` with ``chunks``). Raises :class:`MissingPageImageError` like
    :func:`document_files`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in document_files(document, page_images, chunks=chunks,
                                         max_chunk_chars=max_chunk_chars).items():
            # PNGs are compressed already: stored as they are.
            archive.writestr(name, data, compress_type=zipfile.ZIP_STORED if name.endswith(".png") else None)
    return buffer.getvalue()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, flush it to disk, rename it over."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _remove_stale(out_dir: Path, kept: set[str], chunks: bool) -> None:
    figures = out_dir / FIGURES_DIR
    if figures.is_dir():
        for path in figures.iterdir():
            if _FIGURE_NAME.match(path.name) and f"{FIGURES_DIR}/{path.name}" not in kept:
                path.unlink()
        if not any(figures.iterdir()):
            figures.rmdir()
    if not chunks:
        (out_dir / CHUNKS_NAME).unlink(missing_ok=True)


def write_document(document: Document, out_dir: str | Path, page_images: PageImages = None, *,
                   chunks: bool = False, max_chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[Path]:
    """Write the document's files into ``out_dir`` (created if needed); returns their paths.

    A figure whose page has no image keeps the file of that name already in ``out_dir/figures/``
    (the crop of an earlier assembly of the same pages: figure names depend only on the page and
    the picture's place on it); when there is none, :class:`MissingPageImageError` is raised
    before ``document.md`` and ``document.json`` are written. Figures and ``chunks.jsonl`` of an
    earlier assembly that this one does not have are removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    missing: list[int] = []
    for name, data in document_entries(document, page_images, chunks=chunks, max_chunk_chars=max_chunk_chars):
        path = out_dir / name
        if missing and not name.startswith(FIGURES_DIR + "/"):  # before anything but figures
            raise MissingPageImageError(sorted(set(missing)))
        if data is None:
            if not path.is_file():
                missing.append(next(f.page for f in document.figures if f.file == name))
            written.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
        written.append(path)
    _remove_stale(out_dir, {f.file for f in document.figures}, chunks)
    return written
