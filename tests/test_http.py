"""The JSON reader every route shares (dots_ocr_server/api/http.py): bodies in every encoding
JSON allows, nesting bounded in all of them, and lone surrogates refused by name, on every route
that takes JSON."""
from __future__ import annotations

import base64
import copy
import io
import json

import pytest
from PIL import Image

ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
SURROGATES = ["\ud800", "\udc80", "a\udfffb", "\ud83d"]


def _page_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PAGE = _page_b64()
DATA_URL = "data:image/png;base64," + PAGE


@pytest.fixture()
def client(runner):
    from server import create_app

    return create_app({}, runner=runner).test_client()


def _post(client, path: str, raw: bytes):
    return client.post(path, data=raw, content_type="application/json")


# Each JSON route with a body it accepts, and the paths of that body's string fields.
ROUTES = {
    "/ocr": ({"image": PAGE, "image_format": "base64", "prompt_type": "prompt_general", "prompt": "What is it?",
              "max_new_tokens": 2},
             ["image", "image_format", "prompt_type", "prompt"]),
    "/inspect": ({"image": PAGE, "image_format": "base64", "prompt_type": "prompt_ocr", "text": "hello"},
                 ["image", "image_format", "prompt_type", "text"]),
    "/ui/render": ({"image": PAGE, "image_format": "base64"}, ["image", "image_format"]),
    "/jobs": ({"document": PAGE, "document_format": "base64", "prompt_type": "prompt_general",
               "prompt": "What is it?", "pages": "1"},
              ["document", "document_format", "prompt_type", "prompt", "pages"]),
    "/v1/chat/completions": ({"model": "dots-ocr", "max_tokens": 2, "user": "someone", "stop": ["x"],
                              "messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": [
                                               {"type": "image_url", "image_url": {"url": DATA_URL}},
                                               {"type": "text", "text": "Read it."}]}]},
                             ["model", "user", "stop[0]", "messages[0].role", "messages[0].content",
                              "messages[1].content[0].type", "messages[1].content[0].image_url.url",
                              "messages[1].content[1].text"]),
}
FIELDS = [(route, path) for route, (_, paths) in ROUTES.items() for path in paths]


def _set(body, path: str, value):
    """``body`` with the string at ``path`` (``a.b[0].c``) given ``value`` spliced into its middle."""
    body = copy.deepcopy(body)
    keys = [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")]
    target = body
    for key in keys[:-1]:
        target = target[key]
    old = target[keys[-1]]
    target[keys[-1]] = old[:1] + value + old[1:]
    return body


@pytest.mark.parametrize("route, path", FIELDS)
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_a_lone_surrogate_in_any_string_field_is_a_400_naming_it(client, route, path, surrogate):
    body = _set(ROUTES[route][0], path, surrogate)
    # json.dumps spells the lone surrogate as its escape, which json.loads turns back into one
    response = _post(client, route, json.dumps(body).encode("ascii"))
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.is_json
    message = json.dumps(response.get_json())
    assert "surrogate" in message and path in message


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_lone_surrogate_in_a_field_name_is_a_400(client, route):
    body = {**ROUTES[route][0], "x\udc80": 1}
    response = _post(client, route, json.dumps(body).encode("ascii"))
    assert response.status_code == 400 and "surrogate" in json.dumps(response.get_json())


def test_a_surrogate_pair_is_a_character_not_an_error(client):
    response = _post(client, "/ocr", json.dumps({**ROUTES["/ocr"][0], "prompt": "What is \ud83d\ude00?"}).encode())
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("depth", [1000, 100_000])
@pytest.mark.parametrize("route", list(ROUTES))
def test_deep_nesting_in_any_encoding_is_a_400_not_a_500(client, route, encoding, depth):
    # escaped quotes inside strings and brackets everywhere: what the byte scanner missed
    raw = ('{"image": "\\"", "a": ' + '[{"b": "\\"[", "c": ' * depth).encode(encoding)
    response = _post(client, route, raw)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert "nested deeper than" in json.dumps(response.get_json())


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_request_in_any_json_encoding_is_served(client, encoding):
    body = {"image": PAGE, "image_format": "base64", "prompt_type": "prompt_ocr", "max_new_tokens": 2}
    response = _post(client, "/ocr", json.dumps(body).encode(encoding))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["prompt_type"] == "prompt_ocr"


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00", b'{"image": "\xc3\x28"}', b"\x00\x00\xfe\xff\x00\x00\xd8"])
def test_bytes_that_are_not_json_text_are_a_400(client, raw):
    response = _post(client, "/ocr", raw)
    assert response.status_code == 400 and response.is_json


def test_a_bare_null_body_is_invalid_json(client):
    response = _post(client, "/ocr", b"null")
    assert response.status_code == 400 and response.get_json()["error"] == "Invalid JSON body"


def test_the_reader_on_its_own():
    from dots_ocr_server.api.errors import RequestError
    from dots_ocr_server.api.http import first_lone_surrogate, parse_json

    assert parse_json(b"") is None
    assert parse_json(json.dumps({"a": ["\u00e9"]}).encode("utf-32")) == {"a": ["\u00e9"]}
    assert first_lone_surrogate({"a": [{"b": "x\ud800"}]}) == "a[0].b"
    assert first_lone_surrogate(["ok", "\U0001F600"]) is None  # a pair, as json.loads joins it
    with pytest.raises(RequestError, match="nested deeper"):
        parse_json(("[" * 200).encode("utf-16-le"))
