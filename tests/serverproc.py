"""Start ``python server.py`` as a real process on a free port, for end-to-end tests."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(model_path: Path, *args: str, log_dir: Path, deadline_s: float = 120) -> Iterator[str]:
    """Yield the base URL once ``/health`` says the model is loaded (polled, with a deadline);
    stop the whole process group (gunicorn's arbiter and worker) afterwards."""
    port = free_port()
    log_path = Path(log_dir) / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "server.py", "--model-path", str(model_path), "--port", str(port), "--device", "cpu",
             *args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + deadline_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    if requests.get(url + "/health", timeout=2).json().get("model_loaded"):
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server.py did not load its model in time:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.1)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
