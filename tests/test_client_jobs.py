"""``dots-ocr-client --jobs`` end to end against server.py started as a real process on the tiny
checkpoint (its own ``--data-dir``, an API key): documents submitted as jobs, followed, their
results written in the usual folders; a stopped client re-attaching to its job; ``--force``;
refused documents; failed pages; the errors that stop a run. The paths a real server cannot be made
to take on demand (a server without jobs, an events stream that breaks) use small local servers."""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests
from PIL import Image

from dots_ocr_server.client import main
from dots_ocr_server.client.batch import RunControl
from dots_ocr_server.client.errors import PageError
from dots_ocr_server.client.http_client import OCRClient
from dots_ocr_server.client.inputs import assign_names, collect_inputs
from dots_ocr_server.client.job_results import read_result, write_result
from dots_ocr_server.client.jobs import JOB_RECORD_NAME, select_pages
from dots_ocr_server.client.jobs_api import JobsAPI
from ocr_client_support import DPI, PDF, FakeServer, page_image, read_summary
from serverproc import free_port, local_origin, running_server_process, wait_for

ROOT = Path(__file__).resolve().parents[1]
KEY = "jobs-test-key"
# prompt_ocr: the demo model's pages end done; a layout prompt type: every page ends failed
OPTIONS = ("--jobs", "--api-key", KEY, "--max-new-tokens", "16", "--temperature", "0", "--dpi", str(DPI))


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    data = tmp_path_factory.mktemp("jobs-data")
    with running_server_process(tiny_ckpt, "--threads", "8", "--data-dir", str(data), "--api-key", KEY,
                                log_dir=tmp_path_factory.mktemp("server-log")) as process:
        yield process.url


@pytest.fixture()
def inputs(tmp_path) -> Path:
    folder = tmp_path / "in"
    (folder / "docs").mkdir(parents=True)
    page_image(224, 280, 0).save(folder / "alpha.png")
    shutil.copy(PDF, folder / "docs" / "demo_pdf1.pdf")
    return folder


def _run(server: str, *args: str, prompt_type: str = "prompt_ocr") -> int:
    return main(["--server", server, "--prompt-type", prompt_type, *OPTIONS, *args])  # args last: they win


def _jobs_of(server: str, path: Path) -> list[dict]:
    """The server's jobs of the file at ``path`` (by its SHA-256), newest first."""
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    response = requests.get(f"{server}/jobs", params={"sha256": sha256}, timeout=10,
                            headers={"Authorization": f"Bearer {KEY}"})
    response.raise_for_status()
    return response.json()["jobs"]


def _job_ids(server: str, path: Path) -> list[str]:
    return [job["job_id"] for job in _jobs_of(server, path)]


def _record(out: Path, name: str) -> dict:
    return json.loads((out / name / JOB_RECORD_NAME).read_text())


