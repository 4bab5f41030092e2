"""The dots.mocr prompt types through the whole server path: the tiny model is made to
say a hand-written answer token by token (a forward hook on lm_head), so the real prompt
building, generation, streaming and post-processing all run; then `postprocess` and `visualize`
are checked against what the answer holds, mapped back to the original image."""
import base64
import io
import json

import pytest
from PIL import Image

from forcing import ForcedTokens


@pytest.fixture()
def page_path(page_image, tmp_path):
    path = tmp_path / "page.png"
    page_image.save(path)
    return path


def _say(runner, answer: str) -> ForcedTokens:
    """Greedy (and sampled) decoding emits exactly ``answer``, then eos."""
    ids = runner.processor.tokenizer.encode(answer, add_special_tokens=False)
    eos = sorted(runner.generator.eos_ids)[0]
    assert runner.processor.tokenizer.decode(ids) == answer  # the tiny vocabulary spells it
    return ForcedTokens(runner.model, lambda step: ids[step] if step < len(ids) else eos)


def _ocr(client, **body):
    body.setdefault("max_new_tokens", 600)
    return client.post("/ocr", json=body)


def _png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_web_parsing_gets_layout_postprocess_and_drawing(client, runner, page_path, page_image):
    model_w, model_h = runner.processor.model_input_size(*page_image.size)
    answer = json.dumps([{"bbox": [0, 0, model_w, model_h // 2], "category": "Title", "text": "# Shop"},
                         {"bbox": [0, model_h // 2, model_w, model_h], "category": "Text", "text": "Buy now"}])
    with _say(runner, answer):
        response = _ocr(client, image=str(page_path), prompt_type="prompt_web_parsing", temperature=0,
                        postprocess=True, visualize=True)
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["response"] == answer and body["done_reason"] == "stop"
    width, height = page_image.size
    assert [c["category"] for c in body["layout"]] == ["Title", "Text"]
    assert body["layout"][0]["bbox"][2] == width and body["layout"][1]["bbox"][3] == height
    assert "# Shop" in body["markdown"] and "Buy now" in body["markdown"]
    assert _png(body["visualization"]).size == page_image.size


def test_scene_spotting_gives_quads_in_original_pixels(client, runner, page_path, page_image):
    model_w, model_h = runner.processor.model_input_size(*page_image.size)
    answer = (f"(0, 0), ({model_w}, 0), ({model_w}, {model_h}), (0, {model_h}) EXIT\n"
              f"(2, 4), (30, 4), (30, 20), (2, 20) Gate 7")
    with _say(runner, answer):
        response = _ocr(client, image=str(page_path), prompt_type="prompt_scene_spotting", temperature=0,
                        postprocess=True, visualize=True)
    body = response.get_json()
    assert response.status_code == 200, body
    width, height = page_image.size
    assert [s["text"] for s in body["spots"]] == ["EXIT", "Gate 7"]
    assert body["spots"][0]["quad"] == [[0, 0], [width, 0], [width, height], [0, height]]
    assert body["repaired"] is False
    assert "EXIT" in body["markdown"] and "Gate 7" in body["markdown"]
    assert _png(body["visualization"]).size == page_image.size


def test_scene_spotting_truncated_answer_keeps_what_parses(client, runner, page_path):
    with _say(runner, "(2, 4), (30, 4), (30, 20), (2, 20) kept\n(5, 6), (7"):
        body = _ocr(client, image=str(page_path), prompt_type="prompt_scene_spotting", temperature=0,
                    postprocess=True).get_json()
    assert [s["text"] for s in body["spots"]] == ["kept"] and body["repaired"] is True


def test_image_to_svg_prompt_postprocess_and_rendering(client, runner, page_path, page_image, rendered_prompt):
    answer = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 220 300"><rect width="50" height="40" fill="red"/>'
    with _say(runner, answer):  # no temperature sent: this type's default (0.9) samples, forced anyway
        response = _ocr(client, image=str(page_path), prompt_type="prompt_image_to_svg",
                        postprocess=True, visualize=True)
    body = response.get_json()
    assert response.status_code == 200, body
    width, height = page_image.size
    assert f'viewBox="0 0 {width} {height}"' in rendered_prompt["prompt"]
    assert body["svg"].startswith("<svg") and body["svg"].rstrip().endswith("</svg>")
    assert body["repaired"] is True  # the <svg> element was closed
    rendered = _png(body["visualization"])
    assert rendered.format == "PNG" and rendered.convert("RGB").getpixel((10, 10))[0] > 200


def test_image_to_svg_without_an_svg_reports_a_visualization_error(client, runner, page_path):
    with _say(runner, "no picture here"):
        response = _ocr(client, image=str(page_path), prompt_type="prompt_image_to_svg", temperature=0,
                        visualize=True)
    body = response.get_json()
    assert response.status_code == 200 and "visualization_error" in body and "visualization" not in body


def test_general_question_is_sent_with_the_system_turn(client, runner, page_path, rendered_prompt):
    with _say(runner, "Forty two"):
        response = _ocr(client, image=str(page_path), prompt_type="prompt_general", temperature=0,
                        prompt="What is the total on this receipt?", stream=True)
        lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert "".join(line["response"] for line in lines) == "Forty two"
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    assert rendered_prompt["prompt"] == "What is the total on this receipt?"
    assert rendered_prompt["system"] == "You are a helpful assistant."


@pytest.mark.parametrize("body, message", [
    ({"prompt_type": "prompt_general"}, "'prompt' (the question) is required"),
    ({"prompt_type": "prompt_general", "prompt": "   "}, "Invalid 'prompt': must not be blank"),
    ({"prompt_type": "prompt_general", "prompt": 7}, "Invalid 'prompt'"),
    ({"prompt_type": "prompt_ocr", "prompt": "why?"}, "'prompt' is only used with prompt_general"),
    ({"prompt_type": "prompt_general", "prompt": "x" * 4001}, "at most 4000 characters"),
    ({"prompt_type": "prompt_ocr", "postprocess": True}, "'postprocess' applies to the prompt types"),
])
def test_prompt_field_validation_names_the_field(client, page_path, body, message):
    response = _ocr(client, image=str(page_path), **body)
    assert response.status_code == 400
    assert message in response.get_json()["error"]


@pytest.mark.parametrize("prompt_type, extra, sent, expected", [
    ("prompt_image_to_svg", {}, None, 0.9),  # upstream: low temperatures loop on SVG
    ("prompt_image_to_svg", {}, 0.2, 0.2),
    ("prompt_ocr", {}, None, 0.1),
    ("prompt_general", {"prompt": "What is this?"}, None, 0.1),
])
def test_default_temperature_per_prompt_type(client, runner, page_path, monkeypatch, prompt_type, extra, sent,
                                             expected):
    from forcing import StartSpy

    spy = StartSpy(runner, monkeypatch)
    spy.change = {"max_new_tokens": 1}
    body = {"image": str(page_path), "prompt_type": prompt_type, **extra}
    if sent is not None:
        body["temperature"] = sent
    assert client.post("/ocr", json=body).status_code == 200
    assert spy.last.decoding.temperature == expected


def test_health_lists_every_prompt_type(client):
    from model_runner.prompts import PROMPT_TYPES

    types = client.get("/health").get_json()["prompt_types"]
    assert types == list(PROMPT_TYPES) and len(types) == 8
    assert types[:4] == ["prompt_layout_all_en", "prompt_layout_only_en", "prompt_ocr", "prompt_grounding_ocr"]
