"""Rendering one page of a PDF (given as bytes) to an RGB PIL image with pypdfium2.

Resolution rule: the page is rendered at the requested ``dpi`` (``policy.pdf_dpi`` when not
given; an explicit value must lie in 36..600) unless the bitmap would then have a side longer
than 4500 px or more than ``policy.max_model_pixels`` pixels. In that case the resolution is
lowered to the largest one at which both limits hold (computed in closed form, then nudged down
until pdfium's rounded-up pixel size fits). Unlike upstream dots.ocr, which jumps straight to
72 dpi, this keeps as much resolution as the model can take; the result may be below 72 dpi
for very large pages.

Cost bounds: a PDF with more than ``policy.max_pdf_pages`` pages is refused as soon as it is
opened (413); opening, loading the page and drawing it must finish within
``policy.pdf_render_timeout`` seconds (413). Drawing uses pdfium's progressive renderer, whose
pause callback lets it stop mid-page once the deadline has passed; opening and loading a page
cannot be interrupted, so the deadline is checked after each of them. The bitmap's size is
bounded by the resolution rule above.

Memory: pdfium is not thread-safe, so every pdfium call in this module runs under one
module-level lock (:data:`PDFIUM_LOCK`), and every pdfium object (document, page, bitmap) is
closed explicitly before the lock is released, whatever happened, rather than left to the
garbage collector (a lingering Python reference, e.g. from a traceback, would otherwise keep a
whole document alive). pdfium's image cache is limited while drawing. After each render the C
allocator is asked to give freed memory back to the system (glibc ``malloc_trim``): each server
thread allocates from its own malloc arena, and a multi-megabyte bitmap freed there otherwise
stays in the process's RSS.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Optional, Tuple

from PIL import Image

from .decode import check_dimensions
from .memory import give_back_freed_memory
from .errors import ImageInputError, clip_for_message
from .policy import MAX_PDF_DPI, MIN_PDF_DPI, PDF_MAX_SIDE, ImagePolicy

__all__ = ["render_pdf_page", "pdf_page_count", "fit_pdf_dpi", "validate_dpi", "PDFIUM_LOCK"]

#: Guards every pypdfium2 call made by this package.
PDFIUM_LOCK = threading.Lock()


def validate_dpi(dpi) -> float:
    """Return ``dpi`` as a float if it is a number in 36..600, else raise ImageInputError (400)."""
    not_finite = isinstance(dpi, float) and not math.isfinite(dpi)
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not_finite:
        raise ImageInputError(f"dpi must be a number between {MIN_PDF_DPI} and {MAX_PDF_DPI}")
    # Compared as given (no float conversion first): a huge int would overflow a float.
    if not (MIN_PDF_DPI <= dpi <= MAX_PDF_DPI):
        raise ImageInputError(
            f"dpi {clip_for_message(dpi, 40)} is out of range: it must be between {MIN_PDF_DPI} "
            f"and {MAX_PDF_DPI}"
        )
    return float(dpi)


def _pixel_size(width_pt: float, height_pt: float, dpi: float) -> Tuple[int, int]:
    # pypdfium2 sizes the bitmap as ceil(points * scale) on each side.
    scale = dpi / 72.0
    return math.ceil(width_pt * scale), math.ceil(height_pt * scale)


def _fits(size: Tuple[int, int], max_pixels: int) -> bool:
    w, h = size
    return max(w, h) <= PDF_MAX_SIDE and w * h <= max_pixels


def fit_pdf_dpi(width_pt: float, height_pt: float, dpi: float, max_pixels: int) -> float:
    """The resolution to render a ``width_pt`` x ``height_pt`` page at: ``dpi`` when the bitmap
    fits (each side <= 4500 px and w*h <= ``max_pixels``), else the largest lower dpi that fits."""
    if _fits(_pixel_size(width_pt, height_pt, dpi), max_pixels):
        return dpi
    by_side = PDF_MAX_SIDE * 72.0 / max(width_pt, height_pt)
    by_area = 72.0 * math.sqrt(max_pixels / (width_pt * height_pt))
    fitted = min(dpi, by_side, by_area)
    for _ in range(100):  # ceil() can push a side one pixel over: nudge down until it fits
        size = _pixel_size(width_pt, height_pt, fitted)
        if _fits(size, max_pixels):
            return fitted
        w, h = size
        shrink = min(PDF_MAX_SIDE / max(w, h), math.sqrt(max_pixels / (w * h)), 1.0)
        fitted *= shrink * (1.0 - 1e-6)
    return fitted  # pragma: no cover - the loop converges in a step or two


def _open_error(exc: Exception) -> ImageInputError:
    import pypdfium2.raw as pdfium_c

    code = getattr(exc, "err_code", None)
    if code in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY):
        return ImageInputError("PDF is encrypted or password-protected; only unprotected PDFs are supported")
    return ImageInputError("Could not open PDF: the file is damaged or not a valid PDF")


def _open_document(source):
    """A pypdfium2 document for ``source`` (bytes, or a file path); ImageInputError if unreadable.
    Call with PDFIUM_LOCK held."""
    import pypdfium2 as pdfium

    try:
        return pdfium.PdfDocument(source)
    except pdfium.PdfiumError as exc:
        raise _open_error(exc) from None
    except Exception:  # noqa: BLE001 - pdfium raises other errors for some damaged files
        raise ImageInputError("Could not open PDF: the file is damaged or not a valid PDF") from None


def pdf_page_count(source) -> int:
    """Number of pages of the PDF in ``source`` (``bytes``, or a path to a file).

    Takes :data:`PDFIUM_LOCK` and closes the document before returning. Raises ImageInputError
    (400) with a client-facing reason when the PDF is encrypted, damaged or not a PDF.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = bytes(source)
    else:
        source = str(source)
    with PDFIUM_LOCK:
        document = _open_document(source)
        try:
            return len(document)
        finally:
            document.close()


