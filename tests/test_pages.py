"""The page service (dots_ocr_server/pages) under every entry point: what used to drift between the
five copies of the page pipeline is now one behaviour, checked here entry point by entry point.
In-process on the tiny checkpoint (CPU)."""
from __future__ import annotations

import base64
import io
import json
import struct
import threading
import zlib

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from forcing import SoftForced
from serverproc import page_png, wait_for
from server import create_app

PAGE = base64.b64encode(page_png()).decode()
DATA_URL = "data:image/png;base64," + PAGE
PLACEHOLDER = "<|img|><|imgpad|><|endofimg|>"


def _samples(client) -> dict:
    samples = {}
    for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _chat(client, max_tokens: int = 6, **extra):
    body = {"model": "dots-ocr", "temperature": 0, "max_tokens": max_tokens, **extra,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}},
                                                      {"type": "text", "text": PLACEHOLDER + "Read it."}]}]}
    return client.post("/v1/chat/completions", json=body)


# -- every generation reaches /metrics, whichever route ran it ------------------------------------


def test_v1_and_inspect_generations_are_counted_with_their_route(runner):
    client = create_app({}, runner=runner).test_client()
    before = _samples(client)
    ocr = client.post("/ocr", json={"image": PAGE, "image_format": "base64", "prompt_type": "prompt_ocr",
                                    "temperature": 0, "max_new_tokens": 5}).get_json()
    chat = _chat(client, max_tokens=7).get_json()
    inspected = client.post("/inspect", json={"image": PAGE, "image_format": "base64", "prompt_type": "prompt_ocr",
                                              "max_new_tokens": 4}).get_json()
    after = _samples(client)

    def moved(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert moved("dots_ocr:generation_tokens_total", route="/ocr") == ocr["eval_count"]
    assert moved("dots_ocr:generation_tokens_total", route="/v1/chat/completions") == \
        chat["usage"]["completion_tokens"]
    assert moved("dots_ocr:prompt_tokens_total", route="/v1/chat/completions") == chat["usage"]["prompt_tokens"]
    generated = moved("dots_ocr:generation_tokens_total", route="/inspect")
    assert 1 <= generated <= 4 and inspected["token_count"] <= generated  # eos counts, but is not traced
    for route, prompt_type in (("/ocr", "prompt_ocr"), ("/v1/chat/completions", "chat"), ("/inspect", "prompt_ocr")):
        finished = sum(moved("dots_ocr:request_success_total", finished_reason=reason, prompt_type=prompt_type,
                             route=route) for reason in ("stop", "length", "repetition"))
        assert finished == 1, route
        assert moved("dots_ocr:e2e_request_latency_seconds_count", route=route) == 1, route


def test_the_v1_queue_is_a_gauge(runner):
    app = create_app({}, runner=runner)
    state = app.extensions["dots_ocr"]
    client = app.test_client()
    assert _value(_samples(client), "dots_ocr:num_requests_queued") == 0
    assert state.lock.acquire()  # every slot taken: the chat waits in the queue
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(_chat(app.test_client(), max_tokens=2)))
    waiting.start()
    try:
        wait_for(lambda: state.lock.queued == 1, what="the chat in the queue")
        assert _value(_samples(client), "dots_ocr:num_requests_queued") == 1
    finally:
        state.lock.release()
        waiting.join(30)
    assert answers[0].status_code == 200
    assert _value(_samples(client), "dots_ocr:num_requests_queued") == 0


# -- the batch job's rows carry per-cell confidence, as /ocr's layout does -------------------------


