"""Per-page results that already exist -> :class:`.model.PageInput` s, for :func:`.assemble`:

* :func:`page_from_answer`: one page from an ``/ocr`` answer (or a batch-job row) and its size;
* :func:`read_client_folder`: the pages of one input in a ``dots-ocr-client`` output folder
  (``OUT/<input>/page_NNNN/response.json``, the page size from its ``page.png``);
* :func:`read_pages_json`: a JSON file ``{"pages": [{"page", "width", "height", "image"?,
  "layout": [cells]}]}`` (see docs/DOCUMENT_FORMAT.md);
* :func:`page_image_loader`: page images from an image or PDF file, for the figures.

Cells are validated by the server's own rules (:func:`dots_ocr_server.layout.clean_cells`). Bad
input raises :class:`DocumentInputError` with a message that names the file and the field.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dots_ocr_server.layout import clean_cells
from model_runner.prompts import LAYOUT_PROMPT_TYPES

from .model import Cell, PageInput, PageIssue
from .quality import RETRY_NOTE, answer_problem
from .writer import JSON_NAME

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DocumentInputError", "PagesInput", "cells_from_json", "is_client_input_folder", "is_pdf_reference",
    "load_page_image", "page_from_answer", "page_image_loader", "read_client_folder", "read_pages_json",
]



class DocumentInputError(ValueError):
    """Per-page results that cannot be assembled; the message says where and why."""


@dataclass
class PagesInput:
    """Pages read from existing results, with what is known about them. ``images``: page number
    -> the image reference given for it (a path or data URI; :func:`read_pages_json` only)."""

    pages: list[PageInput]
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    images: dict[int, str] = field(default_factory=dict)


def _finite_number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _confidence(value: Any) -> dict[str, float] | None:
    """A cell's ``{"min", "mean"}`` confidence (as the server writes it), or None."""
    if not isinstance(value, Mapping):
        return None
    low, mean = _finite_number(value.get("min")), _finite_number(value.get("mean"))
    return None if low is None or mean is None else {"min": low, "mean": mean}


def cells_from_json(items: Any, where: str = "layout") -> tuple[Cell, ...]:
    """Layout cells (JSON dicts with ``bbox`` in page pixels, ``category``, ``text``,
    ``confidence``) -> :class:`.model.Cell` s, validated by ``clean_cells``: boxes as 4 ints,
    categories in their canonical spelling, unusable cells left out."""
    if not isinstance(items, list):
        raise DocumentInputError(f"{where} must be a list of cells, got {type(items).__name__}")
    cleaned, _changed = clean_cells(items)
    return tuple(Cell(category=cell["category"], bbox=tuple(cell["bbox"]) if "bbox" in cell else None,
                      text=cell.get("text"), confidence=_confidence(cell.get("confidence")))
                 for cell in cleaned)


def _layout_of(answer: Mapping[str, Any], where: str) -> Any:
    layout = answer.get("layout", [])
    if isinstance(layout, str):  # a batch-job row holds the cells as a JSON string
        try:
            return json.loads(layout)
        except ValueError:
            raise DocumentInputError(f"{where}: 'layout' is a string that is not JSON") from None
    return [] if layout is None else layout


