"""Hardening: each defect an adversarial run found, as a test that failed before its fix. Real
server processes are talked to with raw sockets where the defect lives below HTTP (slow clients,
malformed requests); the rest goes through the Flask test client."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
import requests
from PIL import Image

from serverproc import local_origin, running_server_process, start_server, wait_for, wait_until_loaded

SLOW_CONNECTIONS = 100


def _page_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PAGE = _page_b64()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _raw_exchange(port: int, payload: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send ``payload`` as is on a new connection; read until the server closes or the declared
    body has arrived. Returns (status, headers, body)."""
    with _connect(port) as sock:
        sock.settimeout(timeout)
        sock.sendall(payload)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "-1"))
        while length < 0 or len(body) < length:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            body += chunk
        return status, headers, body


# -- slow clients (14.3, 15.2) ------------------------------------------------------------------


class _SlowClients:
    """``count`` connections that each trickle a request without ever finishing it: slowloris
    headers (one byte at a time), idle partial requests, and stalled uploads (a body that stops)."""

    KINDS = ("headers", "idle", "upload")

    def __init__(self, port: int, count: int):
        self.port = port
        self.socks: list[socket.socket] = []
        self.kinds: list[str] = []
        self.stop = threading.Event()
        for index in range(count):
            kind = self.KINDS[index % len(self.KINDS)]
            sock = _connect(self.port)
            if kind == "idle":
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            elif kind == "upload":
                sock.sendall(b"POST /ocr HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000\r\n\r\n{\"image\": \"")
            else:
                sock.sendall(b"G")
            self.socks.append(sock)
            self.kinds.append(kind)
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self) -> None:
        while not self.stop.wait(0.5):
            for sock, kind in zip(self.socks, self.kinds):
                if kind == "headers":
                    try:
                        sock.send(b"X")
                    except OSError:
                        pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in self.socks:
            sock.close()


def _timed_health_and_ocr(url: str) -> tuple[float, float, int]:
    start = time.monotonic()
    health = requests.get(url + "/health", timeout=10)
    health_s = time.monotonic() - start
    assert health.status_code == 200
    start = time.monotonic()
    ocr = requests.post(url + "/ocr", json={"image": PAGE, "image_format": "base64", "prompt_type": "prompt_ocr",
                                            "max_new_tokens": 2, "temperature": 0}, timeout=10)
    return health_s, time.monotonic() - start, ocr.status_code


@pytest.fixture(scope="module")
def http_server(tiny_ckpt, tmp_path_factory):
    """server.py with few request threads and short connection timeouts."""
    with running_server_process(tiny_ckpt, "--threads", "4", "--idle-timeout", "2", "--request-timeout", "4",
                                log_dir=tmp_path_factory.mktemp("logs")) as server:
        yield server


@pytest.mark.slow
def test_slow_clients_do_not_take_the_request_threads(http_server):
    """100 slow connections (25 times the 4 request threads) open: /health and /ocr are still
    answered (how fast: scripts/bench_slowclients.py). Under gunicorn's gthread worker they timed out."""
    slow = _SlowClients(http_server.port, SLOW_CONNECTIONS)
    try:
        _health_s, _ocr_s, status = _timed_health_and_ocr(http_server.url)
        assert status in (200, 429)
    finally:
        slow.close()


def _closed_by_server(sock: socket.socket, within_s: float, drip: bool) -> bool:
    """True when the server closes ``sock`` within ``within_s`` seconds (while we drip a byte
    every 0.5 s when ``drip``)."""
    deadline = time.monotonic() + within_s
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            if drip:
                sock.send(b"X")
            if sock.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:  # reset: closed too
            return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["idle partial request", "stalled upload", "dripping headers"])
def test_half_open_connections_are_closed(http_server, kind):
    """Idle and stalled requests are closed after --idle-timeout (2 s); a request that keeps
    dripping is closed after --request-timeout (4 s)."""
    with _connect(http_server.port) as sock:
        if kind == "idle partial request":
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        elif kind == "stalled upload":
            sock.sendall(b"POST /ocr HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"image\"")
        else:
            sock.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
        assert _closed_by_server(sock, within_s=20, drip=kind == "dripping headers")


# -- errors the HTTP server answers itself are JSON (15.4) -------------------------------------


