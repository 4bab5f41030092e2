"""Inputs: files and folders -> images and PDFs (recognised by their bytes, not their names), each
with its output folder name; and what is uploaded for one page.

An image is uploaded as its own file bytes. A PDF page is rendered here, once, with the same
loader the server uses (``image_utils.load_document``: pypdfium2 at the requested dpi, lowered
only for pages too large for the model), and uploaded as a PNG of that one page, so a long PDF is
never re-sent per page and the layout's pixel coordinates fit the page image kept locally.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from .errors import PageError
from .outputs import SUMMARY_NAME

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "INPUT_SUFFIXES", "SUPPORTED_TEXT", "InputFile", "Upload", "assign_names", "classify",
    "collect_inputs", "label", "page_image", "prepare_upload", "scaled_upload",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
INPUT_SUFFIXES = IMAGE_SUFFIXES + (".pdf",)
SUPPORTED_TEXT = "PNG, JPEG, WebP, BMP, TIFF, GIF or PDF"
#: Resolution of the throw-away render that checks a PDF and counts its pages (cheap: an A4 page
#: is 298 x 421 px at 36 dpi, the lowest the loader accepts).
_PROBE_DPI = 36
#: One PDF page is read and rendered at a time in this process. pdfium renders one page at a time
#: anyway (image_utils serialises it), and the loader reads the whole PDF for each page: without
#: this lock, every worker waiting for pdfium would hold its own copy of the file's bytes.
_RENDER_LOCK = threading.Lock()
#: PNG level for uploaded PDF pages: on a 200-dpi text page (samples/demo_pdf1.pdf), level 3 came
#: out both faster to encode and smaller than Pillow's default 6.
_PNG_LEVEL = 3


@dataclass
class InputFile:
    path: Path
    label: str                 # how messages and the summary name it (relative to the cwd)
    kind: str = "invalid"      # "image" | "pdf" | "invalid"
    error: Optional[str] = None
    page_count: int = 0
    name: str = ""             # its folder under OUT


def label(path: Path) -> str:
    """``path`` relative to the working directory (absolute when outside it), with ``/``."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        relative = ".."
    if relative == ".." or relative.startswith(".." + os.sep):
        return Path(os.path.abspath(path)).as_posix()
    return Path(relative).as_posix()


