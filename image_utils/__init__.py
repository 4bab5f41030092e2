"""Request image -> validated RGB PIL image; limits and safety policies; the model's 28-pixel
smart resize and coordinate mapping; PDF pages.

Public API (other packages import only these names, from ``image_utils`` itself)::

    from image_utils import (ImageInputError, ImagePolicy, LoadedImage, load_document, load_image,
                             smart_resize_dims, resize_for_model, to_model_coords, to_original_coords,
                             clip_for_message, decode_image_bytes, is_pdf_bytes, pdf_page_count,
                             PDFIUM_LOCK, give_back_freed_memory)
"""
from .decode import ALLOWED_FORMATS, decode_image_bytes, is_pdf_bytes
from .errors import ImageInputError, clip_for_message
from .geometry import (
    IMAGE_FACTOR,
    MAX_PIXELS,
    MIN_PIXELS,
    resize_for_model,
    smart_resize_dims,
    to_model_coords,
    to_original_coords,
)
from .loader import IMAGE_FORMATS, LoadedImage, load_bytes_document, load_document, load_image
from .memory import give_back_freed_memory
from .pdf import PDFIUM_LOCK, pdf_page_count
from .policy import ImagePolicy

__all__ = [
    "ALLOWED_FORMATS",
    "IMAGE_FACTOR",
    "IMAGE_FORMATS",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "PDFIUM_LOCK",
    "ImageInputError",
    "ImagePolicy",
    "LoadedImage",
    "clip_for_message",
    "decode_image_bytes",
    "give_back_freed_memory",
    "is_pdf_bytes",
    "load_bytes_document",
    "load_document",
    "load_image",
    "pdf_page_count",
    "resize_for_model",
    "smart_resize_dims",
    "to_model_coords",
    "to_original_coords",
]
