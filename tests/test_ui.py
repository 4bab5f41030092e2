"""GET /ui and its helper routes (Flask client): the page and its assets, offline (no external
URL anywhere), the API key on every data route, /ui/render's page as the model reads it."""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from PIL import Image

STATIC = Path(__file__).resolve().parents[1] / "dots_ocr_server" / "api" / "static" / "ui"
ASSETS = {"index.html": "text/html", "app.js": "javascript", "api.js": "javascript", "viewer.js": "javascript",
          "markdown.js": "javascript", "documents.js": "javascript", "files.js": "javascript", "style.css": "text/css"}


@pytest.fixture()
def keyed(runner):
    from server import create_app

    return create_app({"image_root": None, "api_key": "s3cret"}, runner=runner).test_client()


def _b64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_page_and_assets_are_served_with_their_types(client):
    page = client.get("/ui")
    assert page.status_code == 200 and page.content_type.startswith("text/html")
    html = page.get_data(as_text=True)
    for name, kind in ASSETS.items():
        if name != "index.html":
            assert f"/ui/static/{name}" in html or name not in ("app.js", "style.css")
        response = client.get(f"/ui/static/{name}")
        assert response.status_code == 200, name
        assert kind in response.content_type, (name, response.content_type)
        assert response.get_data() == (STATIC / name).read_bytes()
    assert client.get("/ui/").status_code == 308
    assert client.get("/ui/static/nope.js").status_code == 404


def test_every_asset_is_in_the_repository_and_nothing_is_fetched_from_elsewhere():
    """No CDN, no external font or script: no http(s):// URL and no protocol-relative //host."""
    files = sorted(STATIC.iterdir())
    assert {f.name for f in files} == set(ASSETS)
    for path in files:
        # the SVG namespace of createElementNS is a name, never fetched
        text = path.read_text(encoding="utf-8").replace('"http://www.w3.org/2000/svg"', "SVG_NAMESPACE")
        assert not re.search(r"https?://", text), path.name
        assert not re.search(r"""(src|href)=["']//""", text), path.name
        assert "@import" not in text and "url(" not in text, path.name
    # every module the page imports is one of these files
    for path in files:
        for target in re.findall(r"""from\s+["']([^"']+)["']""", path.read_text(encoding="utf-8")):
            assert (STATIC / target).is_file(), (path.name, target)


def test_security_headers(client):
    response = client.get("/ui")
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_page_loads_without_the_key_but_its_data_routes_need_it(keyed, page_image):
    assert keyed.get("/ui").status_code == 200
    assert keyed.get("/ui/static/app.js").status_code == 200
    body = {"image": _b64(page_image), "image_format": "base64"}
    for method, path, kwargs in [("get", "/ui/config", {}), ("post", "/ui/render", {"json": body}),
                                 ("post", "/inspect", {"json": {**body, "text": "x"}})]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = getattr(keyed, method)(path, headers=headers, **kwargs)
            assert response.status_code == 401, path
            assert "Unauthorized" in response.json["error"]
    good = {"Authorization": "Bearer s3cret"}
    config = keyed.get("/ui/config", headers=good)
    assert config.status_code == 200 and config.json["api_key_required"] is True
    assert keyed.post("/ui/render", json=body, headers=good).status_code == 200


def test_config_tells_the_page_what_it_needs(client):
    config = client.get("/ui/config").json
    assert config["api_key_required"] is False
    assert config["category_colors"]["Title"] == [192, 57, 43]
    assert "prompt_layout_all_en" in config["prompt_types"] and "prompt_ocr" not in config["postprocess_prompt_types"]
    assert config["default_temperatures"]["prompt_image_to_svg"] == 0.9
    assert config["max_new_tokens_limit"] == 24000


def test_render_shows_the_page_as_the_model_reads_it(client, page_image):
    response = client.post("/ui/render", json={"image": _b64(page_image), "image_format": "base64"})
    assert response.status_code == 200
    body = response.json
    assert (body["width"], body["height"]) == page_image.size
    assert body["source_kind"] == "image" and body["page"] == body["page_count"] == 1
    prefix = "data:image/jpeg;base64,"
    assert body["image"].startswith(prefix)
    shown = Image.open(io.BytesIO(base64.b64decode(body["image"][len(prefix):])))
    assert shown.size == page_image.size


def test_render_pdf_pages(client):
    pdf = base64.b64encode((STATIC.parents[3] / "samples" / "demo_pdf1.pdf").read_bytes()).decode()
    second = client.post("/ui/render", json={"image": pdf, "image_format": "base64", "page": 2, "dpi": 50}).json
    assert second["source_kind"] == "pdf" and second["page"] == 2 and second["page_count"] == 2
    assert second["width"] == round(841.92 * 50 / 72)
    missing = client.post("/ui/render", json={"image": pdf, "image_format": "base64", "page": 3, "dpi": 50})
    assert missing.status_code == 400 and "out of range" in missing.json["error"]


@pytest.mark.parametrize("body, message", [
    ({}, "No image data provided"),
    ({"image": "bm90IGFuIGltYWdl", "image_format": "base64"}, "image"),
    ({"image": "x", "image_format": "base64", "prompt_type": "prompt_ocr"}, "Unknown field 'prompt_type'"),
    ({"image": "x", "image_format": "base64", "page": "2"}, "Invalid 'page'"),
])
def test_render_errors_are_json(client, body, message):
    response = client.post("/ui/render", json=body)
    assert response.status_code == 400 and message in response.json["error"]
