"""``GET /ui``: a page for looking at documents and at what the model does inside.

The page is plain files in ``api/static/ui`` (HTML, ES modules, CSS; no build step, no CDN, no
third-party code), served by this blueprint together with two small helper routes it calls:

- ``GET /ui/config``: what the page needs to know about the server (category colours, limits);
- ``POST /ui/render``: the page exactly as the server reads it (a PDF page rendered, an image
  decoded and oriented), as a JPEG to show under the layout boxes, with its size in pixels, so
  that boxes in original pixels and drag rectangles map onto it one to one.

API key: the page's files themselves hold no data and load without a key (a browser cannot send
an ``Authorization`` header when it navigates); every route that touches data, these two helpers
included, requires the same ``Authorization: Bearer KEY`` as ``/ocr``. The page asks for the key
when the server answers 401 and keeps it in the tab's ``sessionStorage``.

Every /ui response carries a Content-Security-Policy that allows only this server's own scripts,
styles and connections: a second line of defence against a model answer that smuggles HTML.
"""
from __future__ import annotations

import base64
import io

from flask import Blueprint, current_app, jsonify, redirect

from dots_ocr_server.layout import CATEGORY_COLORS, FALLBACK_COLOR
from model_runner.prompts import LAYOUT_PROMPT_TYPES, POSTPROCESS_PROMPT_TYPES, PROMPT_TYPES, default_temperature

from .errors import RequestError
from .http import check_api_key, json_body
from .schemas import validate_request
from .state import ServerState

bp = Blueprint("ui", __name__, static_folder="static/ui", static_url_path="/ui/static")

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
RENDER_JPEG_QUALITY = 90  # the page as shown in the browser: sharp enough to read, a fraction of PNG's size
RENDER_FIELDS = ("image", "image_format", "page", "dpi")  # the /ocr fields /ui/render takes


def _state() -> ServerState:
    return current_app.extensions["dots_ocr"]


@bp.after_request
def _headers(response):
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


@bp.get("/ui")
def page():
    response = bp.send_static_file("index.html")
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/ui/")
def page_slash():
    return redirect("/ui", code=308)


@bp.get("/ui/config")
def config():
    """Server settings the page adapts to. Behind the API key: the page's first authenticated
    call, so a wrong key is reported at once."""
    state = _state()
    check_api_key(state.config)
    return jsonify({
        "api_key_required": bool(state.config.api_key),
        "max_new_tokens_limit": state.config.max_new_tokens_limit,
        "max_pdf_pages": state.config.max_pdf_pages,
        "max_body_mb": state.config.max_body_mb,
        "prompt_types": list(PROMPT_TYPES),
        "postprocess_prompt_types": list(POSTPROCESS_PROMPT_TYPES),
        "layout_prompt_types": list(LAYOUT_PROMPT_TYPES),
        "jobs": state.jobs is not None,
        "default_temperatures": {name: default_temperature(name) for name in PROMPT_TYPES},
        "category_colors": {name: list(rgb) for name, rgb in CATEGORY_COLORS.items()},
        "fallback_color": list(FALLBACK_COLOR),
    })


@bp.post("/ui/render")
def render():
    """The page the model would read for ``image`` (and ``page``/``dpi`` for a PDF), as
    ``{"image": "data:image/jpeg;base64,...", "width", "height", "page", "page_count", "source_kind"}``.
    Same image loading, limits and messages as ``/ocr`` (the page service's ``load``); it runs no
    model, so it takes no slot."""
    state = _state()
    check_api_key(state.config)
    body = json_body()
    if not isinstance(body, dict):
        raise RequestError("Request body must be a JSON object")
    unknown = sorted(set(body) - set(RENDER_FIELDS))
    if unknown:
        raise RequestError(f"Unknown field '{unknown[0]}'")
    req = validate_request(body, state.config)
    document = state.pages.load(req.source)
    image = document.image
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=RENDER_JPEG_QUALITY)
    return jsonify({
        "image": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"),
        "width": image.width,
        "height": image.height,
        "source_kind": document.source_kind,
        "page": document.page if document.source_kind == "pdf" else 1,
        "page_count": document.page_count if document.source_kind == "pdf" else 1,
    })
