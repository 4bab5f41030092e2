"""Decoding raw image bytes into a validated RGB PIL image, entirely in memory.

Order of operations (nothing is decoded before the size is known to be acceptable):

1. ``Image.open`` reads only the header; the format must be one of PNG, JPEG, WebP, BMP, TIFF, GIF.
2. The header's width x height is checked against ``policy.max_image_pixels`` (413) and the
   aspect-ratio limit of the model's resize rule (400).
3. The pixels of the first frame are decoded; truncated or corrupt data answers 400.
4. The EXIF orientation is applied, then the image is converted to 8-bit RGB: alpha is
   composited on white, grayscale/palette/1-bit/CMYK are converted, 16/32-bit and float
   samples are rescaled (not clipped) to 8 bits.

Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) is left as configured
globally; its error is reported as 413 and its warning is silenced for images that passed our
own, earlier check. This module never changes global PIL state.
"""
from __future__ import annotations

import io
import re
import warnings

from PIL import Image, ImageOps

from .errors import ImageInputError
from .policy import MAX_ASPECT_RATIO, ImagePolicy

__all__ = ["ALLOWED_FORMATS", "decode_image_bytes", "check_dimensions", "is_pdf_bytes", "to_rgb"]

#: Pillow format names accepted for images (PDF is handled separately).
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")

_WHITE = (255, 255, 255)

# Magic numbers of the image formats we accept: a file that starts with one of these is an
# image even if "%PDF-" happens to appear in its first kilobyte.
_IMAGE_MAGICS = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",
    b"MM\x00+",
)


def is_pdf_bytes(data: bytes) -> bool:
    """True when ``data`` looks like a PDF: ``%PDF-`` at the start, or (as PDF readers allow)
    within the first 1024 bytes of something that is not one of the accepted image formats."""
    head = bytes(data[:1024])
    if head.startswith(b"%PDF-"):
        return True
    if head.startswith(_IMAGE_MAGICS) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return False
    return b"%PDF-" in head


def check_dimensions(width: int, height: int, policy: ImagePolicy) -> None:
    """Raise ImageInputError unless ``width`` x ``height`` is an acceptable image size."""
    if width < 1 or height < 1:
        raise ImageInputError(f"Image has an invalid size: {width} x {height} pixels")
    pixels = width * height
    if pixels > policy.max_image_pixels:
        raise ImageInputError(
            f"Image too large: {width} x {height} pixels exceeds the limit of "
            f"{policy.max_image_pixels} pixels",
            status=413,
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageInputError(
            f"Image aspect ratio is too extreme: {width} x {height} pixels (ratio {ratio:.1f}) "
            f"exceeds the maximum of {MAX_ASPECT_RATIO}:1"
        )


def _bomb_error(exc: Exception, policy: ImagePolicy) -> ImageInputError:
    # Pillow's message reads "Image size (N pixels) exceeds limit of M pixels, ..."; its own limit
    # is not ours, so only the pixel count is reused.
    match = re.search(r"\((\d+) pixels\)", str(exc))
    what = f"{match.group(1)} pixels" if match else "the image"
    return ImageInputError(
        f"Image too large: {what} exceeds the limit of {policy.max_image_pixels} pixels",
        status=413,
    )


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """Map high-bit-depth single-channel images (I;16*, I, F) to mode L by rescaling."""
    mode = image.mode
    if mode.startswith("I;16"):
        # 16-bit samples: 0..65535 -> 0..255 (Pillow's convert("L") would clip instead).
        return image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if mode == "I":
        low, high = image.getextrema()
        if low >= 0 and high <= 255:
            return image.convert("L")
        top = 65535 if (low >= 0 and high <= 65535) else max(abs(low), abs(high), 1)
        return image.point(lambda v: v * (255 / top)).convert("L")
    if mode == "F":
        low, high = image.getextrema()
        if low >= 0 and high <= 1.0:
            top = 1.0
        elif low >= 0 and high <= 255:
            top = 255.0
        else:
            top = max(abs(low), abs(high), 1.0)
        return image.point(lambda v: v * (255 / top)).convert("L")
    return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB", "1") and "transparency" in image.info
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded PIL image to 8-bit RGB, compositing transparency onto white."""
    image = _scale_to_8bit(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def decode_image_bytes(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Decode ``data`` (an image file's bytes) into an RGB image, enforcing ``policy``.

    Only the first frame of animated/multi-page images (GIF, WebP, TIFF) is used.
    """
    if not data:
        raise ImageInputError("Image data is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, policy) from None
    except Image.UnidentifiedImageError:
        raise ImageInputError(
            "Could not decode image: unrecognised or unsupported format "
            "(supported: PNG, JPEG, WebP, BMP, TIFF, GIF, PDF)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - corrupt headers raise many kinds of errors inside Pillow
        raise ImageInputError(f"Could not decode image: {_describe(exc)}") from None

    try:
        width, height = image.size
        check_dimensions(width, height, policy)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
        except Image.DecompressionBombError as exc:
            raise _bomb_error(exc, policy) from None
        except ImageInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoding a corrupt image raises many kinds of errors
            raise ImageInputError(f"Could not decode image: {_describe(exc)}") from None

        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - a bad EXIF block (see below)
            # A malformed EXIF block must not make an otherwise good image unusable.
            oriented = image
        if oriented is None:  # older Pillow with in_place semantics
            oriented = image
        try:
            rgb = to_rgb(oriented)
        except Exception as exc:  # noqa: BLE001 - a color mode Pillow cannot convert, however it says so
            raise ImageInputError(f"Could not decode image: unsupported color mode ({_describe(exc)})") from None
        if rgb is image:
            rgb = image.copy()
        rgb.info.clear()
        return rgb
    finally:
        image.close()


def _describe(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    # Keep it short and single-line: it goes back to the client.
    text = " ".join(text.split())
    return text[:200]
