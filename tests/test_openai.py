"""The OpenAI routes: Flask test-client tests of the protocol, SlotPool's FIFO queue,
then a real server (waitress) driven by the official ``openai`` package and by raw HTTP, and
Schemathesis against ``/openapi.json``."""
from __future__ import annotations

import base64
import concurrent.futures
import functools
import io
import json
import socket
import threading

import pytest
import requests
from PIL import Image

from serverproc import local_origin, page_png, quiet_folder_handler, running_server, wait_for

PLACEHOLDER = "<|img|><|imgpad|><|endofimg|>"
OCR_PROMPT = "Extract the text content from this image."  # prompt_ocr's text


def layout_only_prompt() -> str:
    """prompt_layout_only_en's text: on the test page the tiny model never ends it (no eos)."""
    from model_runner.prompts import prompt_text

    return prompt_text("prompt_layout_only_en", None, image_size=(224, 308))




PNG = page_png()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def upstream_messages(prompt: str = OCR_PROMPT, url: str = DATA_URL) -> list[dict]:
    """The message upstream's parser sends: an image_url part, then placeholder + prompt."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": PLACEHOLDER + prompt}]}]


def chat(client, **body):
    body = {"model": "model", "messages": upstream_messages(), "max_completion_tokens": 4, "temperature": 0,
            **body}
    return client.post("/v1/chat/completions", json=body)


def sse_events(raw: str) -> list:
    """The data of each server-sent event (parsed JSON, or the literal [DONE])."""
    assert raw.endswith("\n\n")
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# ---------------------------------------------------------------------------------------------
# Flask test client
# ---------------------------------------------------------------------------------------------


def test_upstream_style_request_is_the_ocr_prompt(client):
    """Upstream's call (data URL, placeholder + prompt, max_completion_tokens, temperature, top_p)
    reaches the model exactly as /ocr's prompt_ocr does: greedy answers and prompt lengths agree."""
    response = chat(client, max_completion_tokens=12, top_p=0.9)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "dots-ocr" and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    ocr = client.post("/ocr", json={"image": base64.b64encode(PNG).decode(), "image_format": "base64",
                                    "prompt_type": "prompt_ocr", "temperature": 0, "max_new_tokens": 12}).get_json()
    assert choice["message"]["content"] == ocr["response"]
    usage = body["usage"]
    assert usage["prompt_tokens"] == ocr["prompt_eval_count"]
    assert usage["completion_tokens"] == ocr["eval_count"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_usage_counts_the_tokens(client, runner):
    body = chat(client, max_completion_tokens=None, max_tokens=5, logprobs=True, top_logprobs=2).get_json()
    usage, choice = body["usage"], body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 5
    assert all(len(entry["top_logprobs"]) == 2 and entry["logprob"] <= 0 for entry in content)
    assert all(entry["bytes"] == list(entry["token"].encode()) for entry in content)
    image = Image.open(io.BytesIO(PNG))
    turns = [{"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": PLACEHOLDER + OCR_PROMPT}]}]
    prompt = runner.processor.page_inputs(image, None, messages=turns).tensors["input_ids"]
    assert usage["prompt_tokens"] == prompt.shape[1]


def test_system_prompt_reaches_the_model(client, runner):
    system = "You read pages."
    messages = [{"role": "system", "content": system}, *upstream_messages()]
    with_system = chat(client, messages=messages).get_json()["usage"]["prompt_tokens"]
    plain = chat(client).get_json()["usage"]["prompt_tokens"]
    processor = runner.processor

    def tokens(text: str) -> int:
        return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    system_turn = (tokens(processor.render_prompt(OCR_PROMPT, system=system))
                   - tokens(processor.render_prompt(OCR_PROMPT)))
    assert system_turn > 0 and with_system == plain + system_turn
    # developer (OpenAI's newer name) is the same turn; text parts and assistant turns are accepted
    messages = [{"role": "developer", "content": [{"type": "text", "text": system}]}, *upstream_messages(),
                {"role": "assistant", "content": "earlier answer"}, {"role": "user", "content": "again"}]
    assert chat(client, messages=messages[:2]).get_json()["usage"]["prompt_tokens"] == with_system
    assert chat(client, messages=messages).status_code == 200


