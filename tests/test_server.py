"""server.py in-process (Flask test client) on the tiny checkpoint: every documented behaviour
of the dots.ocr API document and every bad input, with the processing lock checked after each."""
import base64
import datetime as dt
import io
import json
import threading

import pytest
from PIL import Image

from forcing import FailsAtStep, ForcedTokens, plain_token_ids
from serverproc import wait_until_loaded
from server import BUSY_MESSAGE, ServerConfig, create_app, main, parse_args

# every answer ends with how it ended and what it cost (Ollama's names, after the documented fields)
STATISTICS = ["done_reason", "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
              "eval_count", "eval_duration"]

PROMPT_LIST = ("['prompt_layout_all_en', 'prompt_layout_only_en', 'prompt_ocr', 'prompt_grounding_ocr', "
               "'prompt_web_parsing', 'prompt_scene_spotting', 'prompt_image_to_svg', 'prompt_general']")


@pytest.fixture()
def page_path(page_image, tmp_path):
    path = tmp_path / "page.png"
    page_image.save(path)
    return path


@pytest.fixture()
def page_b64(page_image):
    buffer = io.BytesIO()
    page_image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _state(app):
    return app.extensions["dots_ocr"]


def _ocr(client, **body):
    body.setdefault("max_new_tokens", 8)
    body.setdefault("temperature", 0)
    return client.post("/ocr", json=body)


def _error_body(response):
    """An error body without its request_id, which must be the response's X-Request-Id."""
    body = dict(response.get_json())
    assert body.pop("request_id") == response.headers["X-Request-Id"]
    return body


def _assert_free(app):
    assert not _state(app).lock.locked()
    assert not [t for t in threading.enumerate() if t.name == "dots-ocr-generate" and t.is_alive()]


# -- /health ------------------------------------------------------------------------------------


def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "healthy" and body["model_loaded"] is True
    assert body["demo"] is False
    assert body["device"] == "cpu" and body["dtype"] == "float32" and body["fast_path"] is False


def test_model_not_loaded(tiny_ckpt, page_path):
    from model_runner.runner import ModelRunner

    class NeverLoads(ModelRunner):
        def load(self):
            raise RuntimeError("weights are broken")

    app = create_app({}, runner=NeverLoads(tiny_ckpt, device="cpu"))
    client = app.test_client()
    _state(app).loader.join(10)
    assert client.get("/health").get_json()["model_loaded"] is False
    assert "weights are broken" in client.get("/health").get_json()["load_error"]
    response = _ocr(client, image=str(page_path))
    assert response.status_code == 500
    assert _error_body(response) == {"error": "Model not loaded"}


def test_background_loading_then_ready(tiny_ckpt, page_path):
    app = create_app({"model_path": str(tiny_ckpt), "device": "cpu"})
    client = app.test_client()
    assert client.get("/health").status_code == 200  # answers while loading
    wait_until_loaded(lambda: client.get("/health").get_json(), deadline_s=60)
    assert _ocr(client, image=str(page_path)).status_code == 200


