"""Shared by the client tests (test_ocr_client*.py): the input folder and a scripted fake server."""
from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image, ImageDraw

PDF = Path(__file__).resolve().parents[1] / "samples" / "demo_pdf1.pdf"
DPI = 72  # keeps the tiny model fast on CPU (an A3 page is 842 x 1191 px at 72 dpi)


def page_image(width: int, height: int, seed: int) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for row in range(6):
        draw.rectangle([12, 14 + row * 30, width - 20 - (row + seed) % 3 * 25, 26 + row * 30], fill=(30, 30, 30))
    return image


def make_inputs(folder: Path) -> Path:
    """Two images (PNG, JPEG), a 2-page PDF in a sub-folder, and a text file that the folder walk
    must leave out (unsupported extension)."""
    page_image(224, 280, 0).save(folder / "alpha.png")
    page_image(196, 252, 1).save(folder / "beta.jpg", quality=90)
    (folder / "docs").mkdir()
    shutil.copy(PDF, folder / "docs" / "demo_pdf1.pdf")
    (folder / "readme.txt").write_text("not an input\n")
    return folder


def read_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


class FakeServer:
    """Each /ocr request gets the next scripted answer (the last one repeats): ``(status, body)``,
    ``(status, body, headers)``, ``("stream", [lines])``, or a function of the request body that
    returns one of these. ``/health`` answers ``{"status", "model_loaded"}`` plus ``health``.

    It counts the /ocr requests in flight; with ``hold_until = K`` a request is answered only once
    K requests have been in flight together (or after ``hold_timeout`` seconds), so a client that
    keeps fewer than K in flight is slow and shows a lower ``max_in_flight``."""

    def __init__(self):
        self.requests: list[dict] = []
        self.times: list[float] = []
        self.headers: list[dict] = []
        self.script: list = []
        self.health: dict = {}
        self.loading_polls = 0          # /health answers model_loaded false this many times
        self.health_polls = 0
        self.hold_until = 0
        self.hold_timeout = 3.0
        self.in_flight = 0
        self.max_in_flight = 0
        self._cond = threading.Condition()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, content_type="application/json", headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/health":
                    with fake._cond:
                        fake.health_polls += 1
                        loaded = fake.health_polls > fake.loading_polls
                    body = {"status": "healthy", "model_loaded": loaded, **fake.health}
                    self._send(200, json.dumps(body).encode())
                else:
                    self._send(404, b'{"error": "Not found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._cond:
                    fake.requests.append(body)
                    fake.times.append(time.monotonic())
                    fake.headers.append(dict(self.headers))
                    index = min(len(fake.requests) - 1, len(fake.script) - 1)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake._cond.notify_all()
                    fake._cond.wait_for(lambda: fake.max_in_flight >= fake.hold_until, timeout=fake.hold_timeout)
                try:
                    answer = fake.script[index]
                    if callable(answer):
                        answer = answer(body)
                finally:
                    # Out of flight before the answer goes out: the client may send its next
                    # request as soon as it has read this one.
                    with fake._cond:
                        fake.in_flight -= 1
                status, payload, *headers = answer
                if status == "stream":
                    data = b"".join(json.dumps(line).encode() + b"\n" for line in payload)
                    self._send(200, data, "application/x-ndjson")
                else:
                    self._send(status, json.dumps(payload).encode(), headers=headers[0] if headers else None)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def ok_answer(body: dict):
    """What a server answers for an image: no page fields (it never sees a PDF from this client)."""
    answer = {"model": "dots-ocr", "response": "[]", "prompt_type": body["prompt_type"]}
    if body.get("postprocess"):
        answer.update(layout=[{"bbox": [10, 10, 100, 60], "category": "Text", "text": "hello"}],
                      markdown="hello", repaired=False)
    return 200, answer


BUSY = (429, {"error": "Server is busy processing another request"})


def layout_answer(cells: list, *, done_reason: str = "stop", repaired: bool = False, response: str | None = None):
    """A scripted /ocr answer with a post-processed layout (``cells`` in the uploaded image's pixels)."""
    def answer(body: dict):
        return 200, {"model": "dots-ocr", "response": json.dumps(cells) if response is None else response,
                     "prompt_type": body["prompt_type"], "done_reason": done_reason, "layout": cells,
                     "markdown": "\n\n".join(c.get("text", "") for c in cells), "repaired": repaired}
    return answer