def test_image_without_placeholder_goes_first(client):
    """Without the placeholder the image goes in front of the text (vLLM's rule), one line above it."""
    messages = [{"role": "user", "content": [{"type": "text", "text": OCR_PROMPT},
                                             {"type": "image_url", "image_url": {"url": DATA_URL, "detail": "auto"}}]}]
    with_newline = chat(client, messages=messages).get_json()["usage"]["prompt_tokens"]
    upstream = chat(client).get_json()["usage"]["prompt_tokens"]
    assert with_newline == upstream + 1


def test_streaming_sse_framing(client):
    plain = chat(client, max_completion_tokens=10).get_json()
    response = chat(client, max_completion_tokens=10, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(response.get_data(as_text=True))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2])
    assert text == plain["choices"][0]["message"]["content"]
    # without include_usage there is no usage chunk and no usage field
    events = sse_events(chat(client, max_completion_tokens=3, stream=True).get_data(as_text=True))
    assert all("usage" not in e for e in events[:-1]) and events[-2]["choices"][0]["finish_reason"]


def test_stop_string_cuts_the_answer(client):
    full = chat(client, max_completion_tokens=16).get_json()["choices"][0]["message"]["content"]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop and stop in full
    body = chat(client, max_completion_tokens=16, stop=[stop, "\u2603never"]).get_json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == full[:full.index(stop)]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert body["usage"]["completion_tokens"] <= 16
    events = sse_events(chat(client, max_completion_tokens=16, stop=stop, stream=True).get_data(as_text=True))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == full[:full.index(stop)] and events[-2]["choices"][0]["stop_reason"] == stop


def test_seed_is_reproducible(client):
    sampled = [chat(client, temperature=1.0, seed=7, max_completion_tokens=8).get_json() for _ in range(2)]
    assert sampled[0]["choices"][0]["message"] == sampled[1]["choices"][0]["message"]


@pytest.mark.slow
def test_parameters_reach_the_runner(client, runner, monkeypatch):
    """Each OpenAI parameter becomes the runner's argument of the same meaning; OpenAI's defaults
    for those left out; max tokens capped at --max-new-tokens-limit (upstream asks 32768)."""
    from forcing import StartSpy

    spy = StartSpy(runner, monkeypatch)
    assert chat(client, max_completion_tokens=None, temperature=None).status_code == 200
    assert chat(client, max_completion_tokens=3, max_tokens=9, temperature=0.7, top_p=0.5, seed=-1,
                repetition_penalty=1.05, frequency_penalty=0.5, presence_penalty=-0.5, logprobs=True,
                top_logprobs=3).status_code == 200
    assert chat(client, max_completion_tokens=32768, temperature=0).status_code == 200
    defaults, given, capped = spy.requests
    assert defaults.decoding.temperature == 1.0 and defaults.decoding.top_p == 1.0 and defaults.decoding.seed is None
    assert defaults.max_new_tokens == 24000 and defaults.decoding.logprobs is None
    d = defaults.decoding
    assert (d.repetition_penalty, d.frequency_penalty, d.presence_penalty) == (1, 0, 0)
    g = given.decoding
    assert given.max_new_tokens == 3 and g.temperature == 0.7 and g.top_p == 0.5
    assert g.seed == 2**64 - 1 and g.logprobs == 3
    assert (g.repetition_penalty, g.frequency_penalty, g.presence_penalty) == (1.05, 0.5, -0.5)
    assert capped.max_new_tokens == 24000 and capped.decoding.temperature == 0.0
    assert given.prompt.messages[0]["content"][1]["text"] == PLACEHOLDER + OCR_PROMPT
    assert given.prompt.prompt_type is None


def test_repetition_guard_is_length_with_stop_reason(client, runner, monkeypatch):
    monkeypatch.setattr(runner.generator, "repetition_window", 64)
    body = chat(client, messages=upstream_messages(layout_only_prompt()), max_completion_tokens=2000).get_json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["stop_reason"] == "repetition"
    assert body["usage"]["completion_tokens"] < 2000


def test_error_mid_stream_is_an_error_event(client, runner, monkeypatch):
    original = runner.start

    class Failing:
        """The real handle, whose pieces fail right after the first text (the stream's first chunk)."""

        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def pieces(self):
            for piece in self.handle.pieces():
                yield piece
                if piece.text:
                    raise RuntimeError("the device fell over")

    monkeypatch.setattr(runner, "start", lambda request, stats=None: Failing(original(request, stats)))
    events = sse_events(chat(client, max_completion_tokens=20, stream=True).get_data(as_text=True))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
    assert "the device fell over" in events[-2]["error"]["message"]
    assert client.get("/health").get_json()["running"] == 0


