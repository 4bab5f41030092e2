"""Tests for image_utils: sources (path / base64 / url), decoding, PDF pages, geometry.

Everything is generated in-test except the two sample files in samples/. URL tests only ever
talk to a server on 127.0.0.1 started here; refusals of other addresses happen before any
connection is attempted.
"""
from __future__ import annotations

import base64
import io
import math
import os
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import image_utils
from image_utils import (
    ImageInputError,
    ImagePolicy,
    LoadedImage,
    load_document,
    load_image,
    resize_for_model,
    smart_resize_dims,
    to_model_coords,
    to_original_coords,
)
from image_utils import url_fetch
from serverproc import local_origin

DATA = Path(__file__).resolve().parents[1] / "samples"


# --------------------------------------------------------------------------------------------
# helpers


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def load_b64(data: bytes, policy: ImagePolicy | None = None, **kw) -> LoadedImage:
    return load_document(b64(data), "base64", policy or ImagePolicy(), **kw)


def expect_error(status: int, fragment: str, fn, *args, **kwargs) -> ImageInputError:
    with pytest.raises(ImageInputError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.status == status, (err.status, err.message)
    assert fragment.lower() in err.message.lower(), err.message
    assert str(err) == err.message
    return err


def close(a, b, tol=3) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def make_pdf(sizes, marks=()) -> bytes:
    """A PDF with one page per (width, height) in points; page indices in ``marks`` get a black
    rectangle over their top half."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    doc = pdfium.PdfDocument.new()
    try:
        for index, (w, h) in enumerate(sizes):
            page = doc.new_page(w, h)
            if index in marks:
                rect = pdfium_c.FPDFPageObj_CreateNewRect(0, h / 2, w, h / 2)
                pdfium_c.FPDFPageObj_SetFillColor(rect, 0, 0, 0, 255)
                pdfium_c.FPDFPath_SetDrawMode(rect, pdfium_c.FPDF_FILLMODE_ALTERNATE, False)
                pdfium_c.FPDFPage_InsertObject(page.raw, rect)
                pdfium_c.FPDFPage_GenerateContent(page.raw)
            page.close()
        buf = io.BytesIO()
        doc.save(buf)
        return buf.getvalue()
    finally:
        doc.close()


def handwritten_pdf(objects, trailer_extra=b"") -> bytes:
    """Assemble a PDF from object bodies (numbered from 1; object 1 is the catalog)."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R " % (len(objects) + 1) + trailer_extra + b" >>\n"
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def encrypted_pdf() -> bytes:
    """A PDF protected by the standard security handler with a non-empty user password (the /U
    entry does not match the empty password, so a reader must ask for one)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
        b"<< /Filter /Standard /V 1 /R 2 /Length 40 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32
        + b"> /P -4 >>",
    ]
    file_id = b"<" + b"ab" * 16 + b">"
    return handwritten_pdf(objects, b"/Encrypt 4 0 R /ID [" + file_id + b" " + file_id + b"]")


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` but whose pixel data is a few bytes: it can
    only be rejected from the header, decoding it would fail."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------------------------
# public API surface


def test_public_api_names():
    for name in (
        "ImageInputError",
        "ImagePolicy",
        "LoadedImage",
        "load_document",
        "load_image",
        "smart_resize_dims",
        "resize_for_model",
        "to_model_coords",
        "to_original_coords",
    ):
        assert hasattr(image_utils, name), name
    assert issubclass(ImageInputError, ValueError)
    err = ImageInputError("boom")
    assert (err.message, err.status) == ("boom", 400)
    assert ImageInputError("big", status=413).status == 413
    policy = ImagePolicy()
    assert policy.image_root is None and policy.allow_private_urls is False
    assert policy.max_image_pixels == 100_000_000
    assert policy.max_download_bytes == 50 * 1024 * 1024
    assert (policy.url_connect_timeout, policy.url_read_timeout, policy.max_redirects) == (5, 20, 3)
    assert (policy.pdf_dpi, policy.max_pdf_pages, policy.max_model_pixels) == (200, 2000, 11_289_600)
    assert (policy.url_total_timeout, policy.pdf_render_timeout) == (120, 15)


# --------------------------------------------------------------------------------------------
# decoding of every accepted format


def test_rgba_png_composited_on_white():
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    image.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    result = load_b64(encode(image, "PNG"))
    assert result.source_kind == "image" and result.page is None and result.page_count is None
    out = result.image
    assert out.mode == "RGB" and out.size == (4, 2)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    assert close(out.getpixel((2, 0)), (127, 127, 127), tol=2)


def test_la_and_palette_transparency_on_white():
    la = Image.new("LA", (3, 3), (0, 0))
    assert load_b64(encode(la, "PNG")).image.getpixel((1, 1)) == (255, 255, 255)
    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    out = load_b64(encode(pal, "PNG", transparency=0)).image
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (0, 0, 255)


def test_gif_first_frame_of_two():
    frames = [Image.new("RGB", (6, 5), (255, 0, 0)), Image.new("RGB", (6, 5), (0, 255, 0))]
    frames = [f.convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = load_b64(data).image
    assert out.mode == "RGB" and out.size == (6, 5)
    assert close(out.getpixel((2, 2)), (255, 0, 0))


def test_one_bit_bmp():
    image = Image.new("1", (9, 7), 1)
    image.putpixel((0, 0), 0)
    out = load_b64(encode(image, "BMP")).image
    assert out.mode == "RGB" and out.size == (9, 7)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_png_is_rescaled_not_clipped():
    image = Image.new("I;16", (4, 4), 40000)
    image.putpixel((0, 0), 65535)
    image.putpixel((1, 0), 0)
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = load_b64(data).image
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 0)
    assert close(out.getpixel((2, 2)), (155, 155, 155), tol=1)  # 40000 / 257


def test_cmyk_jpeg():
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    data = encode(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_b64(data).image
    assert out.mode == "RGB" and out.size == (16, 16)
    assert close(out.getpixel((8, 8)), (255, 0, 0), tol=12)


def test_grayscale_jpeg_tiff_and_webp():
    gray = Image.new("L", (10, 8), 77)
    assert load_b64(encode(gray, "JPEG", quality=100)).image.getpixel((3, 3)) == (77, 77, 77)
    rgb = Image.new("RGB", (12, 10), (10, 200, 30))
    for fmt, params in (("TIFF", {"compression": "tiff_lzw"}), ("WEBP", {"lossless": True}), ("BMP", {})):
        out = load_b64(encode(rgb, fmt, **params)).image
        assert out.mode == "RGB" and out.size == (12, 10), fmt
        assert out.getpixel((5, 5)) == (10, 200, 30), fmt
    rgba_tiff = encode(Image.new("RGBA", (5, 5), (0, 0, 0, 0)), "TIFF")
    assert load_b64(rgba_tiff).image.getpixel((2, 2)) == (255, 255, 255)


def test_exif_orientation_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored image rotated 90 degrees clockwise
    out = load_b64(encode(image, "JPEG", quality=95, exif=exif.tobytes())).image
    assert out.size == (20, 40)
    assert close(out.getpixel((10, 5)), (255, 0, 0), tol=20)  # the left half is now on top
    assert close(out.getpixel((10, 35)), (0, 0, 255), tol=20)


def test_sample_png_from_disk():
    out = load_image(str(DATA / "demo_image2.png"), "path", ImagePolicy())
    assert out.mode == "RGB" and out.size == Image.open(DATA / "demo_image2.png").size


# --------------------------------------------------------------------------------------------
# bad images


def test_bomb_rejected_from_header_before_decoding():
    # 11000 x 10000 = 110 Mpx: above our 100 Mpx cap, below Pillow's own limit (2 x 89.5 Mpx).
    err = expect_error(413, "Image too large: 11000 x 10000 pixels exceeds the limit of 100000000", load_b64,
                       png_with_header_size(11000, 10000))
    assert "could not decode" not in err.message.lower()
    # 100000 x 100000: Pillow's own guard fires inside Image.open; still a clean 413.
    expect_error(413, "Image too large", load_b64, png_with_header_size(100_000, 100_000))
    # A real, decodable image over a custom cap.
    expect_error(413, "20 x 20 pixels exceeds the limit of 100", load_b64,
                 encode(Image.new("RGB", (20, 20)), "PNG"), ImagePolicy(max_image_pixels=100))


@pytest.mark.slow
def test_real_compressed_bomb_rejected():
    # A genuine 1-bit 10500 x 10500 PNG (110 Mpx) that compresses to a few kB.
    data = encode(Image.new("1", (10500, 10500), 1), "PNG", optimize=False)
    assert len(data) < 300_000
    expect_error(413, "10500 x 10500 pixels", load_b64, data)


def test_truncated_and_non_images():
    jpeg = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    expect_error(400, "Could not decode image", load_b64, jpeg[: len(jpeg) // 2])
    png = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    expect_error(400, "Could not decode image", load_b64, png[: len(png) - 200])
    expect_error(400, "Could not decode image", load_b64, b"hello, this is not an image at all")
    expect_error(400, "Could not decode image", load_b64, b"\x89PNG\r\n\x1a\n garbage")
    # A format Pillow knows but we do not accept.
    expect_error(400, "Could not decode image", load_b64, encode(Image.new("RGB", (4, 4)), "PPM"))


def test_aspect_ratio_limit():
    ok = load_b64(encode(Image.new("RGB", (200, 1)), "PNG")).image
    assert ok.size == (200, 1)
    assert load_b64(encode(Image.new("RGB", (1, 150)), "PNG")).image.size == (1, 150)
    expect_error(400, "aspect ratio", load_b64, encode(Image.new("RGB", (201, 1)), "PNG"))
    expect_error(400, "aspect ratio", load_b64, encode(Image.new("RGB", (1, 300)), "PNG"))


def test_tiny_images_accepted():
    out = load_b64(encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")).image
    assert out.size == (1, 1)
    assert resize_for_model(out).size == (56, 56)


# --------------------------------------------------------------------------------------------
# base64 and data URIs


PNG_SMALL = encode(Image.new("RGB", (7, 5), (1, 2, 3)), "PNG")


def test_base64_variants():
    policy = ImagePolicy()
    text = b64(PNG_SMALL)
    assert load_image(text, "base64", policy).size == (7, 5)
    wrapped = "\n".join(text[i : i + 20] for i in range(0, len(text), 20)) + "\n"
    assert load_image("  " + wrapped.replace("\n", "\r\n "), "base64", policy).size == (7, 5)
    assert load_image(text.rstrip("="), "base64", policy).size == (7, 5)  # padding missing
    urlsafe = base64.urlsafe_b64encode(PNG_SMALL).decode()
    assert load_image(urlsafe, "base64", policy).size == (7, 5)


def test_data_uri_whatever_the_format_says():
    uri = "data:image/png;base64," + b64(PNG_SMALL)
    for fmt in ("base64", "path", "url", None):
        assert load_image(uri, fmt, ImagePolicy()).size == (7, 5)
    assert load_image("DATA:image/PNG;BASE64," + b64(PNG_SMALL), "path", ImagePolicy()).size == (7, 5)
    pdf = make_pdf([(72, 144)])
    doc = load_document("data:application/pdf;base64," + b64(pdf), "path", ImagePolicy(), dpi=72)
    assert doc.source_kind == "pdf" and doc.image.size == (72, 144)
    expect_error(400, "only base64", load_image, "data:image/png,rawbytes", "base64", ImagePolicy())


def test_invalid_base64():
    for bad in ("not base64!!", "abcde", "QUJD$$$", "data:image/png;base64,@@@@"):
        expect_error(400, "Invalid base64 image data", load_image, bad, "base64", ImagePolicy())
    expect_error(400, "No image data provided", load_image, "   ", "base64", ImagePolicy())
    expect_error(400, "No image data provided", load_image, "data:image/png;base64,", "base64", ImagePolicy())


def test_base64_size_cap():
    policy = ImagePolicy(max_download_bytes=len(PNG_SMALL) - 1)
    expect_error(413, "exceeds the limit", load_image, b64(PNG_SMALL), "base64", policy)
    assert load_image(b64(PNG_SMALL), "base64", ImagePolicy(max_download_bytes=len(PNG_SMALL))).size == (7, 5)
    expect_error(413, "exceeds the limit", load_image, "A" * 10_000, "base64", ImagePolicy(max_download_bytes=100))


def test_bad_format_and_value():
    err = expect_error(400, "image_format", load_image, b64(PNG_SMALL), "jpeg", ImagePolicy())
    for allowed in ("path", "url", "base64"):
        assert allowed in err.message
    expect_error(400, "image must be a string", load_image, b"bytes", "base64", ImagePolicy())
    expect_error(400, "No image data provided", load_image, "", "path", ImagePolicy())
    assert load_image(b64(PNG_SMALL), "BASE64", ImagePolicy()).size == (7, 5)


def test_page_argument_for_images():
    expect_error(400, "Page 2 out of range", load_b64, PNG_SMALL, page=2)
    for bad in (0, -1, True, 1.5, "1"):
        expect_error(400, "page must be", load_b64, PNG_SMALL, page=bad)
    assert load_b64(PNG_SMALL, dpi=300).image.size == (7, 5)  # dpi is ignored for images


# --------------------------------------------------------------------------------------------
# paths


def test_path_ok_and_relative_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(PNG_SMALL)
    assert load_image(str(tmp_path / "a.png"), "path", ImagePolicy()).size == (7, 5)
    monkeypatch.chdir(tmp_path)
    assert load_image("a.png", "path", ImagePolicy()).size == (7, 5)
    assert load_image("a.png", None, ImagePolicy()).size == (7, 5)  # the API default is "path"


def test_path_errors(tmp_path):
    policy = ImagePolicy()
    missing = str(tmp_path / "nope.png")
    expect_error(400, f"Image file not found: {missing}", load_image, missing, "path", policy)
    expect_error(400, "directory", load_image, str(tmp_path), "path", policy)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    expect_error(400, "not a regular file", load_image, str(fifo), "path", policy)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    expect_error(400, "empty", load_image, str(empty), "path", policy)
    big = tmp_path / "big.png"
    big.write_bytes(PNG_SMALL)
    expect_error(413, "too large", load_image, str(big), "path", ImagePolicy(max_download_bytes=10))
    expect_error(400, "NUL", load_image, "a\x00b", "path", policy)


def test_unreadable_path_reported(tmp_path, monkeypatch):
    """EACCES on open (simulated: the tests may run as root, who can read anything)."""
    target = tmp_path / "locked.png"
    target.write_bytes(PNG_SMALL)
    real_open = os.open

    def guarded_open(path, flags, *args, **kwargs):
        if os.fspath(path) == str(target):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    expect_error(400, f"Image file is not readable: {target}", load_image, str(target), "path", ImagePolicy())


def test_image_root_confinement(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "in.png").write_bytes(PNG_SMALL)
    outside = tmp_path / "outside.png"
    outside.write_bytes(PNG_SMALL)
    (root / "escape.png").symlink_to(outside)
    (root / "inner_link.png").symlink_to(root / "sub" / "in.png")
    (root / "dir_escape").symlink_to(tmp_path)
    policy = ImagePolicy(image_root=str(root))
    monkeypatch.chdir(root)  # relative paths resolve against the working directory

    assert load_image(str(root / "sub" / "in.png"), "path", policy).size == (7, 5)
    assert load_image("sub/in.png", "path", policy).size == (7, 5)
    assert load_image("inner_link.png", "path", policy).size == (7, 5)  # symlink staying inside
    outside_msg = "Image path is outside the allowed image root"
    for value in (str(outside), "escape.png", "../outside.png", "sub/../../outside.png",
                  "dir_escape/outside.png", "/etc/passwd"):
        expect_error(400, outside_msg, load_image, value, "path", policy)
    # Existence of files outside the root is not revealed.
    expect_error(400, outside_msg, load_image, str(tmp_path / "does-not-exist.png"), "path", policy)
    expect_error(400, "Image file not found: sub/missing.png", load_image, "sub/missing.png", "path", policy)
    monkeypatch.chdir(tmp_path)  # the same relative name, now resolved outside the root
    expect_error(400, outside_msg, load_image, "outside.png", "path", policy)
    expect_error(400, outside_msg, load_image, "sub/in.png", "path", policy)
    # A root given through a symlink works too.
    (tmp_path / "root_link").symlink_to(root)
    assert load_image("root/sub/in.png", "path", ImagePolicy(image_root=str(tmp_path / "root_link"))).size == (7, 5)
    # A sibling directory whose name starts with the root's name is outside.
    (tmp_path / "root2").mkdir()
    (tmp_path / "root2" / "x.png").write_bytes(PNG_SMALL)
    expect_error(400, outside_msg, load_image, str(tmp_path / "root2" / "x.png"), "path", policy)


# --------------------------------------------------------------------------------------------
# PDFs


def test_pdf_page_selection_and_dpi(tmp_path):
    pdf = make_pdf([(144, 72), (72, 216), (100, 50)], marks={1})
    path = tmp_path / "doc.bin"  # content decides, not the extension or image_format
    path.write_bytes(pdf)
    policy = ImagePolicy()
    first = load_document(str(path), "path", policy)
    assert (first.source_kind, first.page, first.page_count, first.dpi) == ("pdf", 1, 3, 200.0)
    assert first.image.mode == "RGB" and first.image.size == (400, 200)
    second = load_document(str(path), "path", policy, page=2, dpi=72)
    assert second.image.size == (72, 216) and second.page == 2
    assert second.image.getpixel((36, 10)) == (0, 0, 0)  # the black top half: the right page
    assert second.image.getpixel((36, 200)) == (255, 255, 255)
    third = load_document(b64(pdf), "base64", policy, page=3, dpi=144.0)
    assert third.image.size == (200, 100)
    assert load_image(str(path), "path", policy).size == (400, 200)  # load_image: page 1
    expect_error(400, "Page 4 out of range: the PDF has 3 pages", load_document, str(path), "path", policy, page=4)
    for bad_dpi in (35, 601, 0, float("nan"), True, "200"):
        expect_error(400, "dpi", load_document, str(path), "path", policy, dpi=bad_dpi)
    expect_error(413, "PDF has 3 pages, more than the limit of 2 pages", load_document, str(path), "path",
                 ImagePolicy(max_pdf_pages=2))


def test_pdf_rotated_page():
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument.new()
    page = doc.new_page(100, 300)
    page.set_rotation(90)
    page.close()
    buf = io.BytesIO()
    doc.save(buf)
    doc.close()
    assert load_b64(buf.getvalue(), dpi=72).image.size == (300, 100)


def test_pdf_dpi_fallback_keeps_model_limits():
    # 2000 x 1000 pt at 200 dpi would be 5556 x 2778 px: the side limit (4500) applies.
    doc = load_b64(make_pdf([(2000, 1000)]))
    w, h = doc.image.size
    assert max(w, h) <= 4500 and w * h <= 11_289_600 and doc.dpi < 200
    assert w >= 4490  # lowered just enough
    # A large square page hits the area limit first.
    doc = load_b64(make_pdf([(1500, 1500)]))
    w, h = doc.image.size
    assert w * h <= 11_289_600 and w * h > 11_000_000 and max(w, h) <= 4500
    # A custom, smaller model budget.
    doc = load_b64(make_pdf([(595, 842)]), ImagePolicy(max_model_pixels=1_000_000))
    w, h = doc.image.size
    assert w * h <= 1_000_000 and w * h > 950_000
    # Normal pages keep the requested resolution.
    assert load_b64(make_pdf([(595, 842)])).image.size == (1653, 2339)


def test_pdf_fit_rule_exhaustively():
    from image_utils.pdf import fit_pdf_dpi

    for w_pt in (1, 13.3, 100, 595.2, 842, 1190.55, 5000, 14400):
        for h_pt in (1, 50.5, 612, 792, 3000, 14400):
            for dpi in (36, 72, 200, 600):
                used = fit_pdf_dpi(w_pt, h_pt, dpi, 11_289_600)
                w, h = math.ceil(w_pt * used / 72), math.ceil(h_pt * used / 72)
                assert used <= dpi and max(w, h) <= 4500 and w * h <= 11_289_600
                if used < dpi:  # lowered: by well under 1 %
                    w2, h2 = math.ceil(w_pt * used * 1.01 / 72), math.ceil(h_pt * used * 1.01 / 72)
                    assert max(w2, h2) > 4500 or w2 * h2 > 11_289_600


def test_sample_pdf():
    policy = ImagePolicy()
    doc = load_document(str(DATA / "demo_pdf1.pdf"), "path", policy, page=2)
    assert doc.page_count == 2 and doc.page == 2 and doc.image.mode == "RGB"
    w, h = doc.image.size
    assert w * h <= policy.max_model_pixels and max(w, h) <= 4500
    # Not blank.
    assert doc.image.convert("L").getextrema()[0] < 100


def test_broken_and_encrypted_pdfs():
    pdf = make_pdf([(100, 100)])
    expect_error(400, "Could not open PDF", load_b64, pdf[: len(pdf) // 3])
    expect_error(400, "Could not open PDF", load_b64, b"%PDF-1.7\nthis is not really a pdf")
    expect_error(400, "encrypted", load_b64, encrypted_pdf())
    # The hand-written assembler itself produces a readable file when not encrypted.
    plain = handwritten_pdf([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
    ])
    assert load_b64(plain, dpi=72).image.size == (200, 200)


def test_pdf_rendering_from_threads():
    pdf = make_pdf([(72, 72), (144, 72)])
    results, errors = [], []

    def work(page):
        try:
            results.append(load_b64(pdf, page=page, dpi=72).image.size)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(1 + i % 2,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [(72, 72)] * 4 + [(144, 72)] * 4


# --------------------------------------------------------------------------------------------
# URLs (a local server on 127.0.0.1 only)


IMAGE_BYTES = encode(Image.new("RGB", (11, 13), (0, 128, 255)), "PNG")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    log: list = []

    def log_message(self, *args):  # keep the test output quiet
        pass

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        if not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        _Handler.log.append((self.path, self.headers.get("Host")))
        path = self.path
        if path == "/img.png":
            self._send(200, IMAGE_BYTES, [("Content-Type", "image/png")])
        elif path == "/doc.pdf":
            self._send(200, make_pdf([(72, 36)]), [("Content-Type", "application/pdf")])
        elif path.startswith("/redirect/"):
            n = int(path.rsplit("/", 1)[1])
            target = "/img.png" if n <= 1 else f"/redirect/{n - 1}"  # n redirects in all
            self._send(302, b"", [("Location", target)])
        elif path == "/to-file":
            self._send(302, b"", [("Location", "file:///etc/passwd")])
        elif path == "/to-other-loopback":
            port = self.server.server_address[1]
            self._send(301, b"", [("Location", f"http://127.0.0.2:{port}/img.png")])
        elif path == "/big-declared":
            self._send(200, b"x" * 5000)
        elif path == "/big-streamed":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"y" * 1000)
            self.close_connection = True
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMAGE_BYTES)))
            self.end_headers()
            self.wfile.flush()
            time.sleep(1.5)
            try:
                self.wfile.write(IMAGE_BYTES)
            except OSError:
                pass
        elif path == "/empty":
            self._send(200, b"")
        else:
            self._send(404, b"not found")


@pytest.fixture(scope="module")
def server():
    with local_origin(_Handler) as url:
        yield url


OPEN = ImagePolicy(allow_private_urls=True)


def test_url_ok(server):
    _Handler.log.clear()
    assert load_image(server + "/img.png", "url", OPEN).size == (11, 13)
    doc = load_document(server + "/doc.pdf", "url", OPEN, dpi=144)
    assert doc.source_kind == "pdf" and doc.image.size == (144, 72)
    assert _Handler.log[0][1] == server.split("//", 1)[1]


def test_url_private_refused_without_connecting(server):
    _Handler.log.clear()
    expect_error(400, "not allowed", load_image, server + "/img.png", "url", ImagePolicy())
    port = server.rsplit(":", 1)[1]
    expect_error(400, "not allowed", load_image, f"http://localhost:{port}/img.png", "url", ImagePolicy())
    assert _Handler.log == []  # nothing was sent


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://[::ffff:10.0.0.1]/x.png",
        "http://[fe80::1]/x.png",
        "http://0.0.0.0/x.png",
        "http://192.168.1.1:8080/x.png",
        "http://100.64.0.1/x.png",
        "http://224.0.0.1/x.png",
        "http://127.1/x.png",
        "https://2130706433/x.png",
    ],
)
def test_url_private_literals_refused(url, monkeypatch):
    def no_connections(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_connections)
    monkeypatch.setattr(socket.socket, "connect", no_connections)
    expect_error(400, "not allowed", load_image, url, "url", ImagePolicy())


def test_forbidden_address_predicate():
    import ipaddress

    forbidden = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254", "100.64.0.1",
                 "0.0.0.0", "255.255.255.255", "224.0.0.1", "240.0.0.1", "::1", "::", "fe80::1",
                 "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:192.168.0.1", "64:ff9b::a00:1",
                 "2002:a00:1::1", "::127.0.0.1"]
    allowed = ["8.8.8.8", "93.184.216.34", "2001:4860:4860::8888", "2606:4700:4700::1111"]
    for text in forbidden:
        assert url_fetch.is_forbidden_address(ipaddress.ip_address(text)), text
    for text in allowed:
        assert not url_fetch.is_forbidden_address(ipaddress.ip_address(text)), text


def test_url_schemes_and_syntax():
    for url, fragment in (("ftp://example.com/a.png", "scheme"), ("file:///etc/passwd", "scheme"),
                          ("gopher://x/", "scheme"), ("example.com/a.png", "http"),
                          ("http:///nohost", "no host"), ("http://host:99999/", "Invalid image URL")):
        expect_error(400, fragment, load_image, url, "url", ImagePolicy())


def test_url_redirects(server):
    assert load_image(server + "/redirect/3", "url", OPEN).size == (11, 13)
    expect_error(400, "Too many redirects", load_image, server + "/redirect/4", "url", OPEN)
    expect_error(400, "Too many redirects", load_image, server + "/redirect/1", "url",
                 ImagePolicy(allow_private_urls=True, max_redirects=0))
    expect_error(400, "scheme", load_image, server + "/to-file", "url", OPEN)


def test_url_redirect_hop_rechecked(server, monkeypatch):
    """Only the first hop's address (127.0.0.1) is allowed: the redirect to 127.0.0.2 is refused."""
    import ipaddress

    original = url_fetch.is_forbidden_address
    monkeypatch.setattr(url_fetch, "is_forbidden_address",
                        lambda a: a != ipaddress.ip_address("127.0.0.1") and original(a))
    assert load_image(server + "/img.png", "url", ImagePolicy()).size == (11, 13)
    _Handler.log.clear()
    expect_error(400, "not allowed", load_image, server + "/to-other-loopback", "url", ImagePolicy())
    assert [p for p, _ in _Handler.log] == ["/to-other-loopback"]


def test_url_size_cap(server):
    small = ImagePolicy(allow_private_urls=True, max_download_bytes=1000)
    expect_error(413, "exceeds the limit of 1000 bytes", load_image, server + "/big-declared", "url", small)
    expect_error(413, "exceeds the limit of 1000 bytes", load_image, server + "/big-streamed", "url", small)


def test_url_http_errors_and_timeouts(server):
    expect_error(400, "HTTP 404", load_image, server + "/missing.png", "url", OPEN)
    expect_error(400, "empty", load_image, server + "/empty", "url", OPEN)
    quick = ImagePolicy(allow_private_urls=True, url_read_timeout=0.3)
    start = time.monotonic()
    expect_error(400, "Timed out", load_image, server + "/slow", "url", quick)
    # the body comes after 1.5 s: the error (not an image) and the time show the 0.3 s read timeout
    assert time.monotonic() - start < 1.5
    # A closed port on loopback: connection refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    expect_error(400, "Could not connect", load_image, f"http://127.0.0.1:{free_port}/x.png", "url", OPEN)


def test_url_host_resolved_once_and_pinned(server, monkeypatch):
    """The name is resolved once, by us; the request goes to the checked address with the
    original Host header (requests/urllib3 never resolve the name themselves)."""
    port = int(server.rsplit(":", 1)[1])
    real_getaddrinfo = socket.getaddrinfo
    lookups = []

    def fake_getaddrinfo(host, *args, **kwargs):
        if host == "images.example.test":
            lookups.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        if host not in ("127.0.0.1", "localhost"):  # pragma: no cover - must not happen
            raise AssertionError(f"unexpected lookup of {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    _Handler.log.clear()
    assert load_image(f"http://images.example.test:{port}/img.png", "url", OPEN).size == (11, 13)
    assert lookups == ["images.example.test"]
    assert _Handler.log == [("/img.png", f"images.example.test:{port}")]
    lookups.clear()
    expect_error(400, "not allowed", load_image, f"http://images.example.test:{port}/img.png", "url", ImagePolicy())
    assert lookups == ["images.example.test"]


def _fake_resolver(monkeypatch, names: dict, lookups: list):
    """Make socket.getaddrinfo answer ``names`` (host -> list of IPv4 literals); loopback
    literals resolve normally; anything else fails the test."""
    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host, port, *args, **kwargs):
        if host in names:
            lookups.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in names[host]]
        if not str(host).startswith("127."):  # pragma: no cover - must not happen
            raise AssertionError(f"unexpected lookup of {host!r}")
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)


