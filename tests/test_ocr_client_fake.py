"""The client CLI (ocr_client) against a scripted fake server: the paths a real server cannot be
made to take on demand (429 with or without Retry-After, 500, 401, a stream that ends in an
error), what is uploaded (one image per page, a PDF page rendered once), and K pages in flight."""
from __future__ import annotations

import base64
import email.utils
import io
import json
import shutil

import pytest
from PIL import Image, ImageChops

from dots_ocr_server.client import main
from dots_ocr_server.client.http_client import backoff_delay, parse_retry_after
from dots_ocr_server.client.inputs import assign_names, collect_inputs
from ocr_client_support import BUSY, DPI, PDF, FakeServer, make_inputs, ok_answer, page_image, read_summary
from serverproc import free_port


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture()
def fake():
    server = FakeServer()
    yield server
    server.close()


def _fake_run(fake, *args: str) -> int:
    return main([*args, "--server", fake.url, "--no-progress", "--retry-wait", "0.05"])


def _uploaded(request: dict) -> bytes:
    return base64.b64decode(request["image"])


def _images(folder, count: int) -> list[str]:
    folder.mkdir()
    paths = []
    for n in range(count):
        page_image(120, 150, n).save(folder / f"img{n}.png")
        paths.append(str(folder / f"img{n}.png"))
    return paths


@pytest.mark.slow
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
    # Every request is one image: no page/dpi fields, PDF pages included.
    assert not any("page" in r or "dpi" in r for r in sent)
    # Folder order: alpha.png, beta.jpg, docs/demo_pdf1.pdf; an image file is sent as it is.
    assert _uploaded(sent[0]) == (inputs / "alpha.png").read_bytes()
    assert _uploaded(sent[1]) == (inputs / "beta.jpg").read_bytes()
    # /health without max_batch_size: one page at a time.
    summary = read_summary(out)
    assert fake.max_in_flight == 1 and summary["concurrency"] == 1
    # The layout was drawn on the page (box at 10..100 x 10..60 is no longer plain white).
    with Image.open(out / "alpha" / "page_0001" / "page.png") as png:
        assert png.convert("RGB").getpixel((50, 55)) != (255, 255, 255)
    assert (out / "alpha" / "page_0001" / "page.md").read_text() == "hello\n"


@pytest.mark.slow
def test_pdf_pages_are_uploaded_once_as_one_page_images(fake, tmp_path):
    from image_utils import load_document

    fake.script = [ok_answer]
    out = tmp_path / "out"
    assert _fake_run(fake, str(PDF), "--out", str(out), "--dpi", str(DPI)) == 0
    assert len(fake.requests) == 2
    pdf_size = PDF.stat().st_size
    for page, request in enumerate(fake.requests, start=1):
        data = _uploaded(request)
        assert b"%PDF-" not in data[:1024]
        expected = load_document(str(PDF), "path", page=page, dpi=DPI).image
        with Image.open(io.BytesIO(data)) as sent:
            assert sent.format == "PNG" and sent.size == expected.size
            assert ImageChops.difference(sent.convert("RGB"), expected).getbbox() is None  # that page, lossless
        assert len(data) < pdf_size
        # The page fields come from the client (the server saw an image); page.png is the upload.
        response = json.loads((out / "demo_pdf1" / f"page_{page:04d}" / "response.json").read_text())
        assert (response["page"], response["page_count"]) == (page, 2)
        assert list(response)[:5] == ["model", "response", "prompt_type", "page", "page_count"]
        with Image.open(out / "demo_pdf1" / f"page_{page:04d}" / "page.png") as png:
            assert png.size == expected.size
    assert _uploaded(fake.requests[0]) != _uploaded(fake.requests[1])


def test_concurrency_keeps_k_pages_in_flight(fake, tmp_path, capsys):
    fake.script = [ok_answer]
    fake.hold_until = 3  # no answer until 3 requests were in flight together
    out = tmp_path / "out"
    paths = _images(tmp_path / "imgs", 7)
    assert main([*paths, "--server", fake.url, "--out", str(out), "--concurrency", "3"]) == 0
    assert fake.max_in_flight == 3 and len(fake.requests) == 7
    summary = read_summary(out)
    assert (summary["ok"], summary["concurrency"]) == (7, 3)
    # Records stay in input order whatever order the pages finished in.
    assert [r["input"].rsplit("/", 1)[-1] for r in summary["page_results"]] == [f"img{n}.png" for n in range(7)]
    assert "7/7" in capsys.readouterr().err  # the progress bar counted every page once