def _forced_layout(runner, image):
    model_w, model_h = runner.processor.model_input_size(*image.size)
    answer = json.dumps([{"bbox": [0, 0, model_w, model_h // 2], "category": "Title", "text": "Hello"},
                         {"bbox": [0, model_h // 2, model_w, model_h], "category": "Text", "text": "world again"}])
    ids = runner.processor.tokenizer.encode(answer, add_special_tokens=False) + [min(runner.generator.eos_ids)]
    return answer, ids


def test_batch_rows_carry_the_same_cell_confidence_as_ocr(runner, tmp_path):
    import pyarrow as pa

    from dots_ocr_server.batch.actor import JobSettings, PageOcr

    image = Image.open(io.BytesIO(page_png())).convert("RGB")
    path = tmp_path / "page.png"
    image.save(path)
    answer, ids = _forced_layout(runner, image)
    with SoftForced(runner.model, ids):
        served = create_app({}, runner=runner).test_client().post("/ocr", json={
            "image": str(path), "prompt_type": "prompt_layout_all_en", "temperature": 0, "postprocess": True,
            "max_new_tokens": len(ids) + 2}).get_json()
    actor = PageOcr(JobSettings(postprocess=True, temperature=0, max_new_tokens=len(ids) + 2, batch_size=1),
                    runner=runner)
    page = {"key": "k", "source": str(path), "sha256": "x", "kind": "image", "page": 1, "page_count": 1}
    try:
        with SoftForced(runner.model, ids):
            row = actor(pa.Table.from_pylist([page])).to_pylist()[0]
    finally:
        actor.close()
    assert served["response"] == row["response"] == answer
    cells = json.loads(row["layout"])
    assert [c["text"] for c in cells] == ["Hello", "world again"]
    assert all(0 < c["confidence"]["min"] <= c["confidence"]["mean"] < 1 for c in cells)
    assert cells == served["layout"]  # boxes in page pixels and confidence: one pipeline
    assert (row["width"], row["height"]) == image.size  # the page the boxes are in (for its document)


# -- one pixel cap for the server, the batch job and the client -----------------------------------


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (its pixel data is never read: the cap is
    checked on the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_one_pixel_cap_for_server_batch_job_and_client(runner, tmp_path):
    from dots_ocr_server.api.config import ServerConfig
    from dots_ocr_server.batch.inputs import page_policy
    from dots_ocr_server.client import inputs as client_inputs
    from dots_ocr_server.errors import RequestError
    from dots_ocr_server.pages import PageService, PageSource
    from image_utils import ImagePolicy
    from image_utils.policy import DEFAULT_MAX_IMAGE_PIXELS

    caps = {"server": ServerConfig().max_image_pixels, "batch job": page_policy().max_image_pixels,
            "client": client_inputs._policy().max_image_pixels, "loader": ImagePolicy().max_image_pixels}
    assert set(caps.values()) == {DEFAULT_MAX_IMAGE_PIXELS}, caps
    over = _png_header_claiming(10_001, DEFAULT_MAX_IMAGE_PIXELS // 10_000)  # just past the cap
    assert 10_001 * (DEFAULT_MAX_IMAGE_PIXELS // 10_000) > DEFAULT_MAX_IMAGE_PIXELS
    (tmp_path / "big.png").write_bytes(over)
    served = create_app({}, runner=runner).test_client().post(
        "/ocr", json={"image": base64.b64encode(over).decode(), "image_format": "base64"})
    assert served.status_code == 413
    with pytest.raises(RequestError) as batch:
        PageService(None, page_policy()).load(PageSource(data=over))
    assert batch.value.status == 413 and batch.value.message == served.get_json()["error"]
    found = client_inputs.classify(tmp_path / "big.png")
    assert found.error and "too large" in found.error


# -- the minimum temperature: the same rule on /ocr and /v1 ---------------------------------------


@pytest.mark.parametrize("temperature", [1e-5, 5e-324])
def test_below_the_minimum_temperature_is_refused_on_both_apis(runner, temperature):
    from model_runner.defaults import TEMPERATURE_RULE

    client = create_app({}, runner=runner).test_client()
    ocr = client.post("/ocr", json={"image": PAGE, "image_format": "base64", "temperature": temperature})
    chat = _chat(client, temperature=temperature)
    assert ocr.status_code == chat.status_code == 400
    assert ocr.get_json()["error"] == f"Invalid 'temperature': {TEMPERATURE_RULE}"
    error = chat.get_json()["error"]
    assert error["param"] == "temperature" and error["message"].endswith(TEMPERATURE_RULE)
    for greedy in (_chat(client, temperature=0), client.post("/ocr", json={
            "image": PAGE, "image_format": "base64", "temperature": 0, "max_new_tokens": 2})):
        assert greedy.status_code == 200


# -- /inspect's answer goes through the engine, beside other requests, on the fast path -----------


@pytest.fixture(scope="module")
def fast_runner(tiny_ckpt):
    """The fast path (StaticDecoder, eager) with three slots, on a model of its own."""
    from model_runner.fast_decode import StaticDecoder
    from model_runner.runner import ModelRunner

    plain = ModelRunner(tiny_ckpt, device="cpu", dtype="float32").load()
    decoder = StaticDecoder(plain.model, 2048, slots=3, compile=False, kv_chunk=64)
    decoder.warmup()
    fast = ModelRunner.from_model(plain.model, plain.processor, decoder=decoder, max_batch_size=3)
    yield fast
    decoder.close()


@pytest.mark.slow
def test_an_inspect_answer_beside_a_batch_leaves_every_greedy_answer_as_alone(fast_runner):
    app = create_app({"max_batch_size": 3}, runner=fast_runner)
    pages = {name: base64.b64encode(_page_variant(i)).decode() for i, name in enumerate(("a", "b", "c"))}

    def ocr(client, name):
        return client.post("/ocr", json={"image": pages[name], "image_format": "base64", "prompt_type": "prompt_ocr",
                                         "temperature": 0, "max_new_tokens": 40}).get_json()["response"]

    def inspect(client):
        return client.post("/inspect", json={"image": pages["c"], "image_format": "base64",
                                             "prompt_type": "prompt_ocr", "max_new_tokens": 40}).get_json()["text"]

    alone = {name: ocr(app.test_client(), name) for name in pages}
    alone_inspect = inspect(app.test_client())
    config = fast_runner.model.config
    seen_attention = set()
    together: dict = {}
    done = threading.Event()

    def watch():  # what a forward pass on another thread sees, every half millisecond (a spin would
        # take the GIL from the decoding loop and make the test ten times slower)
        while not done.wait(0.0005):
            seen_attention.add(str(config._attn_implementation))

    workers = [threading.Thread(target=lambda n=name: together.__setitem__(n, ocr(app.test_client(), n)))
               for name in ("a", "b")]
    workers.append(threading.Thread(target=lambda: together.__setitem__("inspect", inspect(app.test_client()))))
    watcher = threading.Thread(target=watch)
    watcher.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    done.set()
    watcher.join()
    assert together == {"a": alone["a"], "b": alone["b"], "inspect": alone_inspect}
    # the inspect answer is the /ocr answer of its page: one decoding path
    assert alone_inspect == alone["c"].rstrip()
    assert fast_runner.engine.max_rows_seen >= 2
    assert len(seen_attention) == 1  # nothing rewrites the model's configuration per step


def _page_variant(index: int) -> bytes:
    from PIL import ImageDraw

    image = Image.new("RGB", (224 + 56 * index, 308), "white")
    draw = ImageDraw.Draw(image)
    for row in range(6 + index):
        draw.rectangle([16, 16 + row * 30, 180 + index * 20 - row % 3 * 15, 28 + row * 30], fill=(25, 25, 25))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