def test_url_next_address_when_connect_fails(server, monkeypatch):
    port = int(server.rsplit(":", 1)[1])
    lookups = []
    # Nothing listens on 127.0.0.3 (the test server is bound to 127.0.0.1 only).
    _fake_resolver(monkeypatch, {"multi.example.test": ["127.0.0.3", "127.0.0.1"]}, lookups)
    _Handler.log.clear()
    assert load_image(f"http://multi.example.test:{port}/img.png", "url", OPEN).size == (11, 13)
    assert lookups == ["multi.example.test"]
    assert _Handler.log == [("/img.png", f"multi.example.test:{port}")]


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 whose self-signed certificate names images.example.test;
    it records the SNI names clients send."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=images.example.test",
         "-addext", "subjectAltName=DNS:images.example.test"],
        check=True, capture_output=True, timeout=30,
    )
    sni_names = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    context.sni_callback = lambda sock, name, ctx: sni_names.append(name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], str(cert), sni_names
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_https_pinned_address_verifies_the_name(tls_server, monkeypatch):
    port, cert, sni_names = tls_server
    lookups = []
    _fake_resolver(monkeypatch, {"images.example.test": ["127.0.0.1"], "other.example.test": ["127.0.0.1"]},
                   lookups)
    url = f"https://images.example.test:{port}/img.png"
    # The default trust store does not know our self-signed certificate: refused.
    expect_error(400, "TLS error", load_image, url, "url", OPEN)
    monkeypatch.setattr(url_fetch, "_VERIFY", cert)
    sni_names.clear()
    _Handler.log.clear()
    assert load_image(url, "url", OPEN).size == (11, 13)
    assert sni_names == ["images.example.test"]  # SNI carries the name, not the pinned IP
    assert _Handler.log == [("/img.png", f"images.example.test:{port}")]
    # Same address, certificate for a different name: the name check still applies.
    expect_error(400, "TLS error", load_image, f"https://other.example.test:{port}/img.png", "url", OPEN)


