"""The client CLI (ocr_client): end to end against server.py started as a real process on the tiny
checkpoint, plus a small scripted fake server for the paths a real server cannot be made to take
on demand (429 busy, 500, 401, a stream that ends in an error)."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from ocr_client.cli import assign_names, backoff_delay, collect_inputs, main
from serverproc import free_port, running_server

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[1] / "samples"
PDF = DATA / "demo_pdf1.pdf"
DPI = 72  # keeps the tiny model fast on CPU (an A3 page is 842 x 1191 px at 72 dpi)
PAGE_FILES = ("response.json", "layout.json", "page.md", "page.png")


def _page_image(width: int, height: int, seed: int) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for row in range(6):
        draw.rectangle([12, 14 + row * 30, width - 20 - (row + seed) % 3 * 25, 26 + row * 30], fill=(30, 30, 30))
    return image


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder: two images (PNG, JPEG), a 2-page PDF in a sub-folder, and a text file that the
    folder walk must leave out (unsupported extension)."""
    folder = tmp_path_factory.mktemp("inputs")
    _page_image(224, 280, 0).save(folder / "alpha.png")
    _page_image(196, 252, 1).save(folder / "beta.jpg", quality=90)
    (folder / "docs").mkdir()
    shutil.copy(PDF, folder / "docs" / "demo_pdf1.pdf")
    (folder / "readme.txt").write_text("not an input\n")
    return folder


# ---------------------------------------------------------------------------------------------
# The real server, as a separate process
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_server(tiny_ckpt, tmp_path_factory):
    with running_server(tiny_ckpt, "--threads", "4", log_dir=tmp_path_factory.mktemp("server-log")) as url:
        yield url


def _run(*args: str) -> int:
    return main([*args, "--no-progress", "--max-new-tokens", "8", "--temperature", "0", "--dpi", str(DPI)])