@pytest.mark.parametrize("payload,status,message", [
    (b"POST /ocr HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "Content-Length"),
    (b"POST /ocr HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400,
     "Content-Length"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400, "header"),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400, "Start line"),
    (b"POST /ocr HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "chunk"),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, "--max-header-kb"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65_536 + b"\r\n\r\n", 431, "--max-header-kb"),
    (b"POST /ocr HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n", 413, "--max-body-mb"),
], ids=["bad-length", "duplicate-length", "nul-in-header", "not-http", "bad-chunk", "414-uri", "431-header",
        "413-declared"])
@pytest.mark.slow
def test_server_level_errors_are_json(http_server, payload, status, message):
    got_status, headers, body = _raw_exchange(http_server.port, payload)
    assert got_status == status
    assert headers["content-type"] == "application/json"
    assert message in json.loads(body)["error"]


@pytest.mark.slow
def test_http_09_request_gets_json(http_server):
    """A request line without a version (HTTP/0.9) is served as HTTP/1.0: JSON, never HTML."""
    status, headers, body = _raw_exchange(http_server.port, b"GET /health\r\n\r\n")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body)["status"] == "healthy"


def test_client_gone_probe_under_waitress():
    from dots_ocr_server.api.http import client_gone_probe

    flags = {"gone": False}
    probe = client_gone_probe({"waitress.client_disconnected": lambda: flags["gone"]})
    assert probe() is False
    flags["gone"] = True
    assert probe() is True
    assert client_gone_probe({}) is None


# -- shutdown (14.4) and the demo checkpoint (15.5) ---------------------------------------------

LONG = {"image": PAGE, "image_format": "base64", "temperature": 0, "max_new_tokens": 20000,
        "prompt_type": "prompt_layout_only_en"}  # the tiny model never emits eos for this prompt


def _wait_running(state) -> None:
    wait_for(lambda: state.lock.running > 0, what="a request generating")


@pytest.fixture()
def app_no_repetition_guard(tiny_ckpt):
    from model_runner.runner import ModelRunner
    from server import create_app

    runner = ModelRunner(tiny_ckpt, device="cpu", dtype="float32", repetition_window=0).load()
    return create_app({"repetition_window": 0}, runner=runner)


def _shut_down(state) -> None:
    state.shutting_down.set()
    state.stop_generation.set()


def _answer_when_shut_down_while_running(app, route: str, body: dict):
    """POST ``body`` to ``route`` on a thread, start a shutdown once it generates; its answer."""
    state = app.extensions["dots_ocr"]
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=app.test_client().post(route, json=body)))
    worker.start()
    _wait_running(state)
    _shut_down(state)
    worker.join(30)
    return result["r"]


def test_shutdown_answers_a_running_plain_request_503(app_no_repetition_guard):
    app = app_no_repetition_guard
    state = app.extensions["dots_ocr"]
    response = _answer_when_shut_down_while_running(app, "/ocr", LONG)
    assert response.status_code == 503 and response.get_json()["error"] == "server shutting down"
    assert state.lock.running == 0
    again = app.test_client().post("/ocr", json=LONG)  # new requests during the shutdown
    assert again.status_code == 503 and again.get_json()["error"] == "server shutting down"
    assert app.test_client().get("/health").get_json()["shutting_down"] is True


def test_shutdown_stops_openai_requests_running_queued_and_new(app_no_repetition_guard):
    """/v1 during a shutdown: the running completion and the one waiting in the queue get 503
    in OpenAI's error shape, and so does a new one."""
    app = app_no_repetition_guard
    state = app.extensions["dots_ocr"]
    from model_runner.prompts import prompt_text

    # LONG's prompt: the tiny model never ends it, so the first request surely still runs when the
    # second has queued (the OCR prompt ends by eos after about 100 tokens)
    layout_only = prompt_text("prompt_layout_only_en", None)
    body = {"model": "m", "max_tokens": 20000, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PAGE}},
        {"type": "text", "text": "<|img|><|imgpad|><|endofimg|>" + layout_only}]}]}
    results = []

    def call():
        results.append(app.test_client().post("/v1/chat/completions", json=body))

    running = threading.Thread(target=call)
    running.start()
    _wait_running(state)
    queued = threading.Thread(target=call)
    queued.start()
    wait_for(lambda: state.lock.queued > 0, what="the second request queued")
    _shut_down(state)
    running.join(30)
    queued.join(30)
    assert [r.status_code for r in results] == [503, 503]
    assert all(r.get_json()["error"]["message"] == "server shutting down" for r in results)
    assert state.lock.running == 0 and state.lock.queued == 0
    again = app.test_client().post("/v1/chat/completions", json=body)
    assert again.status_code == 503 and again.get_json()["error"]["message"] == "server shutting down"


