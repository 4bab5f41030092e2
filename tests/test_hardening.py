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


def test_slow_clients_do_not_take_the_request_threads(tiny_ckpt, tmp_path):
    """100 slow connections (more than the 4 request threads) open: /health and /ocr are still
    answered (the timings themselves are measured by scripts/bench_slowclients.py)."""
    with running_server_process(tiny_ckpt, "--threads", "4", log_dir=tmp_path) as server:
        slow = _SlowClients(server.port, SLOW_CONNECTIONS)
        try:
            time.sleep(0.5)
            _health_s, _ocr_s, status = _timed_health_and_ocr(server.url)
            assert status in (200, 429)
        finally:
            slow.close()
