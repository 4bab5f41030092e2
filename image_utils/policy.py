"""Limits and safety settings applied while loading a request's image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["ImagePolicy", "MIN_PDF_DPI", "MAX_PDF_DPI", "DEFAULT_PDF_DPI", "PDF_MAX_SIDE", "MAX_ASPECT_RATIO",
           "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_PDF_RENDER_TIMEOUT_S"]

#: Bounds for an explicitly requested PDF rendering resolution, and the default (what the
#: interface document recommends for turning documents into images).
MIN_PDF_DPI = 36
MAX_PDF_DPI = 600
DEFAULT_PDF_DPI = 200
#: The largest decoded image (width x height) anything of the project reads: the server (unless
#: ``--max-image-pixels``), the batch job and the client alike. A letter page scanned at 600 dpi
#: is 33.7 M pixels; a poster or a map may be more.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
#: Seconds allowed for opening a PDF, loading a page and drawing it (the server's
#: ``--pdf-render-timeout``): a page that takes longer is too complex (413).
DEFAULT_PDF_RENDER_TIMEOUT_S = 15.0
#: Upstream dots.ocr re-renders a PDF page at a lower resolution when a side exceeds this.
PDF_MAX_SIDE = 4500
#: The model's resize rule (and qwen-vl-utils) refuse images whose long/short side ratio exceeds this.
MAX_ASPECT_RATIO = 200


@dataclass
class ImagePolicy:
    """Limits and safety switches for :func:`image_utils.load_document`.

    - ``image_root``: when set, ``path`` images must resolve (symlinks resolved) to a file inside
      this directory. Relative paths are always taken relative to the process working directory:
      the root confines paths, it does not relocate them.
    - ``allow_private_urls``: allow ``url`` images whose host resolves to loopback, private,
      link-local, multicast, reserved or unspecified addresses (off by default: SSRF guard).
    - ``max_image_pixels``: width*height limit read from the image header before any pixel is
      decoded (decompression-bomb guard); exceeding it answers 413.
    - ``max_download_bytes``: cap on the raw bytes of an input, whatever its source (URL body,
      decoded base64, file read from ``path``); exceeding it answers 413.
    - ``url_connect_timeout`` / ``url_read_timeout``: seconds, per connection attempt and per
      socket read. ``url_total_timeout``: one wall-clock deadline, in seconds, for a whole URL
      fetch: name resolution, connecting, response headers, body and every redirect. It is
      enforced even against a server that sends one byte at a time (400 when it passes).
    - ``max_redirects``: redirects followed for ``url`` images; each hop is re-checked.
    - ``pdf_dpi``: default rendering resolution of PDF pages. ``max_pdf_pages``: PDFs with more
      pages are refused when opened (413). ``pdf_render_timeout``: seconds allowed for opening a
      PDF, loading the page and drawing it (413 when it passes; drawing is interrupted).
      ``max_model_pixels``: a rendered page is kept at or below this many pixels (and at or below
      4500 px per side) by lowering the resolution.
    """

    image_root: Optional[str] = None
    allow_private_urls: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_download_bytes: int = 50 * 1024 * 1024
    url_connect_timeout: float = 5.0
    url_read_timeout: float = 20.0
    max_redirects: int = 3
    pdf_dpi: int = DEFAULT_PDF_DPI
    max_pdf_pages: int = 2000
    max_model_pixels: int = 11_289_600
    url_total_timeout: float = 120.0
    pdf_render_timeout: float = DEFAULT_PDF_RENDER_TIMEOUT_S