def test_shutdown_stops_an_inspect_generation_and_refuses_new_ones(app_no_repetition_guard):
    """/inspect without a text generates the answer it traces: a shutdown stops that generation
    (503, slot released), and a new /inspect gets 503 before any work."""
    app = app_no_repetition_guard
    state = app.extensions["dots_ocr"]
    response = _answer_when_shut_down_while_running(app, "/inspect", LONG)  # no "text": generate one
    assert response.status_code == 503 and response.get_json()["error"] == "server shutting down"
    assert state.lock.running == 0
    again = app.test_client().post("/inspect", json={**LONG, "text": "Hello"})
    assert again.status_code == 503 and again.get_json()["error"] == "server shutting down"


def test_shutdown_ends_a_running_stream_with_an_error_line(app_no_repetition_guard):
    app = app_no_repetition_guard
    state = app.extensions["dots_ocr"]
    response = app.test_client().post("/ocr", json={**LONG, "stream": True})
    lines = response.response  # iterated lazily: generation runs while we read
    first = json.loads(next(iter(lines)))
    assert first["done"] is False
    _shut_down(state)
    rest = [json.loads(raw) for raw in b"".join(lines).splitlines()]
    last = rest[-1]
    assert last["done"] is True and last["error"] == "server shutting down"
    assert last["done_reason"] == "cancelled" and last["response"] == ""
    assert all(not line["done"] for line in rest[:-1])
    response.close()
    assert state.lock.running == 0


