"""Turning a request's ``image`` value into a validated RGB image (or a rendered PDF page)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from PIL import Image

from .decode import decode_image_bytes, is_pdf_bytes
from .errors import ImageInputError, clip_for_message
from .pdf import render_pdf_page, validate_dpi
from .policy import ImagePolicy
from .sources import decode_base64, is_data_uri, read_path
from .url_fetch import fetch_url

__all__ = ["IMAGE_FORMATS", "LoadedImage", "load_bytes", "load_bytes_document", "load_document", "load_image"]

#: Allowed values of the request's ``image_format``.
IMAGE_FORMATS = ("path", "url", "base64")


@dataclass
class LoadedImage:
    """The result of :func:`load_document`.

    ``image`` is an RGB PIL image. For PDFs, ``page`` is the rendered page (1-based),
    ``page_count`` the document's number of pages and ``dpi`` the resolution actually used
    (possibly lower than requested, see :mod:`image_utils.pdf`); all three are ``None`` for images.
    """

    image: Image.Image
    page: Optional[int] = None
    page_count: Optional[int] = None
    source_kind: str = "image"
    dpi: Optional[float] = None


def _check_page(page) -> int:
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise ImageInputError("page must be an integer >= 1")
    return page


def load_bytes(value: str, image_format: Optional[str], policy: ImagePolicy) -> bytes:
    """The raw bytes behind ``value`` (file, download or decoded base64), without decoding them."""
    if not isinstance(value, str):
        raise ImageInputError("image must be a string")
    if not value.strip():
        raise ImageInputError("No image data provided")
    if is_data_uri(value):
        # Earlier clients send data URIs with any (or no) image_format.
        return decode_base64(value, policy)
    fmt = "path" if image_format is None else image_format
    if not isinstance(fmt, str) or fmt.strip().lower() not in IMAGE_FORMATS:
        raise ImageInputError(
            f"Invalid image_format {clip_for_message(repr(image_format), 60)}. "
            f"Must be one of: {list(IMAGE_FORMATS)}"
        )
    fmt = fmt.strip().lower()
    if fmt == "path":
        return read_path(value, policy)
    if fmt == "url":
        return fetch_url(value, policy)
    return decode_base64(value, policy)


def load_document(
    value: str,
    image_format: Optional[str],
    policy: Optional[ImagePolicy] = None,
    *,
    page: int = 1,
    dpi: Optional[float] = None,
) -> LoadedImage:
    """Load the request's image.

    ``image_format`` is ``"path"``, ``"url"`` or ``"base64"`` (``None`` means ``"path"``, the API
    default); a ``data:image/...`` or ``data:application/pdf`` URI is accepted whatever it says.
    Content is recognised by its bytes, not by the format field or a file extension: a PDF
    (``%PDF-`` magic) is rendered at page ``page`` (1-based) and ``dpi`` (default
    ``policy.pdf_dpi``; 36..600), anything else must be a PNG, JPEG, WebP, BMP, TIFF or GIF image
    (first frame), and for an image ``page`` must be 1 (``dpi`` is ignored).

    Raises ImageInputError (``.status`` 400, or 413 for inputs over a size limit).
    """
    policy = policy if policy is not None else ImagePolicy()
    page = _check_page(page)
    if dpi is not None:
        dpi = validate_dpi(dpi)
    return load_bytes_document(load_bytes(value, image_format, policy), policy, page=page, dpi=dpi)


def load_bytes_document(data: bytes, policy: Optional[ImagePolicy] = None, *, page: int = 1,
                        dpi: Optional[float] = None) -> LoadedImage:
    """Like :func:`load_document`, for bytes already read (a stored upload, a corpus file)."""
    policy = policy if policy is not None else ImagePolicy()
    page = _check_page(page)
    if dpi is not None:
        dpi = validate_dpi(dpi)
    if is_pdf_bytes(data):
        image, page_count, used_dpi = render_pdf_page(data, policy, page=page, dpi=dpi)
        return LoadedImage(image=image, page=page, page_count=page_count, source_kind="pdf", dpi=used_dpi)
    if page != 1:
        raise ImageInputError(f"Page {page} out of range: an image has only 1 page")
    return LoadedImage(image=decode_image_bytes(data, policy), source_kind="image")


def load_image(value: str, image_format: Optional[str], policy: Optional[ImagePolicy] = None) -> Image.Image:
    """Like :func:`load_document` but returns only the RGB image (page 1 for a PDF)."""
    return load_document(value, image_format, policy).image