def test_default_concurrency_is_the_servers_max_batch_size(fake, tmp_path):
    fake.script = [ok_answer]
    fake.health = {"max_batch_size": 2}
    fake.hold_until = 2
    out = tmp_path / "out"
    assert _fake_run(fake, *_images(tmp_path / "imgs", 4), "--out", str(out)) == 0
    assert fake.max_in_flight == 2
    assert read_summary(out)["concurrency"] == 2


@pytest.mark.slow
def test_resume_with_pages_in_flight(fake, inputs, tmp_path):
    fake.script = [ok_answer]
    out = tmp_path / "out"
    assert _fake_run(fake, str(inputs), "--out", str(out), "--dpi", str(DPI), "--concurrency", "3") == 0
    assert len(fake.requests) == 4
    (out / "demo_pdf1" / "page_0002" / "response.json").unlink()  # as if interrupted on that page
    done = out / "alpha" / "page_0001" / "response.json"
    before = done.stat().st_mtime_ns

    assert _fake_run(fake, str(inputs), "--out", str(out), "--dpi", str(DPI), "--concurrency", "3") == 0
    summary = read_summary(out)
    assert (summary["ok"], summary["skipped"], summary["failed"]) == (1, 3, 0)
    assert len(fake.requests) == 5 and done.stat().st_mtime_ns == before
    with Image.open(out / "demo_pdf1" / "page_0002" / "page.png") as png, \
            Image.open(io.BytesIO(_uploaded(fake.requests[-1]))) as sent:
        assert sent.size == png.size
    assert json.loads((out / "demo_pdf1" / "page_0002" / "response.json").read_text())["page"] == 2


def test_retries_429_then_succeeds(fake, inputs, tmp_path):
    fake.script = [BUSY, BUSY, ok_answer]
    out = tmp_path / "out"
    assert _fake_run(fake, str(inputs / "alpha.png"), "--out", str(out), "--max-retries", "2") == 0
    assert len(fake.requests) == 3
    gaps = [b - a for a, b in zip(fake.times, fake.times[1:])]
    assert gaps[0] >= 0.05 * 0.9 and gaps[1] >= 0.10 * 0.9  # exponential: 0.05 s, then 0.1 s
    summary = read_summary(out)
    assert (summary["ok"], summary["failed"], summary["busy_retries"]) == (1, 0, 2)


def test_429_waits_for_retry_after_with_pages_in_flight(fake, inputs, tmp_path):
    busy_for_a_while = (*BUSY, {"Retry-After": "0.4"})
    fake.script = [busy_for_a_while, busy_for_a_while, ok_answer]
    out = tmp_path / "out"
    assert _fake_run(fake, str(inputs / "alpha.png"), str(inputs / "beta.jpg"), "--out", str(out),
                     "--concurrency", "2") == 0
    assert len(fake.requests) == 4
    first_busy = max(fake.times[:2])
    assert min(fake.times[2:]) - first_busy >= 0.4 * 0.9  # not the 0.05 s of --retry-wait
    summary = read_summary(out)
    assert (summary["ok"], summary["busy_retries"]) == (2, 2)
    # Retry-After as seconds or as an HTTP date; unreadable values are ignored.
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(email.utils.formatdate(1_000_010, usegmt=True), now=1_000_000) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_gives_up_after_max_retries(fake, inputs, tmp_path, capsys):
    fake.script = [BUSY]
    out = tmp_path / "out"
    assert _fake_run(fake, str(inputs / "alpha.png"), str(inputs / "beta.jpg"), "--out", str(out),
                     "--max-retries", "2", "--max-retry-wait", "0.06") == 1
    assert len(fake.requests) == 2 * 3  # each page: the first try and 2 retries
    summary = read_summary(out)
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
    summary = read_summary(out)
    assert (summary["ok"], summary["failed"]) == (1, 1)
    assert summary["failures"] == [{"input": summary["failures"][0]["input"], "page": 1,
                                    "error": "HTTP 500: Internal server error: RuntimeError"}]
    assert summary["failures"][0]["input"].endswith("alpha.png")
    assert (out / "beta" / "page_0001" / "response.json").is_file()


@pytest.mark.slow
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
    for concurrency in ([], ["--concurrency", "2"]):
        assert main([str(inputs / "alpha.png"), "--out", str(out), "--server", url, "--force", "--no-progress",
                     *concurrency]) == 2
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
    assert "Generation failed: boom" in read_summary(out)["failures"][0]["error"]