@pytest.mark.parametrize("extra, param, words", [
    ({"foo": 1}, "foo", "Unrecognized request argument"),
    ({"n": 2}, "n", "n=1"),
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"logprobs": True, "top_logprobs": 9}, "top_logprobs", "5"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]", "role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0]", "type"),
    ({"messages": [{"role": "user", "content": "hello"}]}, "messages", "Exactly one image"),
    ({"messages": upstream_messages() + upstream_messages()}, "messages", "Exactly one image"),
    ({"messages": upstream_messages(prompt=PLACEHOLDER)}, "messages[0].content[1].text", "placeholder"),
    ({"messages": [{"role": "system", "content": PLACEHOLDER}, *upstream_messages()]}, "messages[0].content",
     "placeholder"),
    ({"messages": upstream_messages(url="file:///etc/passwd")}, "image_url.url", "data URL"),
    ({"messages": upstream_messages(url="data:image/png;base64,AAAA")}, "image_url.url", None),
    ({"messages": upstream_messages(url="http://127.0.0.1:9/page.png")}, "image_url.url", "private"),
])
def test_bad_requests_get_openai_errors(client, extra, param, words):
    error = assert_openai_error(chat(client, **extra), 400, param)
    assert error["type"] == "invalid_request_error"
    if words:
        assert words in error["message"], error


def test_error_statuses_and_shapes(runner):
    from server import create_app

    client = create_app({"api_key": "k3y", "max_body_mb": 0.01}, runner=runner).test_client()
    assert assert_openai_error(client.get("/v1/models"), 401)["code"] == "invalid_api_key"
    assert_openai_error(chat(client), 401)
    auth = {"Authorization": "Bearer k3y"}
    models = client.get("/v1/models", headers=auth).get_json()
    assert models["object"] == "list" and models["data"][0]["id"] == "dots-ocr"
    assert client.get("/v1/models/dots-ocr", headers=auth).get_json()["object"] == "model"
    assert_openai_error(client.get("/v1/models/gpt-4", headers=auth), 404, "model")
    assert_openai_error(client.get("/v1/nowhere", headers=auth), 404)
    response = client.get("/v1/chat/completions", headers=auth)
    assert_openai_error(response, 405)
    assert response.headers["Allow"] == "POST"
    assert_openai_error(client.post("/v1/chat/completions", headers=auth, data="{"), 400)
    big = client.post("/v1/chat/completions", headers=auth, json={"messages": upstream_messages("x" * 20000)})
    assert assert_openai_error(big, 413)["code"] == "request_too_large"
    # /ocr keeps the dots.ocr API document's error shape
    assert client.post("/ocr", json={"image": "x"}).get_json()["error"] == (
        "Unauthorized: send 'Authorization: Bearer <api key>'")


