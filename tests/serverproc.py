"""Start ``python server.py`` as a real process on a free port, for end-to-end tests; the one
wait-until-loaded helper every test uses (over HTTP or through a Flask test client), and the one
poll-until-true helper; and the local origins tests fetch images from (a thread serving a handler
or a folder on loopback)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout_s: float = 30.0, *, what: str = "the condition",
             interval_s: float = 0.01) -> None:
    """Poll ``condition()`` every ``interval_s`` until it is true; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s} s"
        time.sleep(interval_s)


def wait_until_loaded(health: Callable[[], dict[str, Any]], deadline_s: float = 120,
                      failed: Callable[[], str | None] = lambda: None) -> dict[str, Any]:
    """Poll ``health()`` (a /health body; an exception counts as "not yet") until it says
    ``model_loaded``; return that body. ``failed()`` returns a reason to stop waiting early (e.g.
    the server process exited). Raises AssertionError with the reason or on the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        reason = failed()
        assert reason is None, reason
        try:
            body = health()
            if body.get("model_loaded"):
                return body
        except (requests.RequestException, ValueError):
            pass
        assert time.monotonic() < deadline, f"the model did not load within {deadline_s} s"
        time.sleep(0.05)


@dataclasses.dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict[str, Any]:
        return requests.get(self.url + "/health", timeout=2).json()

    def exited(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return f"server.py exited with {self.proc.returncode}:\n{self.log()[-3000:]}"

    def stop(self) -> None:
        """SIGTERM to the whole process group; SIGKILL if it has not ended within 15 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start_server(model_path: Path | None, *args: str, log_dir: Path,
                 env: dict[str, str] | None = None) -> ServerProcess:
    """Start server.py (``--model-path model_path`` unless None, e.g. with ``--demo``) on a free
    port; it is not waited for."""
    port = free_port()
    log_path = Path(log_dir) / f"server-{port}.log"
    model_args = ["--model-path", str(model_path)] if model_path is not None else []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "server.py", *model_args, "--port", str(port), "--device", "cpu", *args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    return ServerProcess(proc, f"http://127.0.0.1:{port}", port, log_path)


@contextlib.contextmanager
def running_server(model_path: Path | None, *args: str, log_dir: Path, deadline_s: float = 120,
                   env: dict[str, str] | None = None) -> Iterator[str]:
    """Yield the base URL once ``/health`` says the model is loaded; stop the server afterwards."""
    with running_server_process(model_path, *args, log_dir=log_dir, deadline_s=deadline_s, env=env) as server:
        yield server.url


@contextlib.contextmanager
def running_server_process(model_path: Path | None, *args: str, log_dir: Path, deadline_s: float = 120,
                           env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """Like ``running_server`` but yields the ServerProcess (to signal it, read its log)."""
    server = start_server(model_path, *args, log_dir=log_dir, env=env)
    try:
        wait_until_loaded(server.health, deadline_s, failed=server.exited)
        yield server
    finally:
        server.stop()


def process_figures(pid: int) -> dict[str, int]:
    """The thread count and resident memory of process ``pid`` (Linux ``/proc/PID/status``)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return {"threads": int(fields["Threads"]), "rss_bytes": int(fields["VmRSS"].split()[0]) * 1024}


def page_png() -> bytes:
    """A small synthetic page (224 x 308, dark text-like bars) as PNG bytes."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 308), "white")
    draw = ImageDraw.Draw(image)
    for row in range(9):
        draw.rectangle([16, 16 + row * 30, 200 - row % 4 * 20, 28 + row * 30], fill=(25, 25, 25))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def local_origin(handler) -> Iterator[str]:
    """``handler`` (a ``BaseHTTPRequestHandler`` class or factory) served on a free loopback port
    by a thread; yields the origin's URL, and stops and closes it afterwards."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def quiet_folder_handler(folder: Path):
    """A handler for ``local_origin`` that serves the files of ``folder`` without logging."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    return partial(Quiet, directory=str(folder))