@pytest.mark.slow
def test_sigterm_mid_stream_sends_the_last_line_and_leaves_no_demo_folder(tmp_path):
    """A real --demo server process: SIGTERM during a long stream; the stream ends with the
    shutdown line, a request sent meanwhile gets 503, the process exits 0, and nothing is left in
    the temp directory (the demo checkpoint lives in the cache folder, reused by later starts)."""
    cache, temp = tmp_path / "cache", tmp_path / "tmp"
    temp.mkdir()
    server = start_server(None, "--demo", "--repetition-window", "0", "--graceful-timeout", "1",
                          log_dir=tmp_path, env={"XDG_CACHE_HOME": str(cache), "TMPDIR": str(temp)})
    try:
        wait_until_loaded(server.health, 120, failed=server.exited)
        with requests.post(server.url + "/ocr", json={**LONG, "stream": True}, stream=True, timeout=60) as stream:
            lines = stream.iter_lines()
            assert json.loads(next(lines))["done"] is False
            server.proc.send_signal(signal.SIGTERM)
            refused = requests.post(server.url + "/ocr", json=LONG, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"] == "server shutting down"
            rest = [json.loads(raw) for raw in lines]
        assert rest[-1]["done"] is True and rest[-1]["error"] == "server shutting down"
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.stop()
    assert "draining" in server.log()
    assert not list(temp.glob("dots-ocr-demo-*"))  # (torch leaves its own compile cache folder there)
    assert [p.name for p in cache.glob("dots-ocr-server/demo-*/*")] == ["DotsOCR-tiny-random"]


def test_demo_checkpoint_is_built_once_and_reused(tmp_path, monkeypatch):
    from dots_ocr_server.api.state import demo_checkpoint_dir, ensure_demo_checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = demo_checkpoint_dir()
    assert path.is_relative_to(tmp_path / "dots-ocr-server")
    abandoned = path.parent / ".building-999999999"  # a build of a process that no longer runs
    abandoned.mkdir(parents=True)
    assert (ensure_demo_checkpoint(path) / "config.json").is_file()
    assert not abandoned.exists()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert ensure_demo_checkpoint(path) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


# -- inputs that reached a 500, and echoes (14.1, 15.3, 15.5) -------------------------------------


@pytest.fixture()
def client(runner):
    from server import create_app

    return create_app({}, runner=runner).test_client()


@pytest.mark.parametrize("raw", ["[" * 5000, "]" * 10 + "[" * 5000, '{"a":' * 5000, "[" * 3000 + "]" * 3000,
                                 '{"a":' * 3000 + "1" + "}" * 3000, '{"image": ' + "[" * 100_000])
def test_deeply_nested_json_is_400(client, raw):
    response = client.post("/ocr", data=raw, content_type="application/json")
    assert response.status_code == 400
    assert "nested deeper than" in response.get_json()["error"]


def test_nesting_inside_strings_is_not_depth(client):
    response = client.post("/ocr", data=json.dumps({"image": "[" * 5000, "image_format": "base64"}),
                           content_type="application/json")
    assert response.status_code == 400 and "nested" not in response.get_json()["error"]


@pytest.mark.parametrize("data, deeper", [
    (b"[" * 65 + b"]" * 65, True), (b"[" * 64 + b"]" * 64, False), (b'{"a":' * 70, True),
    (json.dumps({"x": "[" * 100}).encode(), False),             # brackets inside a string
    (json.dumps({"x": '\\"' + "[" * 100}).encode(), False),     # after an escaped quote, still inside
    (b'["\\\\"' + b"[" * 70, True),                              # an escaped backslash ends before the quote
    (json.dumps([[{"a": "\\"}]] * 3).encode(), False),
])
def test_depth_scanner_skips_strings_and_escapes(data, deeper):
    from dots_ocr_server.api.http import _json_depth_exceeds

    assert _json_depth_exceeds(data.decode("utf-8"), 64) is deeper


@pytest.mark.parametrize("path", ["/tmp/\ud800", "\udc80", "/tmp/a\udfff/b.png"])
def test_lone_surrogate_in_path_is_json_4xx(client, path):
    response = client.post("/ocr", data=json.dumps({"image": path, "image_format": "path"}),
                           content_type="application/json")
    assert 400 <= response.status_code < 500
    assert response.is_json and "error" in response.get_json()


@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 1e-5])
def test_vanishing_temperature_is_refused(client, temperature):
    response = client.post("/ocr", json={"image": PAGE, "image_format": "base64", "temperature": temperature})
    assert response.status_code == 400
    assert "temperature" in response.get_json()["error"] and "greedy" in response.get_json()["error"]


@pytest.mark.parametrize("bbox", [[64, 0, 100, 10], [0, 64, 10, 90], [500, 500, 600, 600]])
def test_bbox_entirely_outside_the_image_is_400(client, bbox):
    response = client.post("/ocr", json={"image": PAGE, "image_format": "base64", "max_new_tokens": 2,
                                         "prompt_type": "prompt_grounding_ocr", "bbox": bbox})
    assert response.status_code == 400
    assert "entirely outside the image (64 x 64 pixels)" in response.get_json()["error"]


def test_errors_do_not_echo_huge_inputs(client):
    field = "x" * 1_000_000
    response = client.post("/ocr", json={"image": PAGE, "image_format": "base64", field: 1})
    assert response.status_code == 400 and len(response.get_json()["error"]) < 1000
    assert "1000000 characters in all" in response.get_json()["error"]
    response = client.post("/ocr", json={"image": "/nowhere/" + "p" * 100_000, "image_format": "path"})
    assert response.status_code == 400 and len(response.get_json()["error"]) < 1000


# -- a URL that drips (15.1) ---------------------------------------------------------------------