def test_unresolvable_host(monkeypatch):
    def fail(*args, **kwargs):
        raise socket.gaierror("no such host")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    expect_error(400, "Could not resolve", load_image, "http://no-such-host.invalid/x.png", "url", ImagePolicy())


# --------------------------------------------------------------------------------------------
# geometry


def test_smart_resize_dims_values():
    from qwen_vl_utils import smart_resize

    assert smart_resize_dims(10, 10) == (56, 56)
    assert smart_resize_dims(50, 50) == (56, 56)
    assert smart_resize_dims(1, 150) == (28, 140)
    assert smart_resize_dims(150, 1) == (140, 28)
    assert smart_resize_dims(1, 200) == (28, 196)
    assert smart_resize_dims(5000, 7000) == (2828, 3948)
    assert smart_resize_dims(1000, 800) == (1008, 812)
    for w, h in ((1, 1), (27, 27), (28, 28), (5600, 28), (28, 5600), (200, 1), (3360, 3360), (4000, 4000),
                 (2339, 3308), (100_000, 500), (13, 2000)):
        nw, nh = smart_resize_dims(w, h)
        assert nw % 28 == 0 and nh % 28 == 0 and nw >= 28 and nh >= 28
        assert 3136 <= nw * nh <= 11_289_600, (w, h, nw, nh)
        assert max(nw, nh) <= 200 * min(nw, nh)
        if min(w, h) >= 28 and (w, h) != (100_000, 500):
            assert (nh, nw) == smart_resize(h, w, 28, 3136, 11_289_600)
        # Fixed point: resizing the result again changes nothing (the processor keeps it as is).
        assert smart_resize_dims(nw, nh) == (nw, nh)
    assert smart_resize_dims(1000, 1000, min_pixels=3136, max_pixels=200_000) == (420, 420)
    # Near the 200:1 limit, flooring would give 47516 x 224 (212:1); the long side is shortened.
    assert smart_resize_dims(100_000, 500) == (44800, 224)
    assert smart_resize_dims(500, 100_000) == (224, 44800)
    # Custom narrow limits: never a side below 28, never above max_pixels.
    nw, nh = smart_resize_dims(200, 1, min_pixels=3136, max_pixels=3136)
    assert (nw, nh) == (112, 28)


