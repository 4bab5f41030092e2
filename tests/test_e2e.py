"""End to end: ``python server.py`` as a real process (waitress) on the tiny checkpoint, talked
to over HTTP with ``requests``."""
from __future__ import annotations

import base64
import concurrent.futures
import json
import time

import pytest
import requests

from serverproc import local_origin, page_png, quiet_folder_handler, running_server

pytestmark = pytest.mark.slow  # the tier of pyproject.toml's "slow" marker




PAGE = base64.b64encode(page_png()).decode()


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    # No repetition guard here: the tiny random model loops, and these tests need long generations
    # (with prompt_layout_only_en the tiny model never emits eos).
    with running_server(tiny_ckpt, "--repetition-window", "0", "--threads", "16",
                        log_dir=tmp_path_factory.mktemp("logs")) as url:
        yield url


@pytest.fixture(scope="module")
def image_host(tmp_path_factory):
    """A local HTTP server (loopback) serving page.png."""
    folder = tmp_path_factory.mktemp("www")
    (folder / "page.png").write_bytes(page_png())
    with local_origin(quiet_folder_handler(folder)) as url:
        yield url


def _ocr(url, timeout=60, **body):
    body = {"image": PAGE, "image_format": "base64", "temperature": 0, "prompt_type": "prompt_ocr", **body}
    return requests.post(url + "/ocr", json=body, timeout=timeout)


def _until_ok(url, deadline_s, **body):
    """Retry while busy (429) until a request succeeds; returns seconds taken."""
    start = time.monotonic()
    while True:
        response = _ocr(url, max_new_tokens=4, **body)
        if response.status_code == 200:
            return time.monotonic() - start
        assert response.status_code == 429, response.text
        assert time.monotonic() - start < deadline_s, "the server stayed busy"
        time.sleep(0.05)


def test_health_and_plain_request(server):
    assert requests.get(server + "/health", timeout=5).json()["model_loaded"] is True
    body = _ocr(server, max_new_tokens=8).json()
    assert body["model"] == "dots-ocr" and body["prompt_type"] == "prompt_ocr"


def test_stream_arrives_line_by_line(server):
    started = time.monotonic()
    arrivals, lines = [], []
    with requests.post(server + "/ocr", json={"image": PAGE, "image_format": "base64", "temperature": 0,
                                              "prompt_type": "prompt_layout_only_en", "max_new_tokens": 600,
                                              "stream": True}, stream=True, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        for raw in response.iter_lines():
            arrivals.append(time.monotonic() - started)
            lines.append(json.loads(raw))
    assert lines[-1]["done"] is True and lines[-1]["response"] == ""
    # lines come as they are made, every --stream-interval-ms (10) at most: many, not one at the end
    assert 5 <= len(lines) <= 601
    # The first line reached us well before generation ended: lines are sent as they are made.
    assert arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1], len(lines))
    plain = _ocr(server, max_new_tokens=600, prompt_type="prompt_layout_only_en").json()["response"]
    assert "".join(line["response"] for line in lines) == plain


def test_burst_of_concurrent_requests(server):
    def one(_):
        return _ocr(server, max_new_tokens=40, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(one, range(12)))
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 1
    assert 429 in statuses  # one request at a time: the others were told the server is busy
    assert _until_ok(server, deadline_s=30) < 30


def test_client_disconnect_mid_stream_frees_the_server(server):
    response = requests.post(server + "/ocr", json={"image": PAGE, "image_format": "base64", "temperature": 0,
                                                    "max_new_tokens": 20000, "stream": True,
                                                    "prompt_type": "prompt_layout_only_en"},
                             stream=True, timeout=60)
    lines = response.iter_lines()
    assert json.loads(next(lines))["done"] is False
    response.close()  # hang up mid-stream
    # 20,000 tokens would keep the tiny model busy for a long time; cancelled, it frees at once.
    assert _until_ok(server, deadline_s=10) < 10


def test_client_timeout_on_plain_request_frees_the_server(server):
    with pytest.raises(requests.exceptions.ReadTimeout):
        _ocr(server, max_new_tokens=20000, timeout=1.0, prompt_type="prompt_layout_only_en")
    assert _until_ok(server, deadline_s=10) < 10


def test_url_image_refused_without_allow_private_urls(server, image_host):
    response = requests.post(server + "/ocr", json={"image": image_host + "/page.png", "image_format": "url",
                                                    "max_new_tokens": 4}, timeout=30)
    assert response.status_code == 400
    assert "error" in response.json()


def test_url_image_with_allow_private_urls(tiny_ckpt, image_host, tmp_path):
    with running_server(tiny_ckpt, "--allow-private-urls", log_dir=tmp_path) as url:
        response = requests.post(url + "/ocr", json={"image": image_host + "/page.png", "image_format": "url",
                                                     "prompt_type": "prompt_ocr", "max_new_tokens": 4}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "dots-ocr"
        missing = requests.get(url + "/nope", timeout=5)
        assert missing.json() == {"error": "Not found", "request_id": missing.headers["X-Request-Id"]}
