"""Request image -> validated RGB PIL image; limits and safety policies; the model's 28-pixel
smart resize and coordinate mapping; PDF pages.

Public API::

    from image_utils import (ImageInputError, ImagePolicy, LoadedImage, load_document, load_image,
                             smart_resize_dims, resize_for_model, to_model_coords, to_original_coords)
"""
from .errors import ImageInputError
from .geometry import (
    IMAGE_FACTOR,
    MAX_PIXELS,
    MIN_PIXELS,
    resize_for_model,
    smart_resize_dims,
    to_model_coords,
    to_original_coords,
)
from .loader import IMAGE_FORMATS, LoadedImage, load_document, load_image
from .policy import ImagePolicy

__all__ = [
    "IMAGE_FACTOR",
    "IMAGE_FORMATS",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "ImageInputError",
    "ImagePolicy",
    "LoadedImage",
    "load_document",
    "load_image",
    "resize_for_model",
    "smart_resize_dims",
    "to_model_coords",
    "to_original_coords",
]