@pytest.fixture(scope="module")
def first_run(real_server, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    started = time.monotonic()
    rc = _run(str(inputs), "--server", real_server, "--out", str(out))
    return {"rc": rc, "out": out, "seconds": time.monotonic() - started}


def test_folder_of_images_and_pdf(first_run, inputs):
    from image_utils import load_document

    out = first_run["out"]
    assert first_run["rc"] == 0
    summary = _summary(out)
    assert (summary["pages"], summary["ok"], summary["failed"], summary["skipped"]) == (4, 4, 0, 0)
    assert summary["finished"] is True and summary["seconds_per_page"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "beta", "demo_pdf1", "summary.json"]

    page_dirs = [out / "alpha" / "page_0001", out / "beta" / "page_0001",
                 out / "demo_pdf1" / "page_0001", out / "demo_pdf1" / "page_0002"]
    repaired = 0
    for page_dir in page_dirs:
        assert sorted(p.name for p in page_dir.iterdir()) == sorted(PAGE_FILES)
        response = json.loads((page_dir / "response.json").read_text())
        assert response["model"] == "dots-ocr" and isinstance(response["response"], str)
        assert isinstance(response["repaired"], bool)
        repaired += response["repaired"]
        assert json.loads((page_dir / "layout.json").read_text()) == response["layout"]
        assert (page_dir / "page.md").read_text().strip() == response["markdown"].strip()
    assert summary["repaired"] == repaired

    # Images keep their size; PDF pages are as large as the server's render at the same dpi.
    with Image.open(out / "alpha" / "page_0001" / "page.png") as png:
        assert png.size == (224, 280)
    for page in (1, 2):
        response = json.loads((out / "demo_pdf1" / f"page_{page:04d}" / "response.json").read_text())
        assert (response["page"], response["page_count"]) == (page, 2)
        expected = load_document(str(inputs / "docs" / "demo_pdf1.pdf"), "path", page=page, dpi=DPI).image.size
        with Image.open(out / "demo_pdf1" / f"page_{page:04d}" / "page.png") as png:
            assert png.size == expected


def test_resume_skips_done_pages_and_force_redoes(first_run, real_server, inputs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    marker = out / "alpha" / "page_0001" / "response.json"
    before = marker.stat().st_mtime_ns

    assert _run(str(inputs), "--server", real_server, "--out", str(out)) == 0
    summary = _summary(out)
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (0, 0, 4)
    assert marker.stat().st_mtime_ns == before

    # An interrupted page (files written, no response.json) is redone; --force redoes done pages.
    (out / "beta" / "page_0001" / "response.json").unlink()
    assert _run(str(inputs / "beta.jpg"), str(inputs / "alpha.png"), "--server", real_server,
                "--out", str(out), "--force") == 0
    summary = _summary(out)
    assert (summary["ok"], summary["skipped"]) == (2, 0)
    assert marker.stat().st_mtime_ns != before
    assert (out / "beta" / "page_0001" / "response.json").is_file()


def test_stream_and_plain_ocr_prompt(real_server, inputs, tmp_path):
    out = tmp_path / "out"
    assert _run(str(inputs / "alpha.png"), "--server", real_server, "--out", str(out),
                "--stream", "--prompt-type", "prompt_ocr") == 0
    page_dir = out / "alpha" / "page_0001"
    assert sorted(p.name for p in page_dir.iterdir()) == ["page.md", "page.png", "response.json"]
    response = json.loads((page_dir / "response.json").read_text())
    assert response["prompt_type"] == "prompt_ocr" and isinstance(response["response"], str)
    assert (page_dir / "page.md").read_text() == response["response"] + "\n"

    # A streamed PDF page: the closing line's page fields and layout land in response.json.
    assert _run(str(inputs / "docs" / "demo_pdf1.pdf"), "--server", real_server, "--out", str(out),
                "--stream", "--skip-headers-footers") == 0
    for page in (1, 2):
        response = json.loads((out / "demo_pdf1" / f"page_{page:04d}" / "response.json").read_text())
        assert (response["page"], response["page_count"]) == (page, 2)
        assert isinstance(response["layout"], list) and isinstance(response["markdown"], str)


def test_server_down_exit_2(inputs, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ocr_client.py"), str(inputs / "alpha.png"),
         "--server", url, "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"cannot reach the server at {url} — is it running?" in proc.stderr
    assert "python server.py" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# A scripted fake server: each /ocr request gets the next scripted answer
# ---------------------------------------------------------------------------------------------


class FakeServer:
    def __init__(self):
        self.requests: list[dict] = []
        self.times: list[float] = []
        self.headers: list[dict] = []
        self.script: list = []          # (status, body) or ("stream", [lines]); the last one repeats
        self.loading_polls = 0          # /health answers model_loaded false this many times
        self.health_polls = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, content_type="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/health":
                    fake.health_polls += 1
                    loaded = fake.health_polls > fake.loading_polls
                    self._send(200, json.dumps({"status": "healthy", "model_loaded": loaded}).encode())
                else:
                    self._send(404, b'{"error": "Not found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.times.append(time.monotonic())
                fake.headers.append(dict(self.headers))
                index = min(len(fake.requests) - 1, len(fake.script) - 1)
                answer = fake.script[index]
                if callable(answer):
                    answer = answer(body)
                status, payload = answer
                if status == "stream":
                    data = b"".join(json.dumps(line).encode() + b"\n" for line in payload)
                    self._send(200, data, "application/x-ndjson")
                else:
                    self._send(status, json.dumps(payload).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def ok_answer(body: dict):
    answer = {"model": "dots-ocr", "response": "[]", "prompt_type": body["prompt_type"]}
    if body.get("postprocess"):
        answer.update(layout=[{"bbox": [10, 10, 100, 60], "category": "Text", "text": "hello"}],
                      markdown="hello", repaired=False)
    if "page" in body:
        answer.update(page=body["page"], page_count=2)
    return 200, answer


BUSY = (429, {"error": "Server is busy processing another request"})


@pytest.fixture()
def fake():
    server = FakeServer()
    yield server
    server.close()


def _fake_run(fake, *args: str) -> int:
    return main([*args, "--server", fake.url, "--no-progress", "--retry-wait", "0.05"])


def test_requests_sent(fake, inputs, tmp_path):
    fake.script = [ok_answer]
    out = tmp_path / "out"
    assert _fake_run(fake, str(inputs), "--out", str(out), "--dpi", str(DPI), "--max-new-tokens", "8",
                     "--skip-headers-footers", "--api-key", "s3cret") == 0
    sent = fake.requests
    assert len(sent) == 4
    assert all(r["image_format"] == "base64" and r["postprocess"] is True and r["skip_headers_footers"] is True
               and r["max_new_tokens"] == 8 and r["stream"] is False for r in sent)
    assert all(h.get("Authorization") == "Bearer s3cret" for h in fake.headers)
    # Folder order: alpha.png, beta.jpg, docs/demo_pdf1.pdf; images carry no page/dpi.
    assert "page" not in sent[0] and "dpi" not in sent[0]
    assert base64.b64decode(sent[0]["image"]) == (inputs / "alpha.png").read_bytes()
    assert [(r["page"], r["dpi"]) for r in sent[2:]] == [(1, DPI), (2, DPI)]
    assert base64.b64decode(sent[3]["image"]) == PDF.read_bytes()
    # The layout was drawn on the page (box at 10..100 x 10..60 is no longer plain white).
    with Image.open(out / "alpha" / "page_0001" / "page.png") as png:
        assert png.convert("RGB").getpixel((50, 55)) != (255, 255, 255)
    assert (out / "alpha" / "page_0001" / "page.md").read_text() == "hello\n"


def test_retries_429_then_succeeds(fake, inputs, tmp_path):
    fake.script = [BUSY, BUSY, ok_answer]
    out = tmp_path / "out"
    assert _fake_run(fake, str(inputs / "alpha.png"), "--out", str(out), "--max-retries", "2") == 0
    assert len(fake.requests) == 3
    gaps = [b - a for a, b in zip(fake.times, fake.times[1:])]
    assert gaps[0] >= 0.05 * 0.9 and gaps[1] >= 0.10 * 0.9  # exponential: 0.05 s, then 0.1 s
    summary = _summary(out)
    assert (summary["ok"], summary["failed"], summary["busy_retries"]) == (1, 0, 2)


def test_gives_up_after_max_retries(fake, inputs, tmp_path, capsys):
    fake.script = [BUSY]
    out = tmp_path / "out"
    assert _fake_run(fake, str(inputs / "alpha.png"), str(inputs / "beta.jpg"), "--out", str(out),
                     "--max-retries", "2", "--max-retry-wait", "0.06") == 1
    assert len(fake.requests) == 2 * 3  # each page: the first try and 2 retries
    summary = _summary(out)
    assert (summary["ok"], summary["failed"]) == (0, 2)
    assert "busy after 2 retries" in summary["failures"][0]["error"]
    assert not (out / "alpha" / "page_0001" / "response.json").exists()
    assert "FAILED" in capsys.readouterr().out
    # The wait doubles from --retry-wait and is capped by --max-retry-wait.
    assert [backoff_delay(n, 1.0, 30.0) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(0, 1.0, 30.0, retry_after=5) == 5
    assert backoff_delay(100, 1.0, 30.0) == 30


def test_http_error_fails_page_and_run_continues(fake, inputs, tmp_path):
    fake.script = [(500, {"error": "Internal server error: RuntimeError"}), ok_answer]
    out = tmp_path / "out"
    assert _fake_run(fake, str(inputs / "alpha.png"), str(inputs / "beta.jpg"), "--out", str(out)) == 1
    summary = _summary(out)
    assert (summary["ok"], summary["failed"]) == (1, 1)
    assert summary["failures"] == [{"input": summary["failures"][0]["input"], "page": 1,
                                    "error": "HTTP 500: Internal server error: RuntimeError"}]
    assert summary["failures"][0]["input"].endswith("alpha.png")
    assert (out / "beta" / "page_0001" / "response.json").is_file()


def test_waits_for_the_model_to_load(fake, inputs, tmp_path, capsys):
    fake.script = [ok_answer]
    fake.loading_polls = 1
    assert _fake_run(fake, str(inputs / "alpha.png"), "--out", str(tmp_path / "out")) == 0
    assert fake.health_polls == 2 and len(fake.requests) == 1
    assert "still loading its model" in capsys.readouterr().err


def test_force_with_server_down_keeps_done_pages(fake, inputs, tmp_path):
    fake.script = [ok_answer]
    out = tmp_path / "out"
    assert _fake_run(fake, str(inputs / "alpha.png"), "--out", str(out)) == 0
    url = f"http://127.0.0.1:{free_port()}"
    assert main([str(inputs / "alpha.png"), "--out", str(out), "--server", url, "--force", "--no-progress"]) == 2
    assert (out / "alpha" / "page_0001" / "response.json").is_file()
    # Nothing left to do: a resumed run succeeds without asking the (dead) server anything.
    assert main([str(inputs / "alpha.png"), "--out", str(out), "--server", url, "--no-progress"]) == 0


def test_stream_error_line_fails_page(fake, inputs, tmp_path):
    fake.script = [("stream", [
        {"model": "dots-ocr", "created_at": "t", "response": "partial", "done": False},
        {"model": "dots-ocr", "created_at": "t", "response": "", "done": True, "error": "Generation failed: boom"},
    ])]
    out = tmp_path / "out"
    assert _fake_run(fake, str(inputs / "alpha.png"), "--out", str(out), "--stream") == 1
    assert "Generation failed: boom" in _summary(out)["failures"][0]["error"]


def test_unauthorized_is_fatal(fake, inputs, tmp_path, capsys):
    fake.script = [(401, {"error": "Unauthorized: send 'Authorization: Bearer <api key>'"})]
    assert _fake_run(fake, str(inputs / "alpha.png"), str(inputs / "beta.jpg"), "--out", str(tmp_path / "o")) == 2
    assert len(fake.requests) == 1
    assert "--api-key" in capsys.readouterr().err


def test_not_an_image_counts_as_failed(fake, inputs, tmp_path):
    fake.script = [ok_answer]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("hello")          # given explicitly: checked by content
    (bad / "fake.png").write_text("not a png")       # found in a folder by its extension
    out = tmp_path / "out"
    assert _fake_run(fake, str(bad / "notes.txt"), str(bad), str(bad / "missing.png"), str(inputs / "alpha.png"),
                     "--out", str(out)) == 1
    summary = _summary(out)
    assert (summary["ok"], summary["failed"], summary["pages"]) == (1, 3, 4)
    errors = sorted(f["error"] for f in summary["failures"])
    assert errors[0].endswith("fake.png: not an image or PDF (supported: PNG, JPEG, WebP, BMP, TIFF, GIF or PDF)")
    assert errors[1].endswith("missing.png: no such file or folder")
    assert "notes.txt: not an image or PDF" in errors[2]
    assert len(fake.requests) == 1


def test_content_detection_and_same_stem_names(fake, inputs, tmp_path):
    """A PDF named .png is a PDF; files with one stem in different folders get distinct folders."""
    fake.script = [ok_answer]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(inputs / "alpha.png", tmp_path / "a" / "page.png")
    shutil.copy(PDF, tmp_path / "b" / "page.png")
    items = collect_inputs([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a" / "page.png")])
    assert [(i.kind, i.page_count) for i in items] == [("image", 1), ("pdf", 2)]  # no duplicate
    assign_names(items)
    assert len({i.name for i in items}) == 2 and all(i.name.startswith("page-") for i in items)

    out = tmp_path / "out"
    assert _fake_run(fake, str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--dpi", str(DPI)) == 0
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == sorted(i.name for i in items)
    assert [r.get("page") for r in fake.requests] == [None, 1, 2]