def test_demo_mode_is_announced(page_path, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where the demo checkpoint is built
    app = create_app({"demo": True, "device": "cpu"})
    client = app.test_client()
    body = client.get("/health").get_json()
    assert body["demo"] is True and "RANDOM" in body["warning"]
    _state(app).loader.join(60)
    assert client.get("/health").get_json()["model_loaded"] is True
    assert _ocr(client, image=str(page_path)).status_code == 200


# -- /ocr success -------------------------------------------------------------------------------


def test_ocr_path_json_response(app, client, page_path):
    response = _ocr(client, image=str(page_path), image_format="path", prompt_type="prompt_ocr")
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["model", "response", "prompt_type", *STATISTICS]
    assert body["model"] == "dots-ocr" and body["prompt_type"] == "prompt_ocr"
    assert isinstance(body["response"], str)
    _assert_free(app)


def test_defaults(app, client, page_path, runner, monkeypatch):
    from forcing import StartSpy

    spy = StartSpy(runner, monkeypatch)
    spy.change = {"max_new_tokens": 2}
    response = client.post("/ocr", json={"image": str(page_path)})
    assert response.status_code == 200
    assert response.get_json()["prompt_type"] == "prompt_layout_all_en"
    seen = spy.last
    assert seen.prompt.prompt_type == "prompt_layout_all_en"
    assert seen.decoding.temperature == 0.1 and seen.decoding.top_p == 1.0 and seen.max_new_tokens == 12000


@pytest.mark.parametrize("prompt_type", ["prompt_layout_all_en", "prompt_layout_only_en", "prompt_ocr"])
def test_every_prompt_type_and_base64(client, page_b64, prompt_type):
    response = _ocr(client, image=page_b64, image_format="base64", prompt_type=prompt_type)
    assert response.status_code == 200
    assert response.get_json()["prompt_type"] == prompt_type


def test_grounding_with_bbox(client, page_path):
    response = _ocr(client, image=str(page_path), prompt_type="prompt_grounding_ocr", bbox=[10, 20, 120, 90])
    assert response.status_code == 200


def test_data_uri_accepted_whatever_the_format(client, page_b64):
    for image_format in ("path", "url", "base64"):
        response = _ocr(client, image="data:image/png;base64," + page_b64, image_format=image_format)
        assert response.status_code == 200, response.get_json()


def test_stream_ndjson(app, client, page_path):
    response = client.post("/ocr", json={"image": str(page_path), "stream": True, "temperature": 0,
                                         "max_new_tokens": 12, "prompt_type": "prompt_ocr"})
    assert response.status_code == 200
    assert response.mimetype == "application/x-ndjson"
    lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["response"] == ""
    for line in lines[:-1]:
        assert set(line) == {"model", "created_at", "response", "done"}
    assert list(lines[-1]) == ["model", "created_at", "response", "done", *STATISTICS]
    for line in lines:
        assert line["model"] == "dots-ocr"
        dt.datetime.fromisoformat(line["created_at"])
    assert all(line["done"] is False for line in lines[:-1])
    streamed = "".join(line["response"] for line in lines)
    plain = _ocr(client, image=str(page_path), prompt_type="prompt_ocr", max_new_tokens=12).get_json()["response"]
    assert streamed == plain
    _assert_free(app)


def test_stream_interval_gathers_tokens_into_fewer_lines(runner, page_path):
    """--stream-interval-ms: the first token's line at once, then what was decoded meanwhile, at
    most that often (here: once more, when the answer ends); the same text as a line per token.
    A negative interval is refused at start-up."""
    body = {"image": str(page_path), "stream": True, "temperature": 0, "max_new_tokens": 40,
            "prompt_type": "prompt_ocr"}
    ids = plain_token_ids(runner, 40)
    first_read = threading.Event()

    def next_token(step):
        # steps 0-39: the first request; the second's decoding waits after its first token until
        # that token's line has been read, so that the line surely carries it alone
        if step == 41 and not first_read.wait(20):
            raise RuntimeError("the first line was never read")
        return ids[step % len(ids)]

    texts = {}
    with ForcedTokens(runner.model, next_token):
        for interval in (0, 30_000):
            first_read.clear()
            app = create_app({"image_root": None, "stream_interval_ms": interval}, runner=runner)
            chunks = iter(app.test_client().post("/ocr", json=body, buffered=False).response)
            raw = next(chunks)
            first_read.set()
            lines = [json.loads(line) for line in (raw + b"".join(chunks)).decode().splitlines()]
            assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 40
            texts[interval] = [line["response"] for line in lines[:-1]]
    assert "".join(texts[30_000]) == "".join(texts[0])
    assert 2 <= len(texts[30_000]) <= 3  # first token, the rest at the end (and a held-back tail)
    assert parse_args(["--stream-interval-ms", "0"]).stream_interval_ms == 0
    with pytest.raises(ValueError, match="stream-interval-ms"):
        create_app({"stream_interval_ms": -1}, runner=runner)


def test_stream_holds_the_lock_until_finished(app, client, page_path):
    response = client.post("/ocr", json={"image": str(page_path), "stream": True, "temperature": 0,
                                         "max_new_tokens": 40}, buffered=False)
    chunks = iter(response.response)
    next(chunks)
    assert _state(app).lock.locked()
    second = _ocr(client, image=str(page_path))
    assert second.status_code == 429 and _error_body(second) == {"error": BUSY_MESSAGE}
    for _ in chunks:
        pass
    response.close()
    _assert_free(app)


def test_stream_closed_early_releases_lock_and_cancels(app, client, page_path):
    response = client.post("/ocr", json={"image": str(page_path), "stream": True, "temperature": 0,
                                         "max_new_tokens": 5000}, buffered=False)
    next(iter(response.response))
    response.close()  # the client went away
    _assert_free(app)
    assert _ocr(client, image=str(page_path)).status_code == 200


def test_error_after_stream_started_ends_with_error_line(app, client, page_path, runner):
    with FailsAtStep(runner.model, 4, "decoder exploded"):
        response = client.post("/ocr", json={"image": str(page_path), "stream": True, "temperature": 0,
                                             "max_new_tokens": 50})
        lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert response.status_code == 200
    assert lines[-1]["done"] is True and "decoder exploded" in lines[-1]["error"]
    _assert_free(app)


def test_error_in_non_streaming_generation_is_json_500(app, client, page_path, runner):
    with FailsAtStep(runner.model, 1, "no luck"):
        response = _ocr(client, image=str(page_path))
    assert response.status_code == 500 and "error" in response.get_json()
    _assert_free(app)


# -- errors word for word -----------------------------------------------------------------------


@pytest.mark.parametrize("body", [{}, {"image": ""}, {"image": None}, {"prompt_type": "prompt_ocr"}])
def test_no_image(app, client, body):
    response = client.post("/ocr", json=body)
    assert response.status_code == 400
    assert _error_body(response) == {"error": "No image data provided"}
    _assert_free(app)


def test_invalid_prompt_type(app, client, page_path):
    response = _ocr(client, image=str(page_path), prompt_type="prompt_poetry")
    assert response.status_code == 400
    assert _error_body(response) == {"error": f"Invalid prompt_type. Must be one of: {PROMPT_LIST}"}


def test_busy(app, client, page_path):
    assert _state(app).lock.acquire(blocking=False)
    try:
        response = _ocr(client, image=str(page_path))
    finally:
        _state(app).lock.release()
    assert response.status_code == 429
    assert _error_body(response) == {"error": "Server is busy processing another request"}


@pytest.mark.parametrize("field,value", [
    ("temperature", "0.5"), ("temperature", True), ("temperature", -0.1), ("temperature", None),
    ("top_p", 0), ("top_p", 1.5), ("top_p", "1"),
    ("max_new_tokens", 0), ("max_new_tokens", 10.0), ("max_new_tokens", True), ("max_new_tokens", 10 ** 9),
    ("stream", "true"), ("stream", 1),
    ("image_format", "ftp"), ("image", 42),
])
def test_validation_names_the_field(app, client, page_path, field, value):
    body = {"image": str(page_path), field: value}
    response = client.post("/ocr", json=body)
    assert response.status_code == 400
    assert field in response.get_json()["error"]
    _assert_free(app)


def test_nan_rejected(client, page_path):
    raw = '{"image": "%s", "temperature": NaN}' % page_path
    response = client.post("/ocr", data=raw, content_type="application/json")
    assert response.status_code == 400 and "temperature" in response.get_json()["error"]


def test_unknown_field_is_named(client, page_path):
    response = _ocr(client, image=str(page_path), temprature=0.2)
    assert response.status_code == 400
    assert _error_body(response) == {"error": "Unknown field 'temprature'"}


@pytest.mark.parametrize("bbox", [None, [1, 2, 3], [10, 10, 5, 20], [-1, 0, 5, 5], ["a", 0, 5, 5], [0, 0, True, 5]])
def test_grounding_bbox_checked(client, page_path, bbox):
    body = {"image": str(page_path), "prompt_type": "prompt_grounding_ocr"}
    if bbox is not None:
        body["bbox"] = bbox
    response = client.post("/ocr", json=body)
    assert response.status_code == 400
    assert "bbox" in response.get_json()["error"]


def test_bbox_without_grounding_rejected(client, page_path):
    response = _ocr(client, image=str(page_path), prompt_type="prompt_ocr", bbox=[0, 0, 5, 5])
    assert response.status_code == 400 and "bbox" in response.get_json()["error"]


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", '"just a string"', ""])
def test_bad_json_is_json_error(app, client, raw):
    response = client.post("/ocr", data=raw, content_type="application/json")
    assert response.status_code == 400
    assert response.is_json and "error" in response.get_json()
    _assert_free(app)


def test_404_405_413_are_json(runner, page_b64):
    app = create_app({"max_body_mb": 0.01}, runner=runner)
    client = app.test_client()
    r404 = client.get("/nope")
    assert r404.status_code == 404 and r404.is_json and "error" in r404.get_json()
    r405 = client.get("/ocr")
    assert r405.status_code == 405 and r405.is_json and "error" in r405.get_json()
    r413 = client.post("/ocr", json={"image": page_b64 * 20, "image_format": "base64"})
    assert r413.status_code == 413 and r413.is_json and "error" in r413.get_json()
    _assert_free(app)


@pytest.mark.parametrize("image,image_format,status", [
    ("/definitely/not/here.png", "path", 400),
    ("not base64 at all!!", "base64", 400),
    (base64.b64encode(b"hello, I am text").decode(), "base64", 400),
    ("file:///etc/passwd", "url", 400),
    ("http://127.0.0.1:9/x.png", "url", 400),
])
def test_bad_images(app, client, image, image_format, status):
    response = _ocr(client, image=image, image_format=image_format)
    assert response.status_code == status
    assert response.get_json()["error"]
    _assert_free(app)


def test_truncated_and_non_image_files(app, client, page_image, tmp_path):
    buffer = io.BytesIO()
    page_image.save(buffer, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    text = tmp_path / "notes.png"
    text.write_text("plain text, not a picture")
    for path in (truncated, text, tmp_path):
        response = _ocr(client, image=str(path))
        assert response.status_code == 400, path
        _assert_free(app)


def test_extreme_aspect_ratio_is_400(app, client, tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (6000, 20), "white").save(path)
    response = _ocr(client, image=str(path))
    assert response.status_code == 400 and "aspect" in response.get_json()["error"].lower()
    _assert_free(app)


def test_image_root_confines_paths(runner, tmp_path, page_image):
    root = tmp_path / "root"
    root.mkdir()
    page_image.save(root / "inside.png")
    page_image.save(tmp_path / "outside.png")
    (root / "escape.png").symlink_to(tmp_path / "outside.png")
    client = create_app({"image_root": str(root)}, runner=runner).test_client()
    assert _ocr(client, image=str(root / "inside.png")).status_code == 200
    assert _ocr(client, image=str(tmp_path / "outside.png")).status_code == 400
    assert _ocr(client, image=str(root / "escape.png")).status_code == 400


def test_api_key(runner, page_path):
    client = create_app({"api_key": "s3cret"}, runner=runner).test_client()
    assert client.get("/health").status_code == 200
    body = {"image": str(page_path), "max_new_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        response = client.post("/ocr", json=body, headers=headers)
        assert response.status_code == 401 and "error" in response.get_json()
    assert client.post("/ocr", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_no_temporary_files_left(client, page_b64, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    assert _ocr(client, image=page_b64, image_format="base64").status_code == 200
    assert _ocr(client, image="bm90IGFuIGltYWdl", image_format="base64").status_code == 400
    assert list(scratch.iterdir()) == []


# -- command line ---------------------------------------------------------------------------------


def test_flags_and_environment(monkeypatch):
    assert parse_args([]) == ServerConfig()
    monkeypatch.setenv("DOTS_OCR_PORT", "6001")
    monkeypatch.setenv("DOTS_OCR_ALLOW_PRIVATE_URLS", "true")
    monkeypatch.setenv("DOTS_OCR_API_KEY", "k")
    config = parse_args(["--device", "cpu", "--max-new-tokens-limit", "100", "--image-root", "/data"])
    assert (config.port, config.allow_private_urls, config.api_key) == (6001, True, "k")
    assert (config.device, config.max_new_tokens_limit, config.image_root) == ("cpu", 100, "/data")
    assert parse_args(["--port", "7000"]).port == 7000  # a flag beats the environment


def test_missing_weights_message(tmp_path, capsys):
    assert main(["--model-path", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "--model-path" in err and "--demo" in err and "download" in err


def test_max_new_tokens_limit_from_config(runner, page_path):
    client = create_app({"max_new_tokens_limit": 16}, runner=runner).test_client()
    assert _ocr(client, image=str(page_path), max_new_tokens=16).status_code == 200
    response = _ocr(client, image=str(page_path), max_new_tokens=17)
    assert response.status_code == 400 and "max_new_tokens" in response.get_json()["error"]


# -- documents and post-processing -------------------------------------------------------------

DATA = __import__("pathlib").Path(__file__).resolve().parents[1] / "samples"


@pytest.fixture()
def pdf_b64():
    return base64.b64encode((DATA / "demo_pdf1.pdf").read_bytes()).decode()


@pytest.mark.slow
def test_pdf_pages(app, client, pdf_b64):
    for page in (1, 2):
        response = _ocr(client, image=pdf_b64, image_format="base64", page=page, prompt_type="prompt_ocr", dpi=72)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        assert list(body) == ["model", "response", "prompt_type", *STATISTICS, "page", "page_count"]
        assert (body["page"], body["page_count"]) == (page, 2)
    default = _ocr(client, image=pdf_b64, image_format="base64", dpi=72).get_json()
    assert default["page"] == 1
    for bad in ({"page": 3}, {"page": 0}, {"page": "2"}, {"dpi": 10}, {"dpi": 2000}):
        response = _ocr(client, image=pdf_b64, image_format="base64", **bad)
        assert response.status_code == 400, bad
        assert ("page" in response.get_json()["error"].lower()) or ("dpi" in response.get_json()["error"])
    _assert_free(app)


@pytest.mark.slow
def test_pdf_stream_carries_page_on_last_line(client, pdf_b64):
    response = client.post("/ocr", json={"image": pdf_b64, "image_format": "base64", "page": 2, "stream": True,
                                         "max_new_tokens": 6, "temperature": 0, "dpi": 72})
    lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert lines[-1]["done"] is True and (lines[-1]["page"], lines[-1]["page_count"]) == (2, 2)
    assert all("page" not in line for line in lines[:-1])


def test_broken_pdf_is_400(app, client):
    broken = base64.b64encode(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer garbage").decode()
    response = _ocr(client, image=broken, image_format="base64")
    assert response.status_code == 400 and "pdf" in response.get_json()["error"].lower()
    _assert_free(app)


def _answer_with(runner, monkeypatch, answer: str):
    """Make the runner 'say' ``answer`` (after running its real input preparation)."""
    from forcing import script_answer

    script_answer(runner, monkeypatch, answer)


def test_postprocess_maps_boxes_to_original_pixels(client, runner, page_path, page_image, monkeypatch):
    model_w, model_h = runner.processor.model_input_size(*page_image.size)
    answer = json.dumps([
        {"bbox": [0, 0, model_w, model_h // 2], "category": "Title", "text": "# Hello"},
        {"bbox": [10, model_h // 2, model_w - 10, model_h], "category": "Picture"},
        {"bbox": [0, 0, 28, 28], "category": "Page-footer", "text": "p. 1"},
    ])
    _answer_with(runner, monkeypatch, answer)
    body = _ocr(client, image=str(page_path), postprocess=True, skip_headers_footers=True).get_json()
    assert body["response"] == answer
    assert body["repaired"] is False
    width, height = page_image.size
    first = body["layout"][0]
    assert first["bbox"][0] == 0 and first["bbox"][2] == width and first["category"] == "Title"
    assert all(0 <= c["bbox"][2] <= width and 0 <= c["bbox"][3] <= height for c in body["layout"])
    assert "# Hello" in body["markdown"] and "![Picture]" in body["markdown"] and "p. 1" not in body["markdown"]


def test_postprocess_repairs_and_never_fails(client, runner, page_path, monkeypatch):
    _answer_with(runner, monkeypatch, '[{"bbox": [1, 2, 30, 40], "category": "Text", "text": "a"}'
                                      '{"bbox": [1, 50, 30, 90], "category": "Text", "text": "b"}, {"bbox": [3, ')
    body = _ocr(client, image=str(page_path), postprocess=True).get_json()
    assert body["repaired"] is True and [c["text"] for c in body["layout"]] == ["a", "b"]
    _answer_with(runner, monkeypatch, "no json here at all")
    body = _ocr(client, image=str(page_path), postprocess=True).get_json()
    assert body["layout"] == [] and body["markdown"] == "no json here at all" and body["repaired"] is True


def test_grounding_postprocess_returns_the_same_box(client, runner, page_path, monkeypatch):
    _answer_with(runner, monkeypatch, "inside the box")
    bbox = [13, 27, 151, 203]
    body = _ocr(client, image=str(page_path), prompt_type="prompt_grounding_ocr", bbox=bbox,
                postprocess=True).get_json()
    assert body["layout"] == [{"bbox": bbox, "category": "Text", "text": "inside the box"}]


def test_visualize_adds_a_png_of_the_page(client, runner, page_path, page_image, monkeypatch):
    _answer_with(runner, monkeypatch, json.dumps([{"bbox": [0, 0, 56, 56], "category": "Text", "text": "x"}]))
    body = _ocr(client, image=str(page_path), visualize=True).get_json()
    assert list(body) == ["model", "response", "prompt_type", *STATISTICS, "visualization"]
    drawn = Image.open(io.BytesIO(base64.b64decode(body["visualization"])))
    assert drawn.format == "PNG" and drawn.size == page_image.size


@pytest.mark.parametrize("extra", [{"postprocess": True}, {"visualize": True}, {"skip_headers_footers": True},
                                   {"postprocess": "yes"}])
def test_postprocess_needs_a_layout_prompt(client, page_path, extra):
    response = _ocr(client, image=str(page_path), prompt_type="prompt_ocr", **extra)
    assert response.status_code == 400
    assert list(extra)[0] in response.get_json()["error"]


def test_torch_threads_flag_sets_the_process_threads(monkeypatch):
    import torch

    from server import apply_process_settings

    monkeypatch.setenv("DOTS_OCR_TORCH_THREADS", "1")
    config = parse_args([])
    assert config.torch_threads == 1 and parse_args(["--torch-threads", "3"]).torch_threads == 3
    before = torch.get_num_threads()
    try:
        apply_process_settings(config)
        assert torch.get_num_threads() == 1
        apply_process_settings(ServerConfig())  # not set: left as it is
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="at least 1"):
            apply_process_settings(ServerConfig(torch_threads=0))
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_demo_mode_answers_are_short_unless_a_request_asks(runner):
    from model_runner.defaults import DEFAULT_MAX_NEW_TOKENS, DEMO_MAX_NEW_TOKENS
    from model_runner.prompts import prompt_text
    from serverproc import page_png

    page = base64.b64encode(page_png()).decode()
    # prompt_layout_only_en on this page: the tiny model never writes eos, so the length is the cap
    body = {"image": page, "image_format": "base64", "prompt_type": "prompt_layout_only_en", "temperature": 0}
    assert create_app({}, runner=runner).test_client().get("/health").get_json()["default_max_new_tokens"] \
        == DEFAULT_MAX_NEW_TOKENS
    client = create_app({"demo": True}, runner=runner).test_client()
    assert client.get("/health").get_json()["default_max_new_tokens"] == DEMO_MAX_NEW_TOKENS == 256
    answer = client.post("/ocr", json=body).get_json()
    assert (answer["eval_count"], answer["done_reason"]) == (DEMO_MAX_NEW_TOKENS, "length")
    own = client.post("/ocr", json={**body, "max_new_tokens": 300}).get_json()
    assert (own["eval_count"], own["done_reason"]) == (300, "length")
    chat = {"model": "dots-ocr", "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + page}},
        {"type": "text", "text": "<|img|><|imgpad|><|endofimg|>" + prompt_text("prompt_layout_only_en")}]}]}
    completion = client.post("/v1/chat/completions", json=chat).get_json()
    assert completion["usage"]["completion_tokens"] == DEMO_MAX_NEW_TOKENS
    configured = create_app({"default_max_new_tokens": 40}, runner=runner).test_client()
    assert configured.post("/ocr", json=body).get_json()["eval_count"] == 40


def test_cpu_batching_chooses_torch_threads_and_says_so(monkeypatch, caplog):
    import torch

    import server
    from server import apply_process_settings, batching_torch_threads

    assert [batching_torch_threads(n) for n in (1, 2, 3, 16)] == [1, 1, 1, 8]
    monkeypatch.setattr("dots_ocr_server.eval.machine.usable_cores", lambda: 6)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        apply_process_settings(ServerConfig(device="cpu", max_batch_size=1))  # one at a time: left alone
        assert torch.get_num_threads() == 2
        with caplog.at_level("INFO", logger=server.log.name):
            apply_process_settings(ServerConfig(device="cpu", max_batch_size=4))
        assert torch.get_num_threads() == 3
        assert "torch uses 3 intra-op CPU threads (chosen for batching on a CPU: half of the 6 cores" in caplog.text
        apply_process_settings(ServerConfig(device="cpu", max_batch_size=4, torch_threads=2))  # the flag wins
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_ignore_eos_runs_the_answer_to_max_new_tokens(client, page_b64):
    """prompt_ocr ends by eos after about 100 tokens on this page; ignore_eos (vLLM's field, for
    fixed-length benchmarks) runs it to max_new_tokens on /ocr and on /v1."""
    base = {"image": page_b64, "image_format": "base64", "prompt_type": "prompt_ocr", "temperature": 0,
            "max_new_tokens": 300}
    ended = client.post("/ocr", json=base).get_json()
    assert ended["done_reason"] == "stop" and ended["eval_count"] < 300
    fixed = client.post("/ocr", json={**base, "ignore_eos": True}).get_json()
    assert (fixed["done_reason"], fixed["eval_count"]) == ("length", 300)
    chat = {"model": "dots-ocr", "temperature": 0, "max_tokens": 300, "ignore_eos": True, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + page_b64}},
                                     {"type": "text", "text": "<|img|><|imgpad|><|endofimg|>"
                                      "Extract the text content from this image."}]}]}
    completion = client.post("/v1/chat/completions", json=chat).get_json()
    assert completion["usage"]["completion_tokens"] == 300 and completion["choices"][0]["finish_reason"] == "length"