def page_from_answer(page: int, width: int, height: int, answer: Mapping[str, Any],
                     where: str | None = None) -> PageInput:
    """One page from a post-processed layout answer: ``/ocr``'s JSON (``layout`` in original
    pixels, ``done_reason``, ``repaired``, ``response``) or a batch-job row (``layout`` as JSON,
    ``finish_reason``). ``width`` x ``height``: the page image's size in pixels. A page with a
    problem (:func:`.quality.answer_problem`) gets an issue, with the scale of the client's retry
    when it made one."""
    where = where or f"page {page}"
    cells = cells_from_json(_layout_of(answer, where), f"{where}: layout")
    problem = answer_problem(answer)
    issues: tuple[PageIssue, ...] = ()
    if problem is not None:
        note = answer.get(RETRY_NOTE)
        scale = note.get("scale") if isinstance(note, Mapping) else None
        issues = (PageIssue(page, problem, retried_at_scale=_finite_number(scale)),)
    try:
        return PageInput(page=page, width=width, height=height, cells=cells, issues=issues)
    except ValueError as exc:
        raise DocumentInputError(f"{where}: {exc}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DocumentInputError(f"{path}: no such file") from None
    except OSError as exc:
        raise DocumentInputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DocumentInputError(f"{path}: not valid JSON ({exc})") from None


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DocumentInputError(f"{path}: cannot read the page size from it ({exc})") from None


def _client_layout():
    """The client's names for its per-page files (their one home is the client's outputs module;
    imported here, when a folder is read, because the client imports this package)."""
    from dots_ocr_server.client import outputs

    return outputs


def is_client_input_folder(folder: Path) -> bool:
    """True for the client's folder of one input (``OUT/<input>``, with ``page_0001/`` in it)."""
    return _client_layout().page_dir(folder.parent, folder.name, 1).is_dir()


def read_client_folder(folder: os.PathLike | str, page_count: int | None = None) -> PagesInput:
    """The pages of one input of ``dots-ocr-client`` (``folder`` = ``OUT/<input>``): pages 1 ..
    ``page_count`` (default: the ``page_count`` of page 1's answer, which the client records for
    a PDF; 1 for an image). Every page must be done (its ``response.json`` written) with a layout
    prompt type; the page size is that of its ``page.png``. ``metadata``: ``model``,
    ``prompt_type`` and ``page_count`` from the answers, plus ``dpi`` from an earlier
    ``document.json`` there."""
    client = _client_layout()
    folder = Path(folder)
    if not folder.is_dir():
        raise DocumentInputError(f"{folder}: no such folder")
    if not is_client_input_folder(folder):
        raise DocumentInputError(f"{folder}: no page_0001 folder in it (not the client's output folder of one input)")
    pages: list[PageInput] = []
    metadata: dict[str, Any] = {}
    count = page_count
    number = 1
    while count is None or number <= count:
        directory = client.page_dir(folder.parent, folder.name, number)
        marker = directory / client.MARKER_NAME
        if not marker.is_file():
            raise DocumentInputError(f"{folder}: page {number} is not done (no {directory.name}/{marker.name}); "
                                     "run dots-ocr-client on the input again")
        answer = _read_json(marker)
        if not isinstance(answer, dict):
            raise DocumentInputError(f"{marker}: not a JSON object")
        prompt_type = answer.get("prompt_type")
        if prompt_type not in LAYOUT_PROMPT_TYPES:
            raise DocumentInputError(f"{marker}: made with prompt_type {prompt_type!r}, which gives no layout "
                                     f"(documents need one of {', '.join(LAYOUT_PROMPT_TYPES)})")
        if count is None:
            recorded = answer.get("page_count")
            count = recorded if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0 else 1
        metadata.setdefault("model", answer.get("model"))
        metadata.setdefault("prompt_type", prompt_type)
        width, height = _image_size(directory / client.PAGE_IMAGE_NAME)
        pages.append(page_from_answer(number, width, height, answer, where=str(marker)))
        number += 1
    metadata["page_count"] = count
    source = None
    earlier = folder / JSON_NAME
    if earlier.is_file():  # the client's: what it knew (the input's name, the PDF's dpi) is kept
        try:
            previous = json.loads(earlier.read_text(encoding="utf-8"))
            source = previous.get("source")
            dpi = previous.get("metadata", {}).get("dpi")
            if dpi is not None:
                metadata["dpi"] = dpi
        except (OSError, ValueError, AttributeError):
            pass  # an earlier document that cannot be read adds nothing
    return PagesInput(pages=pages, source=source, metadata=metadata)


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DocumentInputError(f"{where} must be a positive integer, got {value!r}")
    return value


def read_pages_json(path: os.PathLike | str) -> PagesInput:
    """Pages from a JSON file ``{"source"?, "metadata"?, "pages": [{"page", "width", "height",
    "image"?, "layout": [cells], "done_reason"?, "repaired"?, "response"?}]}``: boxes in page
    pixels (``width`` x ``height``); ``image``, a path (relative to the JSON file's folder) or a
    ``data:`` URI of the page image or of a PDF (then its page ``page`` is used), is kept in
    ``images`` for the figures."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("pages"), list):
        raise DocumentInputError(f'{path}: expected a JSON object with a "pages" list')
    if not data["pages"]:
        raise DocumentInputError(f"{path}: \"pages\" is empty")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise DocumentInputError(f"{path}: \"metadata\" must be an object")
    source = data.get("source")
    if source is not None and not isinstance(source, str):
        raise DocumentInputError(f"{path}: \"source\" must be a string")
    pages: list[PageInput] = []
    images: dict[int, str] = {}
    seen: set[int] = set()
    for index, entry in enumerate(data["pages"]):
        where = f"{path}: pages[{index}]"
        if not isinstance(entry, dict):
            raise DocumentInputError(f"{where} must be an object")
        number = _positive_int(entry.get("page"), f"{where}.page")
        if number in seen:
            raise DocumentInputError(f"{where}.page: page {number} appears twice")
        seen.add(number)
        width = _positive_int(entry.get("width"), f"{where}.width")
        height = _positive_int(entry.get("height"), f"{where}.height")
        if "layout" not in entry:
            raise DocumentInputError(f'{where}: no "layout" (the cells, a list)')
        image = entry.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                raise DocumentInputError(f"{where}.image must be a path or a data: URI")
            images[number] = image if image.startswith("data:") else str(path.parent / image)
        pages.append(page_from_answer(number, width, height, entry, where=where))
    return PagesInput(pages=pages, source=source, metadata=dict(metadata), images=images)


def _policy():
    """Local files: no size limits beyond what the machine can hold (as for the client)."""
    from image_utils import ImagePolicy

    return ImagePolicy(max_image_pixels=1_000_000_000, max_download_bytes=1 << 40, max_pdf_pages=sys.maxsize)


def is_pdf_reference(reference: str) -> bool:
    """True when ``reference`` (a path or a ``data:`` URI) holds a PDF rather than an image."""
    from image_utils import is_pdf_bytes

    if reference.startswith("data:"):
        return reference[5:].split(";", 1)[0].strip().lower() == "application/pdf"
    try:
        with open(reference, "rb") as handle:
            return is_pdf_bytes(handle.read(1024))
    except OSError:
        return False  # the loader reports the unreadable file


def load_page_image(reference: str, page: int, dpi: int | None = None) -> Image.Image:
    """The image of page ``page`` from ``reference`` (a path or a ``data:`` URI): an image file is
    the page itself; of a PDF, its page ``page`` is rendered at ``dpi`` (by default the server's,
    lowered for pages too large for the model as the server and the client do)."""
    from image_utils import ImageInputError, load_document

    image_format = "base64" if reference.startswith("data:") else "path"
    value = reference if image_format == "base64" else os.path.abspath(reference)
    try:
        loaded = load_document(value, image_format, _policy(), page=page if is_pdf_reference(reference) else 1,
                               dpi=dpi)
    except ImageInputError as exc:
        shown = reference if image_format == "path" else "the data: URI"
        raise DocumentInputError(f"page {page}: cannot load its image from {shown}: {exc.message}") from None
    return loaded.image


def page_image_loader(references: Mapping[int, str], dpi: int | None = None
                      ) -> Callable[[int], Image.Image | None]:
    """``page -> image`` over ``references`` (page number -> path or data URI), loading on call."""
    def load(page: int) -> Image.Image | None:
        reference = references.get(page)
        return load_page_image(reference, page, dpi) if reference is not None else None
    return load
