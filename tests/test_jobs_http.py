"""Document jobs against real server processes (tiny checkpoint, CPU): the whole life of a job
over HTTP, and crash safety: a server killed (SIGKILL) while a job is queued, in the middle of a
page and between two pages, then started again on the same --data-dir, finishes every job with
every page exactly once, and the pages done before a kill are never run again; SIGTERM lets the
running page finish within the grace time."""
from __future__ import annotations

import base64
import json
import os
import signal
import time

import pytest
import requests

from serverproc import running_server_process, start_server, wait_for, wait_until_loaded
from test_image_utils import make_pdf

pytestmark = pytest.mark.slow  # the tier of pyproject.toml's "slow" marker

FAST = {"prompt_type": "prompt_ocr", "dpi": 72, "temperature": 0}


def _pdf(pages: int) -> bytes:
    return make_pdf([(612, 792)] * pages, marks=range(0, pages, 2))


def _status(url: str, job_id: str) -> dict:
    return requests.get(f"{url}/jobs/{job_id}", timeout=10).json()


def _wait_done(url: str, job_id: str, timeout: float = 120) -> dict:
    seen = {}

    def done() -> bool:
        seen.update(_status(url, job_id))
        return seen["status"] in ("done", "failed", "cancelled")

    wait_for(done, timeout, what=f"job {job_id} to finish", interval_s=0.1)
    return seen


def test_the_life_of_a_job_over_http(tiny_ckpt, tmp_path):
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(_pdf(3))
    with running_server_process(tiny_ckpt, "--data-dir", str(tmp_path / "data"), log_dir=tmp_path) as server:
        url = server.url
        by_path = requests.post(f"{url}/jobs", json={"document": str(pdf), "document_format": "path",
                                                     "max_new_tokens": 8, **FAST}, timeout=30)
        assert by_path.status_code == 202, by_path.text
        upload = requests.post(f"{url}/jobs", files={"file": ("report.pdf", pdf.read_bytes(), "application/pdf")},
                               data={"pages": "2-3", "max_new_tokens": "8", **{k: str(v) for k, v in FAST.items()}},
                               timeout=30)
        assert upload.status_code == 202 and upload.json()["pages_total"] == 2, upload.text
        encoded = requests.post(f"{url}/jobs", json={"document": base64.b64encode(pdf.read_bytes()).decode(),
                                                     "document_format": "base64", "pages": "1",
                                                     "max_new_tokens": 8, **FAST}, timeout=30)
        assert encoded.status_code == 202 and encoded.json()["pages_total"] == 1
        # the events of the first job, as they come: one per page, then the end
        with requests.get(url + by_path.json()["links"]["events"], stream=True, timeout=60) as events:
            lines = [json.loads(line) for line in events.iter_lines() if line]
        lines = [e for e in lines if e["event"] != "status"]  # the keep-alive of a slow machine
        assert [e["event"] for e in lines] == ["page", "page", "page", "end"]
        assert [e["pages_done"] for e in lines[:3]] == [1, 2, 3]
        for answer, pages in ((by_path.json(), [1, 2, 3]), (upload.json(), [2, 3]), (encoded.json(), [1])):
            status = _wait_done(url, answer["job_id"])
            assert status["status"] == "done" and [p["page"] for p in status["pages"]] == pages
            result = requests.get(url + answer["links"]["result"], timeout=30)
            assert result.status_code == 200 and [p["page"] for p in result.json()["pages"]] == pages
            markdown = requests.get(url + answer["links"]["result"] + "?format=markdown", timeout=30)
            assert markdown.headers["Content-Type"].startswith("text/markdown")
        bad = requests.post(f"{url}/jobs", files={"file": ("notes.pdf", b"%PDF-1.4 broken", "application/pdf")},
                            timeout=30)
        assert bad.status_code == 400 and "PDF" in bad.json()["error"]
        listed = requests.get(f"{url}/jobs?limit=2", timeout=10).json()
        assert len(listed["jobs"]) == 2 and listed["next"]
        rest = requests.get(url + listed["next"], timeout=10).json()
        assert len(rest["jobs"]) == 1 and rest["next"] is None  # three jobs: the bad upload made none


def _kill(server) -> None:
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)


def _start(tiny_ckpt, data, tmp_path, *args: str):
    server = start_server(tiny_ckpt, "--data-dir", str(data), *args, log_dir=tmp_path)
    wait_until_loaded(server.health, 120, failed=server.exited)
    return server