def test_smart_resize_dims_errors():
    expect_error(400, "aspect ratio", smart_resize_dims, 201, 1)
    expect_error(400, "aspect ratio", smart_resize_dims, 28, 28 * 201)
    expect_error(400, "invalid size", smart_resize_dims, 0, 10)
    with pytest.raises(ValueError):
        smart_resize_dims(10, 10, min_pixels=100, max_pixels=50)


def test_resize_for_model():
    image = Image.new("RGB", (1000, 800), (5, 6, 7))
    out = resize_for_model(image)
    assert out.size == (1008, 812) and out.mode == "RGB"
    already = Image.new("RGB", (56, 84))
    assert resize_for_model(already) is already
    assert resize_for_model(Image.new("RGB", (1, 150))).size == (28, 140)
    assert resize_for_model(image, min_pixels=3136, max_pixels=200_000).size == (476, 392)


def _axis_cases():
    """(original side, model side) pairs taken from real smart_resize results and extremes."""
    pairs = set()
    for w, h in ((5600, 28), (28, 5600), (200, 1), (1, 150), (5000, 7000), (50, 50), (10, 10), (1000, 800),
                 (2339, 3308), (1653, 2339), (4500, 3181), (583, 550), (3361, 3359)):
        mw, mh = smart_resize_dims(w, h)
        pairs.add((w, mw))
        pairs.add((h, mh))
    pairs.update({(7, 3), (3, 7), (999, 1000), (1000, 999)})
    return sorted(pairs)


