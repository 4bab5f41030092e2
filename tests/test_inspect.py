"""POST /inspect: attention from a span of the answer to the page's image-token grid (Flask client,
tiny checkpoint): shapes, the grid mapping, rows that sum to 1, the same slot and validation
rules as /ocr, the API key."""
from __future__ import annotations

import base64
import io

import pytest
import torch

TEXT = "Hello world, a page of text"


@pytest.fixture(scope="module")
def page_b64(page_image):
    buffer = io.BytesIO()
    page_image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _post(client, page_b64, **fields):
    body = {"image": page_b64, "image_format": "base64", "prompt_type": "prompt_ocr", "text": TEXT, **fields}
    return client.post("/inspect", json=body)


def test_shapes_grid_and_values(client, runner, page_b64, page_image):
    response = _post(client, page_b64, span=[1, 4], per_layer=True, average_heads=False)
    assert response.status_code == 200, response.json
    body = response.json
    grid = body["grid"]
    assert grid["original_size"] == list(page_image.size)
    assert grid["model_size"] == [grid["cols"] * grid["cell_pixels"], grid["rows"] * grid["cell_pixels"]]
    assert (grid["h"], grid["w"]) == (grid["rows"] * grid["merge_size"], grid["cols"] * grid["merge_size"])
    assert len(body["attention"]) == grid["rows"] and {len(row) for row in body["attention"]} == {grid["cols"]}
    assert body["span"] == [1, 4] and len(body["tokens"]) == 3 and body["layers"] == [0, 1]
    assert body["heads"] == [0, 1, 2, 3] and body["heads_averaged"] is False and "text" not in body
    # per layer and head, before any averaging: attention over all keys sums to 1
    for layer in body["per_layer"]:
        assert len(layer["image_mass"]) == len(layer["other_mass"]) == 4
        for image, other in zip(layer["image_mass"], layer["other_mass"]):
            assert image + other == pytest.approx(1, abs=1e-5) and 0 < image < 1
    # the map is the mean of runner.trace's per-token, per-head rows
    traced = runner.trace(page_image, "prompt_ocr", text=TEXT, span=(1, 4))
    expected = torch.stack([traced.attention[layer] for layer in (0, 1)]).mean(dim=(0, 1, 2))
    torch.testing.assert_close(torch.tensor(body["attention"]), expected, atol=1e-6, rtol=1e-4)
    masses = [m for layer in body["per_layer"] for m in layer["image_mass"]]
    assert body["image_mass"] == pytest.approx(sum(masses) / len(masses), abs=1e-5)
    assert [t["id"] for t in body["tokens"]] == traced.token_ids[1:4]
    assert [t["logprob"] for t in body["tokens"]] == pytest.approx(traced.logprobs[1:4], abs=1e-5)


def test_char_span_layers_and_heads(client, page_b64):
    body = _post(client, page_b64, char_span=[6, 11], layers=[-1], heads=[1, 3]).json
    assert body["layers"] == [1] and body["heads"] == [1, 3] and body["heads_averaged"] is True
    assert "world" in TEXT[body["char_span"][0]:body["char_span"][1]]
    assert "Hello" not in "".join(t["token"] for t in body["tokens"])
    assert "per_layer" not in body


def test_generated_answer_when_no_text_is_given(client, runner, page_b64, page_image):
    body = _post(client, page_b64, text=None, max_new_tokens=6).json  # JSON null: generate
    assert body["text"] == runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=6).text
    assert body["token_count"] <= 6 and body["span"] == [0, body["token_count"]]


def test_a_client_that_hangs_up_stops_the_generated_answer(app, client, page_b64):
    """The generation behind a text-less /inspect stops when the client is gone (the probe that
    waitress gives), and the slot is free again; nobody reads the 499."""
    body = {"image": page_b64, "image_format": "base64", "prompt_type": "prompt_layout_only_en",
            "max_new_tokens": 2000}
    gone = client.post("/inspect", json=body, environ_overrides={"waitress.client_disconnected": lambda: True})
    assert gone.status_code == 499 and gone.json["error"] == "Client closed the connection"
    assert app.extensions["dots_ocr"].lock.running == 0


def test_busy_server_answers_429_and_the_slot_is_released(app, client, page_b64):
    state = app.extensions["dots_ocr"]
    assert state.lock.acquire()
    try:
        response = _post(client, page_b64)
        assert response.status_code == 429 and response.headers["Retry-After"] == "1"
        assert response.json["error"] == "Server is busy processing another request"
    finally:
        state.lock.release()
    assert _post(client, page_b64, layers=[0]).status_code == 200
    assert _post(client, page_b64, layers=[7]).status_code == 400
    assert state.lock.running == 0


@pytest.mark.parametrize("fields, message", [
    ({"image": ""}, "No image data provided"),
    ({"prompt_type": "nope"}, "Invalid prompt_type"),
    ({"span": [0, 1], "char_span": [0, 1]}, "Give one of"),
    ({"span": [3, 2]}, "Invalid 'span'"),
    ({"span": [0, 99]}, "the answer has"),
    ({"char_span": [500, 600]}, "outside the answer"),
    ({"layers": [7]}, "layers must be integers"),
    ({"layers": []}, "Invalid 'layers'"),
    ({"heads": ["1"]}, "Invalid 'heads.0'"),
    ({"text": ""}, "Invalid 'text'"),
    ({"stream": True}, "Unknown field 'stream'"),
    ({"prompt_type": "prompt_grounding_ocr"}, "'bbox' is required"),
    ({"prompt_type": "prompt_general"}, "'prompt' (the question) is required"),
    ({"temperature": "hot"}, "Invalid 'temperature'"),
    ({"image": "bm90IGFuIGltYWdl"}, "image"),
])
def test_validation_errors_are_json_400(client, page_b64, fields, message):
    response = _post(client, page_b64, **fields)
    assert response.status_code == 400, response.json
    assert message in response.json["error"]


def test_limits_and_model_not_loaded(runner, page_b64, monkeypatch):
    from server import create_app

    app = create_app({"image_root": None, "max_new_tokens_limit": 4}, runner=runner)
    response = _post(app.test_client(), page_b64)
    assert response.status_code == 400 and "longer than 4 tokens" in response.json["error"]
    state = app.extensions["dots_ocr"]
    monkeypatch.setattr(type(state), "model_loaded", property(lambda self: False))
    response = _post(app.test_client(), page_b64, text="Hi")
    assert response.status_code == 500 and response.json["error"] == "Model not loaded"


def test_api_key(runner, page_b64):
    from server import create_app

    client = create_app({"image_root": None, "api_key": "k"}, runner=runner).test_client()
    body = {"image": page_b64, "image_format": "base64", "prompt_type": "prompt_ocr", "text": "Hi", "layers": [0]}
    assert client.post("/inspect", json=body).status_code == 401
    assert client.post("/inspect", json=body, headers={"Authorization": "Bearer k"}).status_code == 200


def test_pdf_page(client):
    from pathlib import Path

    pdf = base64.b64encode((Path(__file__).resolve().parents[1] / "samples" / "demo_pdf1.pdf").read_bytes()).decode()
    body = client.post("/inspect", json={"image": pdf, "image_format": "base64", "page": 2, "dpi": 36,
                                         "prompt_type": "prompt_ocr", "text": "Hi", "layers": [0]}).json
    assert body["page"] == 2 and body["page_count"] == 2
    assert body["grid"]["original_size"][0] == round(841.92 * 36 / 72)  # the page at 36 dpi