@pytest.mark.slow
def test_folder_of_a_pdf_and_an_image(server, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    before = {path.name: _job_ids(server, path) for path in (inputs / "alpha.png", inputs / "docs" / "demo_pdf1.pdf")}
    assert _run(server, str(inputs), "--out", str(out), "--concurrency", "2") == 0
    err = capsys.readouterr().err
    summary = read_summary(out)
    assert (summary["pages"], summary["ok"], summary["failed"], summary["skipped"]) == (3, 3, 0, 0)
    assert summary["documents"] == {"written": 2, "failed": []}
    assert summary["concurrency"] == 2
    jobs = {job["input"]: job for job in summary["jobs"]}
    assert len(jobs) == 2 and not any(job["reattached"] for job in jobs.values())

    for name, path, pages in (("alpha", inputs / "alpha.png", 1), ("demo_pdf1", inputs / "docs" / "demo_pdf1.pdf", 2)):
        job = _jobs_of(server, path)[0]
        assert _job_ids(server, path)[1:] == before[path.name]  # one new job
        assert (job["status"], job["prompt_type"], job["pages_total"], job["pages_done"]) == ("done", "prompt_ocr",
                                                                                              pages, pages)
        assert jobs[next(key for key in jobs if key.endswith(path.name))]["job_id"] == job["job_id"]
        record = _record(out, name)
        assert (record["job_id"], record["downloaded"], record["server"]) == (job["job_id"], True, server)
        assert record["sha256"] == job["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert record["options"] == {"prompt_type": "prompt_ocr", "dpi": DPI, "temperature": 0.0, "max_new_tokens": 16}
        document = json.loads((out / name / "document.json").read_text())
        assert document["job_id"] == job["job_id"] and document["pages_done"] == pages
        assert (out / name / "document.md").read_text().strip()
        for entry in document["pages"]:
            page_dir = out / name / f"page_{entry['page']:04d}"
            assert sorted(p.name for p in page_dir.iterdir()) == ["page.md", "page.png", "response.json"]
            response = json.loads((page_dir / "response.json").read_text())
            assert response["response"] == entry["answer"] and response["prompt_type"] == "prompt_ocr"
            assert response["eval_count"] == 16 and response["job"]["job_id"] == job["job_id"]
            assert (page_dir / "page.md").read_text() == response["response"] + "\n"
            with Image.open(page_dir / "page.png") as png:
                assert png.size == (entry["width"], entry["height"])
            if name == "demo_pdf1":
                assert (response["page"], response["page_count"]) == (entry["page"], 2)
    assert Image.open(out / "alpha" / "page_0001" / "page.png").size == (224, 280)
    # one bar per document, fed by its events
    assert "demo_pdf1.pdf" in err and "2/2" in err and "alpha.png" in err

    # Complete inputs are skipped: no request for a job.
    assert _run(server, str(inputs), "--out", str(out), "--no-progress") == 0
    summary = read_summary(out)
    assert (summary["skipped"], summary["jobs"]) == (3, [])
    assert len(_job_ids(server, inputs / "docs" / "demo_pdf1.pdf")) == len(before["demo_pdf1.pdf"]) + 1


@pytest.mark.slow
def test_stopped_client_reattaches_to_its_job(server, inputs, tmp_path, capsys):
    pdf, out = inputs / "docs" / "demo_pdf1.pdf", tmp_path / "out"
    args = [str(pdf), "--out", str(out), "--server", server, "--prompt-type", "prompt_ocr", "--no-progress", *OPTIONS]
    args[args.index("16")] = "64"  # a longer job, stopped while it runs
    before = _job_ids(server, pdf)
    proc = subprocess.Popen([sys.executable, "-m", "dots_ocr_server.client.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "demo_pdf1" / JOB_RECORD_NAME).is_file() or proc.poll() is not None, 60,
                 what="the job's submission")
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "keep running on the server" in stderr and "run the same command again" in stderr
    job_id = _record(out, "demo_pdf1")["job_id"]
    assert _job_ids(server, pdf) == [job_id, *before]
    assert read_summary(out)["finished"] is False
    assert not (out / "demo_pdf1" / "page_0002" / "response.json").exists()

    assert main(args) == 0
    assert f"job {job_id}: re-attached" in capsys.readouterr().err
    summary = read_summary(out)
    assert (summary["ok"], summary["failed"]) == (2, 0)
    assert summary["jobs"] == [{"input": summary["jobs"][0]["input"], "job_id": job_id, "status": "done",
                                "reattached": True}]
    assert _job_ids(server, pdf) == [job_id, *before]  # no second job
    assert json.loads((out / "demo_pdf1" / "document.json").read_text())["job_id"] == job_id


@pytest.mark.slow
def test_force_and_changed_options_submit_new_jobs(server, inputs, tmp_path, capsys):
    image, out = inputs / "alpha.png", tmp_path / "out"
    before = _job_ids(server, image)
    assert _run(server, str(image), "--out", str(out), "--no-progress") == 0
    first = _record(out, "alpha")["job_id"]

    # A page lost locally: the finished job is downloaded again, not run again.
    (out / "alpha" / "page_0001" / "response.json").unlink()
    assert _run(server, str(image), "--out", str(out), "--no-progress") == 0
    assert read_summary(out)["jobs"][0]["reattached"] is True
    assert _job_ids(server, image) == [first, *before]

    assert _run(server, str(image), "--out", str(out), "--no-progress", "--force") == 0
    second = _record(out, "alpha")["job_id"]
    assert second != first and read_summary(out)["jobs"][0] == {"input": read_summary(out)["jobs"][0]["input"],
                                                                 "job_id": second, "status": "done",
                                                                 "reattached": False}
    assert _job_ids(server, image) == [second, first, *before]
    assert json.loads((out / "alpha" / "page_0001" / "response.json").read_text())["job"]["job_id"] == second

    # Other options than the recorded job's: not that job's result, a new one.
    (out / "alpha" / "page_0001" / "response.json").unlink()
    capsys.readouterr()
    assert _run(server, str(image), "--out", str(out), "--no-progress", "--max-new-tokens", "12") == 0
    assert len(_job_ids(server, image)) == len(before) + 3 and _record(out, "alpha")["options"]["max_new_tokens"] == 12
    assert "re-attached" not in capsys.readouterr().err


@pytest.mark.slow
def test_page_selection(server, inputs, tmp_path):
    pdf, out = inputs / "docs" / "demo_pdf1.pdf", tmp_path / "out"
    before = _job_ids(server, pdf)
    assert _run(server, str(pdf), "--out", str(out), "--no-progress", "--pages", "2") == 0
    assert sorted(p.name for p in (out / "demo_pdf1").iterdir() if p.is_dir()) == ["page_0002"]
    assert read_summary(out)["page_results"][0]["page"] == 2
    assert _jobs_of(server, pdf)[0]["pages_total"] == 1

    # A selection past the document's pages: that input fails before anything is sent.
    assert _run(server, str(pdf), "--out", str(tmp_path / "o2"), "--no-progress", "--pages", "2-5") == 1
    assert "page 5 is past the document's 2 pages" in read_summary(tmp_path / "o2")["failures"][0]["error"]
    assert len(_job_ids(server, pdf)) == len(before) + 1


def test_select_pages():
    assert select_pages(None, 3) == [1, 2, 3]
    assert select_pages("3, 1-2,2", 5) == [1, 2, 3]
    for spec, message in (("0", "pages start at 1"), ("3-2", "runs upwards"), ("x", "not a page number"),
                          ("4", "past the document's 3 pages")):
        with pytest.raises(PageError, match=message):
            select_pages(spec, 3)


@pytest.mark.slow
def test_refused_document_is_reported(server, tmp_path):
    """A file the client takes for a PNG (its header) that the server cannot decode: a 400, no job."""
    bad = tmp_path / "broken.png"
    page_image(300, 400, 2).save(bad)
    bad.write_bytes(bad.read_bytes()[:200])
    good = tmp_path / "good.png"
    page_image(120, 160, 3).save(good)
    out = tmp_path / "out"
    assert _run(server, str(bad), str(good), "--out", str(out), "--no-progress") == 1
    summary = read_summary(out)
    assert (summary["ok"], summary["failed"]) == (1, 1)
    (failure,) = summary["failures"]
    assert failure["page"] is None and "refused the document (HTTP 400" in failure["error"]
    assert _jobs_of(server, bad) == [] and not (out / "broken" / JOB_RECORD_NAME).exists()


@pytest.mark.slow
def test_failed_pages_exit_1_and_a_new_job_tries_them_again(server, inputs, tmp_path):
    image, out = inputs / "alpha.png", tmp_path / "out"
    before = _job_ids(server, image)
    assert _run(server, str(image), "--out", str(out), "--no-progress", prompt_type="prompt_layout_all_en") == 1
    summary = read_summary(out)
    assert (summary["ok"], summary["failed"], summary["documents"]) == (0, 1, {"written": 0, "failed": []})
    (failure,) = summary["failures"]
    assert failure["page"] == 1 and failure["error"].startswith("unparsable_layout")
    assert not (out / "alpha" / "page_0001" / "response.json").exists()
    assert not (out / "alpha" / "document.md").exists()
    first = _jobs_of(server, image)[0]
    assert (first["status"], first["pages_failed"], first["prompt_type"]) == ("done", 1, "prompt_layout_all_en")
    assert _job_ids(server, image)[1:] == before

    # Run again: the failures were reported, so a new job tries the page again.
    assert _run(server, str(image), "--out", str(out), "--no-progress", prompt_type="prompt_layout_all_en") == 1
    assert _job_ids(server, image)[1:] == [first["job_id"], *before]


@pytest.mark.slow
def test_errors_that_stop_the_run(server, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(inputs), "--out", str(out), "--server", server, "--jobs", "--api-key", "wrong"]) == 2
    assert "refused the request (HTTP 401" in capsys.readouterr().err and not out.exists()

    assert main([str(inputs), "--out", str(out), "--server", f"http://127.0.0.1:{free_port()}", "--jobs"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err and not out.exists()

    fake = FakeServer()  # /health only: an older server, or one started with --no-jobs
    try:
        assert main([str(inputs), "--out", str(out), "--server", fake.url, "--jobs"]) == 2
    finally:
        fake.close()
    assert "does not serve document jobs" in capsys.readouterr().err and not out.exists()

    for argv, message in ((["--pages", "1"], "--pages is only used with --jobs"),
                          (["--jobs", "--logprobs"], "not available with --jobs")):
        with pytest.raises(SystemExit) as exc:
            main([str(inputs), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_a_broken_events_stream_is_reopened():
    """A stream that ends without its end event (a proxy's timeout): the job's status is read and
    the stream opened again until the job ends."""
    state = {"streams": 0, "status_reads": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/jobs/j1/events":
                state["streams"] += 1
                event = {"event": "page", "page": state["streams"], "status": "done", "pages_total": 2,
                         "pages_done": state["streams"], "pages_failed": 0}
                self._send(json.dumps(event).encode() + b"\n", "application/x-ndjson")  # then it ends
            elif self.path == "/jobs/j1":
                state["status_reads"] += 1
                done = state["streams"] >= 2
                self._send(json.dumps({"job_id": "j1", "status": "done" if done else "running", "pages_total": 2,
                                       "pages_done": state["streams"], "pages_failed": 0,
                                       "pages": [{"page": 1, "status": "done"},
                                                 {"page": 2, "status": "done" if done else "running"}]}).encode())

    seen: list[int] = []
    with local_origin(Handler) as url:
        client = OCRClient(url, sleep=lambda _s: None)
        try:
            end = JobsAPI(client, wait_s=0).follow("j1", lambda event: seen.append(event["pages_done"]))
        finally:
            client.close()
    assert end["status"] == "done" and state == {"streams": 2, "status_reads": 2}
    assert seen == [1, 1, 2, 2]


def test_a_layout_result_leaves_the_folders_of_a_page_by_page_run(tmp_path):
    """A layout job's result (made by the server's own views, with a figure): the per-page files
    of outputs.py, the document files, and a folder dots-ocr-assemble reads like any other."""
    from dots_ocr_server.document.cli import main as assemble_main
    from dots_ocr_server.document.inputs import read_client_folder
    from dots_ocr_server.jobs.pages import save_figures
    from dots_ocr_server.jobs.store import JobRow, PageRow
    from dots_ocr_server.jobs.views import document_zip_bytes, job_document

    image = tmp_path / "scan.png"
    page_image(224, 280, 0).save(image)
    cells = [{"bbox": [10, 10, 200, 40], "category": "Title", "text": "Hello"},
             {"bbox": [20, 60, 180, 200], "category": "Picture"},
             {"bbox": [10, 220, 200, 260], "category": "Text", "text": "World"}]
    answer = {"width": 224, "height": 280, "response": json.dumps(cells), "done_reason": "stop", "eval_count": 40,
              "total_duration": 2_000_000_000, "layout": cells, "markdown": "# Hello\n\nWorld", "repaired": False}
    job = JobRow(seq=1, id="j1", status="done", created_at=0.0, started_at=0.0, finished_at=1.0, source="scan.png",
                 sha256="0" * 64, kind="image", page_count=1, pages_total=1, file=None, file_bytes=0, error=None,
                 options={"prompt_type": "prompt_layout_all_en", "temperature": 0.1, "top_p": 1.0,
                          "max_new_tokens": 64, "dpi": DPI, "prompt": None, "seed": None})
    pages = [PageRow(job_id="j1", page=1, status="done", attempts=1, error=None, done_reason="stop", result=answer,
                     started_at=0.0, finished_at=1.0)]
    with Image.open(image) as picture:
        save_figures(tmp_path / "figures", 1, answer, picture.convert("RGB"))
    data = document_zip_bytes(job, pages, job_document(job, pages), tmp_path / "figures")

    (item,) = collect_inputs([str(image)])
    assign_names([item])
    out = tmp_path / "out"
    written = write_result(read_result(data), item, out, prompt_type="prompt_layout_all_en", dpi=DPI,
                           control=RunControl())
    assert written.document_written and [(r.page, r.status, r.seconds) for r in written.records] == [(1, "ok", 2.0)]
    folder = out / "scan"
    assert sorted(p.name for p in (folder / "page_0001").iterdir()) == ["layout.json", "page.md", "page.png",
                                                                         "response.json"]
    response = json.loads((folder / "page_0001" / "response.json").read_text())
    assert response["layout"] == cells == json.loads((folder / "page_0001" / "layout.json").read_text())
    assert (response["prompt_type"], response["eval_count"], response["job"]) == ("prompt_layout_all_en", 40,
                                                                                   {"job_id": "j1", "attempts": 1})
    assert "page" not in response  # an image: no page fields, as /ocr gives them
    assert (folder / "page_0001" / "page.md").read_text().startswith("# Hello")
    with Image.open(folder / "page_0001" / "page.png") as png, Image.open(image) as original:
        assert png.size == (224, 280) and png.convert("RGB").tobytes() != original.convert("RGB").tobytes()  # drawn
    assert "![Picture](figures/page-1-fig-1.png)" in (folder / "document.md").read_text()
    assert (folder / "figures" / "page-1-fig-1.png").is_file()

    assert not (folder / "chunks.jsonl").exists()
    # --jobs --chunks: the server's chunks.jsonl comes in the ZIP; a later run without it removes it
    with_chunks = document_zip_bytes(job, pages, job_document(job, pages), tmp_path / "figures", chunks=True)
    assert write_result(read_result(with_chunks), item, out, prompt_type="prompt_layout_all_en", dpi=DPI,
                        control=RunControl()).document_written
    chunks = [json.loads(line) for line in (folder / "chunks.jsonl").read_text().splitlines()]
    assert chunks and chunks[0]["pages"] == [1] and "Hello" in chunks[0]["headings"] + [chunks[0]["text"]]
    write_result(read_result(data), item, out, prompt_type="prompt_layout_all_en", dpi=DPI, control=RunControl())
    assert not (folder / "chunks.jsonl").exists()

    assert [len(page.cells) for page in read_client_folder(folder).pages] == [3]
    assert assemble_main([str(folder), "--chunks"]) == 0  # the folder a --jobs run wrote assembles again
    assert (folder / "chunks.jsonl").read_text().strip() and (folder / "figures" / "page-1-fig-1.png").is_file()


@pytest.mark.parametrize("prompt_type, extra, files", [
    ("prompt_scene_spotting",
     {"spots": [{"quad": [[5, 5], [60, 5], [60, 30], [5, 30]], "text": "EXIT"}], "markdown": "EXIT", "repaired": False},
     {"spots.json", "page.md", "page.png", "response.json"}),
    ("prompt_image_to_svg",
     {"svg": '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 224 280"></svg>', "repaired": True},
     {"page.svg", "page.md", "page.png", "response.json"}),
])
def test_spotting_and_svg_results_leave_their_files_as_a_page_by_page_run(tmp_path, prompt_type, extra, files):
    """The job's page carries what the server made of the answer (quadrilaterals, the repaired SVG
    document); the client writes it where a page-by-page run would."""
    from dots_ocr_server.jobs.store import JobRow, PageRow
    from dots_ocr_server.jobs.views import document_zip_bytes, job_document

    image = tmp_path / "sign.png"
    page_image(224, 280, 0).save(image)
    answer = {"width": 224, "height": 280, "response": "raw answer", "done_reason": "stop", "eval_count": 7, **extra}
    job = JobRow(seq=1, id="j2", status="done", created_at=0.0, started_at=0.0, finished_at=1.0, source="sign.png",
                 sha256="0" * 64, kind="image", page_count=1, pages_total=1, file=None, file_bytes=0, error=None,
                 options={"prompt_type": prompt_type, "temperature": 0.1, "top_p": 1.0, "max_new_tokens": 64,
                          "dpi": DPI, "prompt": None, "seed": None})
    pages = [PageRow(job_id="j2", page=1, status="done", attempts=1, error=None, done_reason="stop", result=answer,
                     started_at=0.0, finished_at=1.0)]
    data = document_zip_bytes(job, pages, job_document(job, pages), tmp_path / "figures")
    (item,) = collect_inputs([str(image)])
    assign_names([item])
    written = write_result(read_result(data), item, tmp_path / "out", prompt_type=prompt_type, dpi=DPI,
                           control=RunControl())
    assert [r.status for r in written.records] == ["ok"]
    folder = tmp_path / "out" / "sign" / "page_0001"
    assert {p.name for p in folder.iterdir()} == files
    response = json.loads((folder / "response.json").read_text())
    assert response["repaired"] == extra["repaired"] and response["response"] == "raw answer"
    if "spots" in extra:
        assert json.loads((folder / "spots.json").read_text()) == response["spots"] == extra["spots"]
        assert (folder / "page.md").read_text() == "EXIT\n"
    else:
        assert (folder / "page.svg").read_text() == response["svg"] == extra["svg"]
        assert (folder / "page.md").read_text() == "raw answer\n"