@pytest.mark.slow
@pytest.mark.parametrize("orig,model", _axis_cases())
def test_coordinate_round_trips(orig, model):
    scale = model / orig
    for axis, step in ((0, 1), (1, 7)):  # x exhaustively, y (same code path) sampled
        o_size = (orig, 100) if axis == 0 else (100, orig)
        m_size = (model, 100) if axis == 0 else (100, model)
        for v in list(range(0, orig + 1, step)) + [orig]:
            box = [v, 0, v, 0] if axis == 0 else [0, v, 0, v]
            m = to_model_coords(box, o_size, m_size)[axis]
            assert 0 <= m <= model
            assert m == v * model // orig
            back = to_original_coords([m, 0, m, 0] if axis == 0 else [0, m, 0, m], m_size, o_size)[axis]
            if scale >= 1:
                assert back == v, (orig, model, v, m, back)
            else:
                assert v - 1 / scale < back <= v, (orig, model, v, m, back)
        if scale <= 1:  # every model coordinate survives model -> original -> model
            for m in list(range(0, model + 1, step)) + [model]:
                box = [m, 0, m, 0] if axis == 0 else [0, m, 0, m]
                o = to_original_coords(box, m_size, o_size)
                assert to_model_coords(o, o_size, m_size)[axis] == m