def _submit(url: str, pages: int, max_new_tokens: int) -> str:
    response = requests.post(f"{url}/jobs", json={"document": base64.b64encode(_pdf(pages)).decode(),
                                                  "document_format": "base64", "max_new_tokens": max_new_tokens,
                                                  **FAST}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def _done_pages(status: dict) -> set[int]:
    return {p["page"] for p in status["pages"] if p["status"] == "done"}


def test_killed_queued_mid_page_and_between_pages_nothing_is_lost_or_run_twice(tiny_ckpt, tmp_path):
    data = tmp_path / "data"
    server = _start(tiny_ckpt, data, tmp_path)
    try:
        first = _submit(server.url, 6, 200)  # pages of a few hundred tokens each
        second = _submit(server.url, 3, 40)
        # kill 1: the first job in the middle of a page (two done, one running), the second queued
        wait_for(lambda: len(_done_pages(_status(server.url, first))) >= 2
                 and any(p["status"] == "running" for p in _status(server.url, first)["pages"]),
                 60, what="two pages done and one running", interval_s=0.02)
        before_kill_1 = _status(server.url, first)
        queued = _status(server.url, second)
        _kill(server)
        assert queued["status"] == "queued" and all(p["attempts"] == 0 for p in queued["pages"])
        running_at_kill = {p["page"] for p in before_kill_1["pages"] if p["status"] == "running"}

        # kill 2: right after a page has finished (between two pages)
        server = _start(tiny_ckpt, data, tmp_path)
        with requests.get(f"{server.url}/jobs/{first}/events", stream=True, timeout=60) as events:
            already = len(_done_pages(before_kill_1))
            for line in events.iter_lines():
                event = json.loads(line)
                if event["event"] == "page" and event["pages_done"] > already:
                    break
        before_kill_2 = _status(server.url, first)
        _kill(server)

        # the last start: both jobs end
        server = _start(tiny_ckpt, data, tmp_path)
        final = [_wait_done(server.url, job_id, 180) for job_id in (first, second)]
        results = [requests.get(f"{server.url}/jobs/{job_id}/result", timeout=30).json() for job_id in (first, second)]
    finally:
        if server.proc.poll() is None:
            server.stop()
    for status, result, count in zip(final, results, (6, 3)):
        assert status["status"] == "done" and status["pages_done"] == count and status["pages_failed"] == 0
        assert [p["page"] for p in result["pages"]] == list(range(1, count + 1))  # every page, exactly once
    attempts = {p["page"]: p["attempts"] for p in final[0]["pages"]}
    for page in _done_pages(before_kill_1):
        assert attempts[page] == 1, (page, attempts)  # done before the first kill: never run again
    for page in _done_pages(before_kill_2):  # done before the second kill: run once, or twice if the first kill cut it
        assert attempts[page] == 1 + (page in running_at_kill), (page, attempts)
    for page in running_at_kill:
        assert attempts[page] >= 2, (page, attempts)  # running at the kill: run again, and it shows
    assert all(p["attempts"] == 1 for p in final[1]["pages"])  # queued at the kill: run once


# A page of 300 tokens finishes well within 30 s; one of 3,000 (about 3 s here, no repetition
# guard to end the looping random model early) cannot finish within 0.5 s.
@pytest.mark.parametrize("grace, finishes, tokens", [(30.0, True, 300), (0.5, False, 3000)])
def test_sigterm_lets_the_running_page_finish_within_the_grace_time(tiny_ckpt, tmp_path, grace, finishes, tokens):
    data = tmp_path / "data"
    server = _start(tiny_ckpt, data, tmp_path, "--graceful-timeout", str(grace), "--repetition-window", "0")
    job = _submit(server.url, 2, tokens)
    wait_for(lambda: any(p["status"] == "running" for p in _status(server.url, job)["pages"]), 60,
             what="a page running", interval_s=0.02)
    os.killpg(server.proc.pid, signal.SIGTERM)
    started = time.monotonic()
    assert server.proc.wait(timeout=60) == 0
    stopped_in = time.monotonic() - started
    server = _start(tiny_ckpt, data, tmp_path, "--repetition-window", "0")
    try:
        status = _wait_done(server.url, job)
    finally:
        server.stop()
    first = status["pages"][0]
    assert status["status"] == "done" and status["pages_done"] == 2
    if finishes:
        assert first["attempts"] == 1  # it finished before the server stopped
    else:
        assert first["attempts"] == 2 and stopped_in < 15  # stopped at the grace time, run again after
