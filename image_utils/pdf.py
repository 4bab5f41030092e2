"""Rendering one page of a PDF (given as bytes) to an RGB PIL image with pypdfium2.

Resolution rule: the page is rendered at the requested ``dpi`` (``policy.pdf_dpi`` when not
given; an explicit value must lie in 36..600) unless the bitmap would then have a side longer
than 4500 px or more than ``policy.max_model_pixels`` pixels. In that case the resolution is
lowered to the largest one at which both limits hold (computed in closed form, then nudged down
until pdfium's rounded-up pixel size fits). Unlike upstream dots.ocr, which jumps straight to
72 dpi, this keeps as much resolution as the model can take; the result may be below 72 dpi
for very large pages.

pdfium is not thread-safe: every pdfium call in this module runs under one module-level lock,
and every pdfium object (document, page, bitmap) is closed before the lock is released.
"""
from __future__ import annotations

import math
import threading
from typing import Optional, Tuple

from PIL import Image

from .decode import check_dimensions
from .errors import ImageInputError
from .policy import MAX_PDF_DPI, MIN_PDF_DPI, PDF_MAX_SIDE, ImagePolicy

__all__ = ["render_pdf_page", "fit_pdf_dpi", "validate_dpi", "PDFIUM_LOCK"]

#: Guards every pypdfium2 call made by this package.
PDFIUM_LOCK = threading.Lock()


def validate_dpi(dpi) -> float:
    """Return ``dpi`` as a float if it is a number in 36..600, else raise ImageInputError (400)."""
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not math.isfinite(dpi):
        raise ImageInputError(f"dpi must be a number between {MIN_PDF_DPI} and {MAX_PDF_DPI}")
    if not (MIN_PDF_DPI <= dpi <= MAX_PDF_DPI):
        raise ImageInputError(
            f"dpi {dpi:g} is out of range: it must be between {MIN_PDF_DPI} and {MAX_PDF_DPI}"
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


def render_pdf_page(
    data: bytes, policy: ImagePolicy, page: int = 1, dpi: Optional[float] = None
) -> Tuple[Image.Image, int, float]:
    """Render page ``page`` (1-based) of the PDF in ``data``.

    Returns ``(rgb_image, page_count, dpi_used)``. Raises ImageInputError for an out-of-range
    page, an encrypted or broken PDF, or a PDF with more than ``policy.pdf_max_pages`` pages.
    """
    import pypdfium2 as pdfium

    requested = float(policy.pdf_dpi) if dpi is None else validate_dpi(dpi)
    with PDFIUM_LOCK:
        try:
            document = pdfium.PdfDocument(bytes(data))
        except pdfium.PdfiumError as exc:
            raise _open_error(exc) from None
        except Exception:
            raise ImageInputError("Could not open PDF: the file is damaged or not a valid PDF") from None
        try:
            page_count = len(document)
            if page_count > policy.pdf_max_pages:
                raise ImageInputError(
                    f"PDF has {page_count} pages, more than the limit of {policy.pdf_max_pages}"
                )
            if not 1 <= page <= page_count:
                raise ImageInputError(f"Page {page} out of range: the PDF has {page_count} pages")
            try:
                document.init_forms()  # so that filled-in form fields are drawn
            except Exception:
                pass
            try:
                pdf_page = document[page - 1]
            except Exception:
                raise ImageInputError(f"Could not read page {page} of the PDF") from None
            try:
                width_pt, height_pt = pdf_page.get_size()
                if not (math.isfinite(width_pt) and math.isfinite(height_pt)) or width_pt <= 0 or height_pt <= 0:
                    raise ImageInputError(f"Page {page} of the PDF has an invalid size")
                used = fit_pdf_dpi(width_pt, height_pt, requested, policy.max_model_pixels)
                w_px, h_px = _pixel_size(width_pt, height_pt, used)
                check_dimensions(w_px, h_px, policy)
                try:
                    bitmap = pdf_page.render(
                        scale=used / 72.0, fill_color=(255, 255, 255, 255), rev_byteorder=True
                    )
                except Exception:
                    raise ImageInputError(f"Could not render page {page} of the PDF") from None
                try:
                    # convert() copies, so the image no longer refers to pdfium's buffer.
                    image = bitmap.to_pil().convert("RGB")
                finally:
                    bitmap.close()
            finally:
                pdf_page.close()
        finally:
            document.close()
    return image, page_count, used