def test_unauthorized_is_fatal(fake, inputs, tmp_path, capsys):
    fake.script = [(401, {"error": "Unauthorized: send 'Authorization: Bearer <api key>'"})]
    assert _fake_run(fake, str(inputs / "alpha.png"), str(inputs / "beta.jpg"), "--out", str(tmp_path / "o")) == 2
    assert len(fake.requests) == 1
    assert "--api-key" in capsys.readouterr().err
    # With pages in flight, the first 401 stops the run too: no page starts after it.
    out = tmp_path / "o2"
    assert _fake_run(fake, *_images(tmp_path / "imgs", 6), "--out", str(out), "--concurrency", "2") == 2
    assert len(fake.requests) <= 1 + 2 and not out.exists()


def test_not_an_image_counts_as_failed(fake, inputs, tmp_path):
    fake.script = [ok_answer]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("hello")          # given explicitly: checked by content
    (bad / "fake.png").write_text("not a png")       # found in a folder by its extension
    (bad / "broken.pdf").write_bytes(b"%PDF-1.7\n" + b"\0" * 64)
    out = tmp_path / "out"
    assert _fake_run(fake, str(bad / "notes.txt"), str(bad), str(bad / "missing.png"), str(inputs / "alpha.png"),
                     "--out", str(out)) == 1
    summary = read_summary(out)
    assert (summary["ok"], summary["failed"], summary["pages"]) == (1, 4, 5)
    errors = sorted(f["error"] for f in summary["failures"])
    assert errors[0].endswith("broken.pdf: Could not open PDF: the file is damaged or not a valid PDF")
    assert errors[1].endswith("fake.png: not an image or PDF (supported: PNG, JPEG, WebP, BMP, TIFF, GIF or PDF)")
    assert errors[2].endswith("missing.png: no such file or folder")
    assert "notes.txt: not an image or PDF" in errors[3]
    assert len(fake.requests) == 1


@pytest.mark.slow
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
    pdf_folder = next(i.name for i in items if i.kind == "pdf")
    pages = [json.loads((out / pdf_folder / f"page_{n:04d}" / "response.json").read_text())["page"] for n in (1, 2)]
    assert pages == [1, 2] and len(fake.requests) == 3


# -- the dots.mocr prompt types ----------------------------------------------------------------


def _typed_answer(body: dict):
    answer = {"model": "dots-ocr", "response": "raw", "prompt_type": body["prompt_type"]}
    if body["prompt_type"] == "prompt_scene_spotting":
        answer.update(spots=[{"quad": [[5, 5], [60, 5], [60, 30], [5, 30]], "text": "EXIT"}], markdown="EXIT",
                      repaired=False)
    elif body["prompt_type"] == "prompt_image_to_svg":
        answer.update(svg='<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 120 150"></svg>', repaired=False)
    return 200, answer


@pytest.mark.parametrize("prompt_type, extra, files", [
    ("prompt_scene_spotting", [], {"spots.json", "page.md", "page.png", "response.json"}),
    ("prompt_image_to_svg", [], {"page.svg", "page.md", "page.png", "response.json"}),
    ("prompt_general", ["--prompt", "What is the title?"], {"page.md", "page.png", "response.json"}),
    ("prompt_web_parsing", [], {"layout.json", "page.md", "page.png", "response.json"}),
])
def test_new_prompt_types_send_and_save_their_outputs(fake, tmp_path, prompt_type, extra, files):
    fake.script = [_typed_answer]
    images = _images(tmp_path / "in", 1)
    out = tmp_path / "out"
    assert _fake_run(fake, *images, "--out", str(out), "--prompt-type", prompt_type, *extra) == 0
    sent = fake.requests[0]
    assert sent["prompt_type"] == prompt_type
    assert "temperature" not in sent  # the server's default for the type (0.9 for SVG)
    assert sent.get("postprocess", False) is (prompt_type != "prompt_general")
    assert sent.get("prompt") == (extra[1] if extra else None)
    page_dir = out / "img0" / "page_0001"
    assert {p.name for p in page_dir.iterdir()} == files
    if prompt_type == "prompt_scene_spotting":
        assert json.loads((page_dir / "spots.json").read_text())[0]["text"] == "EXIT"
        assert (page_dir / "page.md").read_text() == "EXIT\n"
    if prompt_type == "prompt_image_to_svg":
        assert (page_dir / "page.svg").read_text().startswith("<svg")


@pytest.mark.parametrize("args, message", [
    (["--prompt-type", "prompt_general"], "--prompt QUESTION is required"),
    (["--prompt-type", "prompt_ocr", "--prompt", "why?"], "--prompt is only used with"),
    (["--prompt-type", "prompt_grounding_ocr"], "invalid choice"),
])
def test_prompt_option_rules(fake, tmp_path, capsys, args, message):
    images = _images(tmp_path / "in", 1)
    with pytest.raises(SystemExit) as exit_info:
        _fake_run(fake, *images, "--out", str(tmp_path / "out"), *args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert fake.requests == []