class _DripHandler(BaseHTTPRequestHandler):
    """An origin that sends one byte every 0.2 s: in its headers, or in a body without a length
    that would end when the connection closes. Each byte keeps a per-read timeout alive."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/headers":
            prefix, drip = b"HTTP/1.0 200 OK\r\n", b"X-Slow: " + b"a" * 1000
        else:
            prefix, drip = b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n", b"\x89PNG" + b"a" * 1000
        try:
            self.wfile.write(prefix)
            for byte in drip:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass


@pytest.fixture(scope="module")
def drip_origin():
    with local_origin(_DripHandler) as url:
        yield url


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/headers", "/body-until-close"])
def test_url_fetch_has_one_deadline_over_a_dripping_origin(drip_origin, path):
    from image_utils import ImageInputError, ImagePolicy, load_image

    policy = ImagePolicy(allow_private_urls=True, url_read_timeout=1.0, url_total_timeout=1.5)
    started = time.monotonic()
    with pytest.raises(ImageInputError) as caught:
        load_image(drip_origin + path, "url", policy)
    assert "did not finish within 1.5 s" in caught.value.message
    assert time.monotonic() - started < 60  # the drip itself lasts 200 s


# -- PDFs (14.2) ---------------------------------------------------------------------------------


def test_pdf_render_deadline_is_413():
    from image_utils import ImageInputError, ImagePolicy, load_document
    from test_image_utils import make_pdf

    pdf = base64.b64encode(make_pdf([(595, 842)])).decode()
    with pytest.raises(ImageInputError) as caught:
        load_document(pdf, "base64", ImagePolicy(pdf_render_timeout=0.0))
    assert caught.value.status == 413 and "took longer than the limit of 0 s" in caught.value.message


def test_repeated_big_pdfs_leave_memory_flat():
    from image_utils import ImagePolicy, load_document
    from test_image_utils import make_pdf

    def rss_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    pdf = base64.b64encode(make_pdf([(595, 842)] * 300)).decode()
    load_document(pdf, "base64", ImagePolicy(), page=300, dpi=200)  # warm-up: libraries' one-off memory
    before = rss_mb()
    for _ in range(6):
        load_document(pdf, "base64", ImagePolicy(), page=300, dpi=200)
    assert rss_mb() - before < 40  # each render holds a 1654 x 2339 page (11 MB): none is kept


# -- a GPU that torch cannot use (14.5), simulated --------------------------------------------


def test_driver_version_probes(tmp_path, monkeypatch):
    from dots_ocr_server.api import gpu_check

    proc = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
            "GCC version:  gcc version 12.2.0\n")
    assert gpu_check.parse_proc_version(proc) == "535.104.05"
    assert gpu_check.parse_proc_version("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  "
                                        "Release Build") == "580.65.06"
    monkeypatch.setattr(gpu_check, "PROC_VERSION", tmp_path / "version")
    (tmp_path / "version").write_text(proc)
    assert gpu_check.nvidia_driver_version() == "535.104.05"
    (tmp_path / "version").unlink()
    fake_smi = tmp_path / "nvidia-smi"
    fake_smi.write_text("#!/bin/sh\necho 550.54.14\n")
    fake_smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_check.nvidia_driver_version() == "550.54.14"
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert gpu_check.nvidia_driver_version() is None


def test_mismatch_warning_names_versions_and_fix():
    from dots_ocr_server.api.gpu_check import mismatch_warning

    warning = mismatch_warning("535.104.05", False, "13.0")
    assert "CUDA 13.0" in warning and "driver >= 580" in warning and "535.104.05" in warning
    assert "whl/cu126" not in warning and "update the driver" in warning  # 535 is older than every index
    assert "whl/cu126" in mismatch_warning("565.57.01", False, "13.0")
    assert "whl/cu128" in mismatch_warning("570.86.10", False, "13.0")
    assert "CPU-only build" in mismatch_warning("580.65.06", False, None)
    assert "CUDA_VISIBLE_DEVICES" in mismatch_warning("580.65.06", False, "13.0")
    assert mismatch_warning("535.104.05", True, "12.1") is None
    assert mismatch_warning(None, False, "13.0") is None


def test_gpu_mismatch_is_logged_and_in_health(runner, monkeypatch, caplog):
    import torch

    from dots_ocr_server.api import gpu_check
    from server import create_app

    monkeypatch.setattr(gpu_check, "nvidia_driver_version", lambda: "565.57.01")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with caplog.at_level("WARNING", logger="dots_ocr_server"):
        body = create_app({"device": "auto"}, runner=runner).test_client().get("/health").get_json()
    assert "driver >= 580" in body["gpu_warning"] and "565.57.01" in body["gpu_warning"]
    assert "GPU NOT USED" in caplog.text and "whl/cu126" in caplog.text
    # Asked for the CPU, or no NVIDIA driver on the machine: nothing to say.
    assert "gpu_warning" not in create_app({"device": "cpu"}, runner=runner).test_client().get("/health").get_json()
    monkeypatch.setattr(gpu_check, "nvidia_driver_version", lambda: None)
    assert "gpu_warning" not in create_app({"device": "auto"}, runner=runner).test_client().get("/health").get_json()


# -- a slow PDF page holds no generation slot; its render time is bounded ------------------------


def _slow_pdf(triangles: int = 2000) -> bytes:
    """A one-page PDF of ``triangles`` large filled triangles (seconds to draw at 200 dpi)."""
    import random

    from test_image_utils import handwritten_pdf

    rnd = random.Random(0)
    ops = b"".join(b"%d %d m %d %d l %d %d l h f\n" % tuple(rnd.randrange(600 if i % 2 == 0 else 840) for i in range(6))
                   for _ in range(triangles))
    return handwritten_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 842] /Contents 4 0 R >>",
                            b"<< /Length %d >>\nstream\n" % len(ops) + ops + b"\nendstream"])


@pytest.mark.slow
def test_a_slow_pdf_page_is_rendered_without_holding_the_slot(runner):
    from server import create_app

    from image_utils import PDFIUM_LOCK

    app = create_app({}, runner=runner)  # --max-batch-size 1: one generation slot
    slow = base64.b64encode(_slow_pdf()).decode()
    results = {}
    rendering = threading.Thread(target=lambda: results.__setitem__("pdf", app.test_client().post(
        "/ocr", json={"image": slow, "image_format": "base64", "max_new_tokens": 2})))
    rendering.start()
    try:
        wait_for(PDFIUM_LOCK.locked, what="the PDF page rendering")
        meanwhile = app.test_client().post("/ocr", json={"image": PAGE, "image_format": "base64",
                                                         "prompt_type": "prompt_ocr", "max_new_tokens": 2})
        still_rendering = PDFIUM_LOCK.locked()
    finally:
        rendering.join(120)
    assert meanwhile.status_code == 200, meanwhile.get_json()  # not 429: the render held no slot
    assert still_rendering  # the other request was served while the page was being drawn
    assert results["pdf"].status_code == 200
    assert app.extensions["dots_ocr"].lock.running == 0


def test_the_pdf_render_time_is_bounded_by_its_flag(runner):
    from server import create_app, parse_args

    assert parse_args([]).pdf_render_timeout == 15.0
    assert parse_args(["--pdf-render-timeout", "2"]).pdf_render_timeout == 2
    app = create_app({"pdf_render_timeout": 0.3}, runner=runner)
    started = time.monotonic()
    response = app.test_client().post("/ocr", json={"image": base64.b64encode(_slow_pdf(6000)).decode(),
                                                    "image_format": "base64"})
    assert response.status_code == 413
    assert "took longer than the limit of 0.3 s" in response.get_json()["error"]
    assert time.monotonic() - started < 10  # the drawing of a page that takes far longer was stopped


# -- after a soak of mixed requests, threads and memory go back down ------------------------------


@pytest.mark.slow
def test_threads_and_memory_return_near_their_start_after_a_soak(tiny_ckpt, tmp_path):
    from serverproc import page_png, process_figures
    from soak import one_request, soak

    with running_server_process(tiny_ckpt, log_dir=tmp_path) as server:
        page = base64.b64encode(page_png()).decode()
        for kind in ("plain", "stream"):  # warm both paths (the libraries' one-off allocations)
            one_request(server.url, kind, page, 0.3)
        before = process_figures(server.proc.pid)
        outcomes = soak(server.url, 48, 8, 0.3)
        wait_for(lambda: server.health()["running"] == 0, what="the server idle")  # its engine has ended too
        idle = process_figures(server.proc.pid)
    assert sum(count for kind, count in outcomes.items() if kind.endswith(":200")) >= 40, outcomes
    # each of the 80 request threads used to keep a team of torch's CPU threads (+1 thread per
    # request thread that ever prepared a page), and the busy periods' memory stayed resident
    assert idle["threads"] - before["threads"] <= 4, (before, idle)
    assert idle["rss_bytes"] - before["rss_bytes"] < 60 * 2**20, (before, idle)
