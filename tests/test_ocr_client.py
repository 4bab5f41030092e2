"""The client CLI (ocr_client) end to end against server.py started as a real process on the tiny
checkpoint. The paths a real server cannot be made to take on demand (429, 500, 401, broken
streams, many requests in flight) are in test_ocr_client_fake.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from dots_ocr_server.client import main
from ocr_client_support import DPI, make_inputs, read_summary
from serverproc import free_port, running_server

pytestmark = pytest.mark.slow  # the tier of pyproject.toml's "slow" marker

ROOT = Path(__file__).resolve().parents[1]
PAGE_FILES = ("response.json", "layout.json", "page.md", "page.png")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("inputs"))


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
    summary = read_summary(out)
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

    # Images keep their size; a PDF page is rendered once, by the client, at the requested dpi.
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
    summary = read_summary(out)
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (0, 0, 4)
    assert marker.stat().st_mtime_ns == before

    # An interrupted page (files written, no response.json) is redone; --force redoes done pages.
    (out / "beta" / "page_0001" / "response.json").unlink()
    assert _run(str(inputs / "beta.jpg"), str(inputs / "alpha.png"), "--server", real_server,
                "--out", str(out), "--force") == 0
    summary = read_summary(out)
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


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_saved_next_to_the_page(real_server, tmp_path, stream):
    image = tmp_path / "one.png"
    Image.new("RGB", (120, 90), "white").save(image)
    out = tmp_path / "out"
    extra = ["--stream"] if stream else []
    assert _run(str(image), "--server", real_server, "--out", str(out), "--prompt-type", "prompt_ocr",
                "--logprobs", "--top-logprobs", "2", *extra) == 0
    page = out / "one" / "page_0001"
    response = json.loads((page / "response.json").read_text())
    tokens = json.loads((page / "logprobs.json").read_text())
    assert "logprobs" not in response and len(tokens) == response["eval_count"] > 0
    assert all(t["logprob"] <= 0 and len(t["top_logprobs"]) == 2 for t in tokens)
    assert _run(str(image), "--server", real_server, "--out", str(out), "--prompt-type", "prompt_ocr",
                "--force") == 0
    assert not (page / "logprobs.json").exists()



def test_documents_next_to_the_pages(first_run):
    """Each input's document.md / document.json next to its pages, from the real server's answers.
    A page whose answer loops or is no layout JSON (the tiny model's usually are not) was asked
    again at scale 0.95; if still bad, it is in the document's issues."""
    from dots_ocr_server.document import answer_problem

    out = first_run["out"]
    summary = read_summary(out)
    assert summary["documents"] == {"written": 3, "failed": []}
    retried = 0
    for name, pages in (("alpha", 1), ("beta", 1), ("demo_pdf1", 2)):
        assert (out / name / "document.md").is_file()
        data = json.loads((out / name / "document.json").read_text())
        assert [p["page"] for p in data["pages"]] == list(range(1, pages + 1))
        answers = [json.loads((out / name / f"page_{n:04d}" / "response.json").read_text())
                   for n in range(1, pages + 1)]
        assert data["issues"] == [{"page": n, "kind": answer_problem(a), "retried_at_scale": 0.95}
                                  for n, a in enumerate(answers, start=1) if answer_problem(a)]
        for answer in answers:
            if answer_problem(answer):
                assert answer["rescaled_retry"]["kept"] == "first"
            elif "rescaled_retry" in answer:
                assert answer["rescaled_retry"]["kept"] == "retry"
            retried += "rescaled_retry" in answer
    assert summary["rescaled_retries"] == retried