def test_coordinates_match_upstream_formula():
    """Original -> model agrees with upstream's int(v / (W_orig / W_in)) except where float
    rounding makes upstream land just below an exact integer."""
    mismatches = 0
    for w, h in ((1000, 800), (2339, 3308), (5000, 7000), (50, 50), (1, 150), (583, 550), (300, 7)):
        mw, mh = smart_resize_dims(w, h)
        for x in range(0, w + 1, max(1, w // 500)):
            ours = to_model_coords([x, 0, x, 0], (w, h), (mw, mh))[0]
            upstream = int(x / (w / mw))
            if ours != upstream:
                mismatches += 1
                assert upstream == ours - 1 and (x * mw) % w == 0
    assert mismatches < 20


def test_coordinates_clamp_and_validate():
    orig, model = (1000, 800), (1008, 812)
    assert to_model_coords([-5, -1, 2000, 900], orig, model) == [0, 0, 1008, 812]
    assert to_original_coords([-5, -1, 5000, 900], model, orig) == [0, 0, 1000, 800]
    assert to_model_coords([0, 0, 1000, 800], orig, model) == [0, 0, 1008, 812]
    assert to_original_coords([0, 0, 1008, 812], model, orig) == [0, 0, 1000, 800]
    assert to_model_coords([10.7, 20.2, 30.9, 40.0], orig, model) == [10, 20, 31, 40]
    out = to_original_coords([100, 200, 300, 400], model, orig)
    assert all(isinstance(v, int) for v in out)
    for bad in ([1, 2, 3], [1, 2, 3, "4"], [1, 2, 3, float("nan")], "1234", None, [True, 1, 2, 3]):
        with pytest.raises(ImageInputError):
            to_model_coords(bad, orig, model)
    with pytest.raises(ValueError):
        to_model_coords([1, 2, 3, 4], (0, 10), model)