def test_openapi_document_describes_every_route(client):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    # every JSON route (the jobs' too, when they are on)
    import re

    json_routes = {(re.sub(r"<\w+:", "<", rule.rule), method.lower())
                   for rule in client.application.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}
                   if rule.endpoint not in ("static", "ui.page", "ui.page_slash", "ui.static", "metrics.metrics_route",
                                            "openai._unknown_route")}
    documented = {(path.replace("{", "<").replace("}", ">"), method) for path, item in doc["paths"].items()
                  for method in item}
    assert json_routes <= documented, json_routes - documented
    assert {"/inspect", "/ui/render", "/ui/config"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    assert "messages" in schemas["ChatCompletionRequest"]["properties"]
    assert "prompt_ocr" in schemas["OCRRequest"]["properties"]["prompt_type"]["enum"]


# ---------------------------------------------------------------------------------------------
# SlotPool's FIFO line
# ---------------------------------------------------------------------------------------------


def test_slot_pool_queue_is_fifo_and_bounded():
    from dots_ocr_server.api.state import QueueFull, SlotPool

    pool = SlotPool(1)
    assert pool.acquire_queued(2)
    order = []

    def waiter(name):
        assert pool.acquire_queued(2)
        order.append(name)

    threads = []
    for name in ("first", "second"):
        threads.append(threading.Thread(target=waiter, args=(name,)))
        threads[-1].start()
        wait_for(functools.partial(lambda n: pool.queued == n, len(threads)))
    with pytest.raises(QueueFull):
        pool.acquire_queued(2)
    assert not pool.acquire()  # the non-queued API never jumps the line
    for k in range(2):
        pool.release()
        wait_for(lambda k=k: len(order) == k + 1)
    for thread in threads:
        thread.join(5)
    assert order == ["first", "second"] and pool.queued == 0 and pool.running == 1
    pool.release()
    assert pool.acquire() and pool.running == 1


def test_slot_pool_waiter_that_gives_up_leaves_the_line():
    from dots_ocr_server.api.state import SlotPool

    pool = SlotPool(1)
    assert pool.acquire()
    gone = threading.Event()
    result = []
    thread = threading.Thread(target=lambda: result.append(pool.acquire_queued(4, gone.is_set, poll_s=0.01)))
    thread.start()
    wait_for(lambda: pool.queued == 1)
    gone.set()
    thread.join(5)
    assert result == [False] and pool.queued == 0 and pool.running == 1


def test_v1_waits_in_the_queue_while_ocr_gets_429(runner):
    from server import create_app

    app = create_app({"max_batch_size": 1, "max_queue": 1}, runner=runner)
    client = app.test_client()
    pool = app.extensions["dots_ocr"].lock
    assert pool.acquire()  # a request in progress
    results = []
    thread = threading.Thread(target=lambda: results.append(chat(app.test_client())))
    thread.start()
    wait_for(lambda: client.get("/health").get_json()["queued"] == 1)
    over = chat(client)
    assert assert_openai_error(over, 429)["type"] == "rate_limit_error"
    assert over.headers["Retry-After"] == "1"
    busy = client.post("/ocr", json={"image": base64.b64encode(PNG).decode(), "image_format": "base64"})
    assert busy.status_code == 429 and busy.get_json()["error"] == "Server is busy processing another request"
    pool.release()
    thread.join(60)
    assert results[0].status_code == 200
    health = client.get("/health").get_json()
    assert health["queued"] == 0 and health["running"] == 0


# ---------------------------------------------------------------------------------------------
# A real server: the openai package, raw HTTP, Schemathesis
# ---------------------------------------------------------------------------------------------

API_KEY = "test-key"


@pytest.fixture(scope="module")
def image_host(tmp_path_factory):
    """A local HTTP server (loopback) serving page.png."""
    folder = tmp_path_factory.mktemp("www")
    (folder / "page.png").write_bytes(PNG)
    with local_origin(quiet_folder_handler(folder)) as url:
        yield url


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    # No repetition guard: the tiny model loops, and holding the slots needs long generations.
    with running_server(tiny_ckpt, "--repetition-window", "0", "--threads", "4", "--max-batch-size", "2",
                        "--max-queue", "64", "--api-key", API_KEY, "--allow-private-urls",
                        log_dir=tmp_path_factory.mktemp("logs")) as url:
        yield url


@pytest.fixture()
def sdk(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _health(server) -> dict:
    return requests.get(server + "/health", timeout=10).json()


def _hold_slot(server) -> requests.Response:
    """A long /ocr stream (the tiny model never ends prompt_layout_only_en) holding one slot."""
    response = requests.post(server + "/ocr", headers={"Authorization": f"Bearer {API_KEY}"}, stream=True,
                             timeout=120, json={"image": base64.b64encode(PNG).decode(), "image_format": "base64",
                                                "prompt_type": "prompt_layout_only_en", "temperature": 0,
                                                "max_new_tokens": 20000, "stream": True})
    assert response.status_code == 200
    # keep the line iterator alive: when a half-read one is garbage-collected, urllib3 closes the
    # connection (and the server then frees the slot)
    response.lines = response.iter_lines()
    next(response.lines)
    return response


@pytest.mark.slow
def test_sdk_sync_and_stream(sdk, image_host):
    completion = sdk.chat.completions.create(model="model", messages=upstream_messages(), max_completion_tokens=6,
                                             temperature=0.1, top_p=0.9)
    assert completion.model == "dots-ocr" and completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens <= 6 and completion.choices[0].finish_reason in ("stop", "length")
    chunks = list(sdk.chat.completions.create(model="model", messages=upstream_messages(), max_completion_tokens=6,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens <= 6
    from_url = sdk.chat.completions.create(model="x", messages=upstream_messages(url=image_host + "/page.png"),
                                           max_tokens=6, temperature=0)
    plain = sdk.chat.completions.create(model="x", messages=upstream_messages(), max_tokens=6, temperature=0)
    assert from_url.choices[0].message.content == plain.choices[0].message.content
    assert [m.id for m in sdk.models.list()] == ["dots-ocr"]


@pytest.mark.slow
def test_sdk_exceptions(sdk, server):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "no image"}])
    assert info.value.param == "messages" or "Exactly one image" in str(info.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4o")


@pytest.mark.slow
def test_sdk_calls_queue_behind_a_busy_server(sdk, server):
    """Both slots busy: 64 concurrent SDK calls (upstream's parser sends 64) wait in the queue; the
    next one gets RateLimitError (429 past --max-queue) and /ocr gets its 429 at once; all 64
    complete once the slots free."""
    import openai

    held = [_hold_slot(server), _hold_slot(server)]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        futures = [pool.submit(sdk.chat.completions.create, model="m", messages=upstream_messages(),
                               max_completion_tokens=1, temperature=0) for _ in range(64)]
        try:
            wait_for(lambda: _health(server)["queued"] == 64, 120)
            with pytest.raises(openai.RateLimitError) as info:
                sdk.chat.completions.create(model="m", messages=upstream_messages(), max_tokens=1)
            assert info.value.response.headers["Retry-After"] == "1"
            busy = requests.post(server + "/ocr", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10,
                                 json={"image": base64.b64encode(PNG).decode(), "image_format": "base64"})
            assert busy.status_code == 429 and busy.json()["error"] == "Server is busy processing another request"
            assert not any(f.done() for f in futures)
        finally:
            for response in held:
                response.close()
        assert all(f.result(timeout=300).usage.completion_tokens == 1 for f in futures)
    wait_for(lambda: _health(server)["running"] == 0 and _health(server)["queued"] == 0)


def _raw_request(server, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    host, port = server.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.slow
def test_raw_sse_and_disconnect_frees_the_slot(server):
    sock = _raw_request(server, {"model": "m", "messages": upstream_messages(layout_only_prompt()), "stream": True,
                                 "temperature": 0, "max_tokens": 20000})
    received = b""
    while b"\r\n\r\n" not in received or received.count(b"data: ") < 2:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    assert b'"role": "assistant"' in body
    wait_for(lambda: _health(server)["running"] == 1)
    sock.close()  # hang up mid-stream
    wait_for(lambda: _health(server)["running"] == 0, 60)


@pytest.mark.slow
def test_queued_client_hang_up_leaves_the_queue(server):
    held = [_hold_slot(server), _hold_slot(server)]
    try:
        sock = _raw_request(server, {"model": "m", "messages": upstream_messages(), "max_tokens": 2})
        wait_for(lambda: _health(server)["queued"] == 1, 60)
        sock.close()
        wait_for(lambda: _health(server)["queued"] == 0, 10)
        assert _health(server)["running"] == 2
    finally:
        for response in held:
            response.close()
    wait_for(lambda: _health(server)["running"] == 0, 60)


@pytest.mark.slow
def test_schemathesis_never_gets_a_5xx(runner, tmp_path):
    """Every request generated from /openapi.json, valid or not, gets a documented status, never
    a 5xx."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import status_code_conformance

    from server import create_app

    app = create_app({"max_new_tokens_limit": 4, "data_dir": str(tmp_path / "jobs")}, runner=runner)
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    failures, calls = [], []

    def run(operation, mode) -> None:
        label = operation.label

        @hypothesis.settings(max_examples=25, deadline=None, database=None, derandomize=True,
                             phases=[hypothesis.Phase.generate],
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            response = case.call()
            calls.append((label, response.status_code))
            try:
                case.validate_response(response, checks=(not_a_server_error, status_code_conformance))
            except Exception as exc:  # noqa: BLE001 - collected, reported together below
                failures.append(f"{label}: {exc}")

        try:
            check()
        except hypothesis.errors.Unsatisfiable:  # a route without inputs has no invalid request
            assert mode == schemathesis.GenerationMode.NEGATIVE

    try:
        for operation in schema.get_all_operations():
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                run(operation.ok(), mode)
    finally:
        app.extensions["dots_ocr"].jobs.stop()
    assert not failures, "\n".join(failures[:5])
    fuzzed = {label.split(" ", 1)[1] for label, _ in calls}
    assert {"/ocr", "/inspect", "/ui/render", "/jobs", "/jobs/{job_id}/result"} <= fuzzed
    assert {label for label, _ in calls} >= {"POST /ocr", "POST /v1/chat/completions", "GET /v1/models"}