def _walk(folder: Path) -> list[Path]:
    """Files with a supported extension under ``folder``, recursively, sorted by relative path;
    hidden files and folders (``.git``, macOS ``._x.png`` resource forks, ...) are left out."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in INPUT_SUFFIXES:
                found.append(Path(root) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _policy():
    """The loader's limits for local files: the server's pixel cap (``ImagePolicy``'s default, the
    one cap of the project: a bigger image would only be refused by the server after its upload),
    no page limit and no size cap for PDFs read from disk."""
    from image_utils import ImagePolicy

    return ImagePolicy(max_download_bytes=1 << 40, max_pdf_pages=sys.maxsize)


def _is_image(path: Path) -> bool:
    """True when Pillow recognises a supported image format from the header (no pixels decoded);
    PageError for one beyond the pixel cap (the server's, which would refuse it after its upload)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    from image_utils import ALLOWED_FORMATS, ImageInputError  # the Pillow formats the server decodes
    from image_utils.decode import check_dimensions

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap decides, below
            with Image.open(path, formats=list(ALLOWED_FORMATS)) as image:
                size = image.size
    except Image.DecompressionBombError as exc:
        raise PageError(f"the image is too large to process ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False
    try:
        check_dimensions(*size, _policy())
    except ImageInputError as exc:
        raise PageError(exc.message) from None
    return True


def _looks_like_pdf(path: Path) -> bool:
    # LOCAL EQUIVALENT, to remove once image_utils exports is_pdf_bytes: for a file that is not a
    # supported image, that function reduces to "%PDF-" within the first 1024 bytes.
    with open(path, "rb") as handle:
        return b"%PDF-" in handle.read(1024)


def _pdf_page_count(path: Path) -> int:
    """Pages of the PDF at ``path``: page 1 is rendered at 36 dpi through the public loader, which
    also proves the document opens (not encrypted, not damaged). PageError otherwise."""
    from image_utils import ImageInputError, load_document

    try:
        loaded = load_document(os.path.abspath(path), "path", _policy(), page=1, dpi=_PROBE_DPI)
    except ImageInputError as exc:
        raise PageError(exc.message) from None
    if loaded.source_kind != "pdf":
        raise PageError(f"not an image or PDF (supported: {SUPPORTED_TEXT})")
    return loaded.page_count


def classify(path: Path) -> InputFile:
    """Look at the file's bytes (not its extension) and fill in kind, page count or error."""
    item = InputFile(path=path, label=label(path))
    try:
        if _is_image(path):
            item.kind, item.page_count = "image", 1
        elif _looks_like_pdf(path):
            item.kind, item.page_count = "pdf", _pdf_page_count(path)
        else:
            raise PageError(f"not an image or PDF (supported: {SUPPORTED_TEXT})")
    except OSError as exc:
        item.kind, item.error = "invalid", f"{item.label}: cannot read the file ({exc.strerror or exc})"
    except PageError as exc:
        item.kind, item.error = "invalid", f"{item.label}: {exc}"
    return item


def collect_inputs(paths: list[str], warn: Callable[[str], None] = lambda _m: None) -> list[InputFile]:
    """Files as given (any extension, recognised by content) and folders (recursed, sorted, only
    supported extensions), without duplicates. Missing paths and unusable files come back as
    ``kind == "invalid"`` items with an ``error`` naming them."""
    items: list[InputFile] = []
    seen: set[str] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files = _walk(path)
            if not files:
                warn(f"warning: no images or PDFs in folder {label(path)}")
        elif path.exists():
            files = [path]
        else:
            name = label(path)
            items.append(InputFile(path=path, label=name, error=f"{name}: no such file or folder"))
            continue
        for file in files:
            key = os.path.realpath(file)
            if key in seen:
                continue
            seen.add(key)
            items.append(classify(file))
    return items


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def assign_names(items: list[InputFile]) -> None:
    """Output folder per input: the file's stem, or ``<stem>-<hash of its relative path>`` when
    several inputs share a stem (compared case-insensitively, for case-insensitive file systems)
    or the stem would clash with ``summary.json``."""
    groups: dict[str, list[InputFile]] = {}
    for item in items:
        if item.kind == "invalid":
            continue
        stem = item.path.stem.strip() or "input"
        if stem in (".", ".."):
            stem = "input"
        item.name = stem
        groups.setdefault(stem.casefold(), []).append(item)
    for key, group in groups.items():
        if len(group) > 1 or key == SUMMARY_NAME.casefold():
            for item in group:
                item.name = f"{item.name}-{_short_hash(item.label)}"


@dataclass
class Upload:
    """What one request sends (``image_b64``, always ``image_format: base64``) and the page as the
    server will see it, for page.png: the rendered image of a PDF page, or None for an image file
    (decoded only when needed, by :meth:`page_image`)."""

    image_b64: str
    rendered: Optional["Image.Image"] = None  # a PDF page
    page: Optional[int] = None  # PDF pages only: the page and the document's page count
    page_count: Optional[int] = None

    def page_image(self) -> "Image.Image":
        """The page as an RGB image, decoded exactly as the server decodes the upload."""
        if self.rendered is not None:
            return self.rendered
        from image_utils import ImageInputError, load_document

        try:
            return load_document(self.image_b64, "base64", _policy()).image
        except ImageInputError as exc:
            raise PageError(f"could not load the page locally to draw it: {exc.message}") from None


def _png_base64(image: "Image.Image") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_LEVEL)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def prepare_upload(item: InputFile, page: int, dpi: int) -> Upload:
    """The upload for page ``page`` (1-based) of ``item``: an image's own bytes, or a PDF page
    rendered at ``dpi`` and encoded as PNG. PageError if the file cannot be read or rendered."""
    if item.kind == "image":
        try:
            return Upload(image_b64=base64.b64encode(item.path.read_bytes()).decode("ascii"))
        except OSError as exc:
            raise PageError(f"cannot read the file ({exc.strerror or exc})") from None
    from image_utils import ImageInputError, load_document

    try:
        with _RENDER_LOCK:
            loaded = load_document(os.path.abspath(item.path), "path", _policy(), page=page, dpi=dpi)
    except ImageInputError as exc:
        raise PageError(f"cannot render the page: {exc.message}") from None
    if loaded.source_kind != "pdf":
        raise PageError("the file is no longer a PDF (changed during the run?)")
    return Upload(image_b64=_png_base64(loaded.image), rendered=loaded.image, page=page,
                  page_count=loaded.page_count)


def scaled_upload(image: Image.Image, scale: float) -> tuple[Upload, tuple[int, int]]:
    """An upload of ``image`` resized by ``scale`` (each side, at least 1 px), and that size."""
    from PIL import Image

    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return Upload(image_b64=_png_base64(image.resize(size, Image.Resampling.LANCZOS))), size


def page_image(item: InputFile, page: int, dpi: int) -> Image.Image:
    """Page ``page`` of ``item`` as the server saw it when it was uploaded (an image decoded as the
    server decodes it, a PDF page rendered at ``dpi``), without encoding an upload. PageError if
    the file cannot be read or rendered."""
    from image_utils import ImageInputError, load_document

    try:
        if item.kind == "image":
            return load_document(os.path.abspath(item.path), "path", _policy()).image
        with _RENDER_LOCK:
            return load_document(os.path.abspath(item.path), "path", _policy(), page=page, dpi=dpi).image
    except ImageInputError as exc:
        raise PageError(f"cannot load page {page} of {item.label}: {exc.message}") from None