class _Deadline:
    """The rendering time limit: ``check`` raises once it has passed; ``passed`` is what pdfium's
    pause callback asks while drawing."""

    def __init__(self, seconds: float, page: int) -> None:
        self.seconds = seconds
        self.page = page
        self.end = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() >= self.end

    def error(self) -> ImageInputError:
        return ImageInputError(
            f"Rendering page {self.page} of the PDF took longer than the limit of {self.seconds:g} s "
            "(the page is too complex)",
            status=413,
        )

    def check(self) -> None:
        if self.passed():
            raise self.error()


def _draw(pdf_page, dpi: float, deadline: _Deadline):
    """Draw ``pdf_page`` at ``dpi`` into a new RGB bitmap on white, stopping at the deadline.

    Returns the pypdfium2 bitmap (the caller closes it). pypdfium2's ``PdfPage.render`` draws in
    one uninterruptible call, so this uses pdfium's progressive renderer directly: its pause
    callback is asked every hundred or so page objects whether to stop.
    """
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    width, height = _pixel_size(*pdf_page.get_size(), dpi)
    bitmap = pdfium.PdfBitmap.new_native(width, height, pdfium_c.FPDFBitmap_BGR, rev_byteorder=True)
    try:
        bitmap.fill_rect((255, 255, 255, 255), 0, 0, width, height)
        flags = pdfium_c.FPDF_ANNOT | pdfium_c.FPDF_REVERSE_BYTE_ORDER | pdfium_c.FPDF_RENDER_LIMITEDIMAGECACHE
        pause = pdfium_c.IFSDK_PAUSE(version=1)
        pause.NeedToPauseNow = type(pause.NeedToPauseNow)(lambda _pause: deadline.passed())
        area = (bitmap, pdf_page, 0, 0, width, height, 0, flags)
        try:
            status = pdfium_c.FPDF_RenderPageBitmap_Start(*area, pause)
            while status == pdfium_c.FPDF_RENDER_TOBECONTINUED and not deadline.passed():
                status = pdfium_c.FPDF_RenderPage_Continue(pdf_page, pause)
        finally:
            pdfium_c.FPDF_RenderPage_Close(pdf_page)  # frees the progressive renderer's state
        if status == pdfium_c.FPDF_RENDER_TOBECONTINUED:
            raise deadline.error()
        if status != pdfium_c.FPDF_RENDER_DONE:
            raise ImageInputError(f"Could not render page {deadline.page} of the PDF")
        if pdf_page.formenv:  # filled-in form fields, drawn on top like pypdfium2 does
            pdfium_c.FPDF_FFLDraw(pdf_page.formenv, *area)
    except BaseException:
        bitmap.close()
        raise
    return bitmap


def render_pdf_page(
    data: bytes, policy: ImagePolicy, page: int = 1, dpi: Optional[float] = None
) -> Tuple[Image.Image, int, float]:
    """Render page ``page`` (1-based) of the PDF in ``data``.

    Returns ``(rgb_image, page_count, dpi_used)``. Raises ImageInputError: 400 for an
    out-of-range page or an encrypted or broken PDF; 413 for a PDF with more than
    ``policy.max_pdf_pages`` pages or one whose page takes longer than
    ``policy.pdf_render_timeout`` seconds.
    """
    requested = float(policy.pdf_dpi) if dpi is None else validate_dpi(dpi)
    deadline = _Deadline(policy.pdf_render_timeout, page)
    try:
        with PDFIUM_LOCK:
            document = _open_document(bytes(data))
            try:
                page_count = len(document)
                _check_page_count(page_count, page, policy)
                image, used = _render_open_document(document, page, requested, policy, deadline)
            finally:
                document.close()
    finally:
        give_back_freed_memory()
    return image, page_count, used


def _check_page_count(page_count: int, page: int, policy: ImagePolicy) -> None:
    if page_count > policy.max_pdf_pages:
        raise ImageInputError(
            f"PDF has {page_count} pages, more than the limit of {policy.max_pdf_pages} pages",
            status=413,
        )
    if not 1 <= page <= page_count:
        raise ImageInputError(
            f"Page {clip_for_message(page, 40)} out of range: the PDF has {page_count} pages"
        )


def _render_open_document(document, page: int, requested: float, policy: ImagePolicy, deadline: _Deadline):
    deadline.check()
    try:
        document.init_forms()  # so that filled-in form fields are drawn
    except Exception:  # noqa: BLE001 - a document whose forms do not load is drawn without them
        pass
    try:
        pdf_page = document[page - 1]
    except Exception:  # noqa: BLE001 - any failure to load a page is that page's error
        raise ImageInputError(f"Could not read page {page} of the PDF") from None
    try:
        deadline.check()
        width_pt, height_pt = pdf_page.get_size()
        if not (math.isfinite(width_pt) and math.isfinite(height_pt)) or width_pt <= 0 or height_pt <= 0:
            raise ImageInputError(f"Page {page} of the PDF has an invalid size")
        used = fit_pdf_dpi(width_pt, height_pt, requested, policy.max_model_pixels)
        check_dimensions(*_pixel_size(width_pt, height_pt, used), policy)
        bitmap = _draw(pdf_page, used, deadline)
        try:
            # convert() copies, so the image no longer refers to pdfium's buffer.
            image = bitmap.to_pil().convert("RGB")
        finally:
            bitmap.close()
    finally:
        pdf_page.close()
    return image, used
