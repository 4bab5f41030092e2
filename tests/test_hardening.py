"""Issues 14 and 15 (hardening): each defect an adversarial run found, as a test that failed
before its fix. Real server processes are talked to with raw sockets where the defect lives below
HTTP (slow clients, malformed requests); the rest goes through the Flask test client."""
from __future__ import annotations

import base64
import io
import json
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from PIL import Image

from serverproc import running_server_process, start_server, wait_until_loaded

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
def test_server_level_errors_are_json(http_server, payload, status, message):
    got_status, headers, body = _raw_exchange(http_server.port, payload)
    assert got_status == status
    assert headers["content-type"] == "application/json"
    assert message in json.loads(body)["error"]


def test_http_09_request_gets_json(http_server):
    """A request line without a version (HTTP/0.9) is served as HTTP/1.0: JSON, never HTML."""
    status, headers, body = _raw_exchange(http_server.port, b"GET /health\r\n\r\n")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body)["status"] == "healthy"


def test_client_gone_probe_under_waitress():
    from api.http import client_gone_probe

    flags = {"gone": False}
    probe = client_gone_probe({"waitress.client_disconnected": lambda: flags["gone"]})
    assert probe() is False
    flags["gone"] = True
    assert probe() is True
    assert client_gone_probe({}) is None


# -- shutdown (14.4) and the demo checkpoint (15.5) ---------------------------------------------

LONG = {"image": PAGE, "image_format": "base64", "temperature": 0, "max_new_tokens": 20000,
        "prompt_type": "prompt_layout_only_en"}  # the tiny model never emits eos for this prompt


def _wait_running(state, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while state.lock.running == 0:
        assert time.monotonic() < deadline, "the request never started generating"
        time.sleep(0.01)


@pytest.fixture()
def app_no_repetition_guard(tiny_ckpt):
    from model_runner.runner import ModelRunner
    from server import create_app

    runner = ModelRunner(tiny_ckpt, device="cpu", dtype="float32", repetition_window=0).load()
    return create_app({"repetition_window": 0}, runner=runner)


def _shut_down(state) -> None:
    state.shutting_down.set()
    state.stop_generation.set()


def test_shutdown_answers_a_running_plain_request_503(app_no_repetition_guard):
    app = app_no_repetition_guard
    state = app.extensions["dots_ocr"]
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=app.test_client().post("/ocr", json=LONG)))
    worker.start()
    _wait_running(state)
    _shut_down(state)
    worker.join(30)
    response = result["r"]
    assert response.status_code == 503 and response.get_json() == {"error": "server shutting down"}
    assert state.lock.running == 0
    again = app.test_client().post("/ocr", json=LONG)  # new requests during the shutdown
    assert again.status_code == 503 and again.get_json() == {"error": "server shutting down"}
    assert app.test_client().get("/health").get_json()["shutting_down"] is True


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
            assert refused.status_code == 503 and refused.json() == {"error": "server shutting down"}
            rest = [json.loads(raw) for raw in lines]
        assert rest[-1]["done"] is True and rest[-1]["error"] == "server shutting down"
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.stop()
    assert "draining" in server.log()
    assert not list(temp.glob("dots-ocr-demo-*"))  # (torch leaves its own compile cache folder there)
    assert [p.name for p in cache.glob("dots-ocr-server/demo-*/*")] == ["DotsOCR-tiny-random"]


def test_demo_checkpoint_is_built_once_and_reused(tmp_path, monkeypatch):
    from api.state import demo_checkpoint_dir, ensure_demo_checkpoint

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
