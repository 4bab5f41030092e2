"""Document jobs in-process (Flask test client, tiny checkpoint, CPU): submission and its checks,
progress, results, cancel, retention, the storage cap, the generation slots they share with
/ocr, and their order. The real-process life and crash safety are in test_jobs_http.py."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest

from serverproc import page_png, wait_for
from server import create_app
from test_image_utils import encrypted_pdf, make_pdf

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
FAST = {"prompt_type": "prompt_ocr", "max_new_tokens": 8, "dpi": 72, "temperature": 0}


@pytest.fixture()
def make_app(runner, tmp_path):
    """Apps on the tiny runner, each with a data folder of its own; their job workers stop after."""
    made = []

    def make(**config):
        app = create_app({"data_dir": str(tmp_path / f"data{len(made)}"), **config}, runner=runner)
        made.append(app)
        return app

    yield make
    for app in made:
        jobs = app.extensions["dots_ocr"].jobs
        if jobs is not None:
            jobs.stop()


def _pdf(pages: int) -> bytes:
    return make_pdf([(612, 792)] * pages, marks=range(0, pages, 2))


def _submit(client, **body):
    return client.post("/jobs", json={**FAST, **body})


def _wait_finished(client, job_id: str, timeout: float = 60) -> dict:
    finished = {}

    def done() -> bool:
        finished.update(client.get(f"/jobs/{job_id}").get_json())
        return finished["status"] in ("done", "failed", "cancelled") and not any(
            p["status"] == "running" for p in finished["pages"])

    wait_for(done, timeout, what=f"job {job_id} to finish")
    return finished


def _jobs(client) -> list[dict]:
    return client.get("/jobs?limit=200").get_json()["jobs"]


# -- the life of a job ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_pdf_by_path_upload_and_base64_becomes_a_document(make_app, tmp_path):
    client = make_app().test_client()
    pdf = tmp_path / "three.pdf"
    pdf.write_bytes(_pdf(3))
    by_path = _submit(client, document=str(pdf), document_format="path")
    assert by_path.status_code == 202 and by_path.headers["Location"] == f"/jobs/{by_path.get_json()['job_id']}"
    first = by_path.get_json()
    assert (first["status"], first["pages_total"]) == ("queued", 3)
    assert first["links"] == {"self": f"/jobs/{first['job_id']}", "result": f"/jobs/{first['job_id']}/result",
                              "events": f"/jobs/{first['job_id']}/events"}
    uploaded = client.post("/jobs", data={"file": (io.BytesIO(_pdf(3)), "three.pdf"), "pages": "1,3",
                                          **{k: str(v) for k, v in FAST.items()}}, content_type="multipart/form-data")
    assert uploaded.status_code == 202 and uploaded.get_json()["pages_total"] == 2
    encoded = _submit(client, document=base64.b64encode(_pdf(3)).decode(), document_format="base64", pages="2-3")
    assert encoded.status_code == 202 and encoded.get_json()["pages_total"] == 2
    for answer, pages in ((first, [1, 2, 3]), (uploaded.get_json(), [1, 3]), (encoded.get_json(), [2, 3])):
        status = _wait_finished(client, answer["job_id"])
        assert status["pages_selected"] == pages and status["options"]["max_new_tokens"] == FAST["max_new_tokens"]
        assert status["options"]["prompt_type"] == FAST["prompt_type"] and status["options"]["dpi"] == FAST["dpi"]
        assert status["status"] == "done" and status["pages_done"] == len(pages) and status["pages_failed"] == 0
        assert [(p["page"], p["status"], p["attempts"]) for p in status["pages"]] == [(n, "done", 1) for n in pages]
        assert all(p["done_reason"] in ("length", "stop") for p in status["pages"])
        result = client.get(f"/jobs/{answer['job_id']}/result").get_json()
        assert [p["page"] for p in result["pages"]] == pages and result["status"] == "done"
        for page in result["pages"]:
            assert page["width"] == 612 and page["height"] == 792 and isinstance(page["answer"], str)
            assert page["statistics"]["eval_count"] >= 1
            if page["answer"].strip():  # prompt_ocr: the text is the page's Markdown
                assert page["markdown"].strip() == page["answer"].strip()
        markdown = client.get(f"/jobs/{answer['job_id']}/result?format=markdown")
        assert markdown.content_type.startswith("text/markdown")
        # the pages' texts in order (a paragraph a page break cut may be joined into one)
        flat, at = " ".join(markdown.get_data(as_text=True).split()), 0
        for page in result["pages"]:
            text = " ".join(page["answer"].split())
            at = flat.index(text, at) + len(text)
        # one page on its own, as the result holds it
        one = client.get(f"/jobs/{answer['job_id']}/pages/{pages[-1]}")
        assert one.status_code == 200
        keys = ("page", "status", "attempts", "answer", "statistics", "width", "height")
        assert {key: one.get_json()[key] for key in keys} == {key: result["pages"][-1][key] for key in keys}
        assert one.get_json()["job_id"] == answer["job_id"] and {"cells", "markdown"} <= set(one.get_json())
        missing = client.get(f"/jobs/{answer['job_id']}/pages/{pages[-1] + 7}")
        assert missing.status_code == 404 and "has no page" in missing.get_json()["error"]
    listed = _jobs(client)
    assert [j["job_id"] for j in listed] == [encoded.get_json()["job_id"], uploaded.get_json()["job_id"],
                                             first["job_id"]]  # newest first
    assert listed[1]["source"] == "three.pdf" and listed[2]["source"] == str(pdf)


def test_progress_events_then_the_end_as_ndjson_and_as_sse(make_app):
    client = make_app().test_client()
    job = _submit(client, document=base64.b64encode(_pdf(2)).decode(), document_format="base64").get_json()
    lines = [json.loads(line) for line in client.get(job["links"]["events"]).get_data(as_text=True).splitlines()]
    assert [(e["event"], e.get("page")) for e in lines] == [("page", 1), ("page", 2), ("end", None)]
    assert [e["pages_done"] for e in lines[:2]] == [1, 2] and lines[-1]["status"] == "done"
    assert lines[-1]["eta_s"] == 0.0 and lines[0]["pages_total"] == 2
    # a client that comes late gets the pages already finished first; SSE when it asks for it
    sse = client.get(job["links"]["events"], headers={"Accept": "text/event-stream"})
    assert sse.mimetype == "text/event-stream"
    events = [block for block in sse.get_data(as_text=True).split("\n\n") if block]
    assert [block.splitlines()[0] for block in events] == ["event: page", "event: page", "event: end"]
    assert json.loads(events[-1].splitlines()[1].removeprefix("data: "))["status"] == "done"


def test_a_quiet_stream_gets_status_events(make_app):
    """A job that cannot start (the only slot is taken): its events stream sends ``status`` events
    (the counts, the pages running) instead of nothing, then the pages and the end once it runs."""
    app = make_app()
    client = app.test_client()
    state = app.extensions["dots_ocr"]
    assert state.lock.acquire()
    try:
        job = _submit(client, document=base64.b64encode(_pdf(1)).decode(), document_format="base64").get_json()
        wait_for(lambda: client.get(f"/jobs/{job['job_id']}").get_json()["pages"][0]["status"] == "running",
                 what="the worker to take the page")  # it has, and waits for the slot
        events = state.jobs.events(job["job_id"], poll_s=0.05, keepalive_s=0.1)
        first = next(events)
        assert first == {"event": "status", "job_id": job["job_id"], "status": "running", "running": [1],
                         "pages_total": 1, "pages_done": 0, "pages_failed": 0, "eta_s": None}
    finally:
        state.lock.release()
    rest = [event for event in events if event["event"] != "status"]
    assert [(e["event"], e.get("page")) for e in rest] == [("page", 1), ("end", None)]


def test_the_zip_holds_the_document_and_its_figures(make_app, runner, monkeypatch):
    """A layout answer (scripted: the demo weights write noise) with a picture: the zip has
    document.md, document.json and the picture cropped when its page finished."""
    from forcing import script_answer

    page = page_png()  # 224 x 308
    model_w, model_h = runner.processor.model_input_size(224, 308)
    answer = json.dumps([{"bbox": [0, 0, model_w, model_h // 4], "category": "Title", "text": "A title"},
                         {"bbox": [0, model_h // 4, model_w // 2, model_h // 2], "category": "Picture"},
                         {"bbox": [0, model_h // 2, model_w, model_h], "category": "Text", "text": "Body text."}])
    script_answer(runner, monkeypatch, answer)
    client = make_app().test_client()
    job = _submit(client, document=base64.b64encode(page).decode(), document_format="base64",
                  prompt_type="prompt_layout_all_en").get_json()
    assert _wait_finished(client, job["job_id"])["pages_done"] == 1
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/jobs/{job['job_id']}/result?format=zip").data))
    assert sorted(archive.namelist()) == ["document.json", "document.md", "figures/page-1-fig-1.png"]
    markdown = archive.read("document.md").decode()
    assert markdown == "# A title\n\n![Picture](figures/page-1-fig-1.png)\n\nBody text.\n"
    document = json.loads(archive.read("document.json"))
    assert document["figures"][0]["file"] == "figures/page-1-fig-1.png"
    assert [c["category"] for c in document["pages"][0]["cells"]] == ["Title", "Picture", "Text"]
    from PIL import Image

    crop = Image.open(io.BytesIO(archive.read("figures/page-1-fig-1.png")))
    x1, y1, x2, y2 = document["figures"][0]["bbox"]
    assert crop.size == (x2 - x1, y2 - y1)  # cropped at the page's full resolution
    assert client.get(f"/jobs/{job['job_id']}/result?format=markdown").get_data(as_text=True) == markdown
    # with chunks=true the zip adds the document's chunks, one JSON object a line
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/jobs/{job['job_id']}/result?format=zip&chunks=true").data))
    assert "chunks.jsonl" in archive.namelist()
    chunks = [json.loads(line) for line in archive.read("chunks.jsonl").decode().splitlines()]
    assert chunks and all(chunk["pages"] == [1] for chunk in chunks)
    assert "A title" in chunks[0]["headings"] + [chunks[0]["text"]] and "Body text." in chunks[-1]["text"]


@pytest.mark.slow
def test_a_job_gives_the_same_document_as_the_client_and_the_batch_job(make_app, runner, monkeypatch):
    """The sample PDF's two pages answered with the hand-written layouts of the test data (as
    model-pixel boxes, what the model says): the job's document.md is the one the client and the
    batch job write for the same pages (tests/data/demo_pdf1.document.md; test_client_document.py
    and test_batch_job.py hold them to it)."""
    from forcing import ScriptedHandle
    from image_utils.geometry import to_model_coords

    data = Path(__file__).parent / "data"
    answers = []
    for page in json.loads((data / "demo_pdf1.pages.json").read_text(encoding="utf-8"))["pages"]:
        size = (page["width"], page["height"])
        model_size = runner.processor.model_input_size(*size)
        answers.append(json.dumps([{**cell, "bbox": to_model_coords(cell["bbox"], size, model_size)}
                                   for cell in page["layout"]], ensure_ascii=False))
    said = iter(answers)  # the job runs its pages in order, one at a time
    monkeypatch.setattr(runner, "start", lambda request, stats=None: ScriptedHandle(runner, request, stats, next(said)))
    client = make_app().test_client()
    job = _submit(client, document=base64.b64encode((SAMPLES / "demo_pdf1.pdf").read_bytes()).decode(),
                  document_format="base64", prompt_type="prompt_layout_all_en", dpi=200).get_json()
    assert _wait_finished(client, job["job_id"])["pages_done"] == 2
    markdown = client.get(f"/jobs/{job['job_id']}/result?format=markdown").get_data(as_text=True)
    assert markdown == (data / "demo_pdf1.document.md").read_text(encoding="utf-8")
    document = client.get(f"/jobs/{job['job_id']}/result").get_json()
    assert [(p["page"], p["width"], p["height"]) for p in document["pages"]] == [(1, 2339, 3308), (2, 2339, 3308)]


@pytest.mark.slow
def test_a_page_that_cannot_be_read_is_tried_again_then_failed_and_the_job_goes_on(make_app, runner):
    """On the demo weights a layout answer is noise: every page is tried twice (the second time at
    0.95 of its size), then marked failed with its reason; the job itself is done."""
    client = make_app().test_client()
    job = _submit(client, document=base64.b64encode(_pdf(2)).decode(), document_format="base64",
                  prompt_type="prompt_layout_all_en").get_json()
    status = _wait_finished(client, job["job_id"])
    assert status["status"] == "done" and status["pages_failed"] == 2 and status["pages_done"] == 0
    for page in status["pages"]:
        assert page["status"] == "failed" and page["attempts"] == 2
        assert page["error"].startswith("unparsable_layout:")
    result = client.get(f"/jobs/{job['job_id']}/result").get_json()
    assert [p["status"] for p in result["pages"]] == ["failed", "failed"]
    assert {issue["kind"] for issue in result["issues"]} == {"unparsable_layout"}
    assert all(issue["retried_at_scale"] == 0.95 for issue in result["issues"])


# -- bad documents: a 400 at once and no job ------------------------------------------------------


@pytest.mark.parametrize("name, body, status, words", [
    ("not a document", {"document": base64.b64encode(b"just some bytes").decode(), "document_format": "base64"},
     400, "decode"),
    ("encrypted", {"document": base64.b64encode(encrypted_pdf()).decode(), "document_format": "base64"},
     400, "encrypted"),
    ("corrupt", {"document": base64.b64encode(b"%PDF-1.7\n1 0 obj << >> endobj\ngarbage").decode(),
                 "document_format": "base64"}, 400, "PDF"),
    ("private URL", {"document": "http://127.0.0.1:9/doc.pdf", "document_format": "url"}, 400, "private"),
    ("missing path", {"document": "/nowhere/at/all.pdf", "document_format": "path"}, 400, ""),
    ("no document", {}, 400, "No document provided"),
    ("pages past the end", {"document": base64.b64encode(make_pdf([(612, 792)] * 2)).decode(),
                            "document_format": "base64", "pages": "2-5"}, 400, "past the document's 2 pages"),
    ("bad pages", {"document": base64.b64encode(make_pdf([(612, 792)])).decode(), "document_format": "base64",
                   "pages": "1,x"}, 400, "Invalid 'pages'"),
    ("grounding", {"document": base64.b64encode(page_png()).decode(), "document_format": "base64",
                   "prompt_type": "prompt_grounding_ocr"}, 400, "needs a box"),
    ("tiny temperature", {"document": base64.b64encode(page_png()).decode(), "document_format": "base64",
                          "temperature": 1e-6}, 400, "greedy"),
])
def test_a_bad_document_gets_a_400_and_no_job(make_app, name, body, status, words):
    client = make_app().test_client()
    response = client.post("/jobs", json={**{k: v for k, v in FAST.items() if k not in body}, **body})
    assert response.status_code == status, response.get_json()
    assert words in response.get_json()["error"]
    assert _jobs(client) == []


def test_too_many_pages_is_refused(make_app):
    client = make_app(max_pdf_pages=2).test_client()
    response = _submit(client, document=base64.b64encode(_pdf(3)).decode(), document_format="base64")
    assert response.status_code == 413 and "more than the limit of 2 pages" in response.get_json()["error"]
    assert _jobs(client) == []


def test_unknown_jobs_are_404_and_an_unfinished_result_is_409(make_app, runner):
    app = make_app()
    client = app.test_client()
    for path in ("/jobs/nope", "/jobs/nope/result", "/jobs/nope/events"):
        response = client.get(path)
        assert response.status_code == 404 and response.get_json()["error"] == "Unknown job 'nope'"
    assert client.delete("/jobs/nope").status_code == 404
    state = app.extensions["dots_ocr"]
    assert state.lock.acquire()  # the only slot taken: the job cannot run yet
    try:
        job = _submit(client, document=base64.b64encode(_pdf(1)).decode(), document_format="base64").get_json()
        early = client.get(f"/jobs/{job['job_id']}/result")
        assert early.status_code == 409 and "has not finished" in early.get_json()["error"]
    finally:
        state.lock.release()
    _wait_finished(client, job["job_id"])
    assert client.get(f"/jobs/{job['job_id']}/result").status_code == 200
    assert client.delete(f"/jobs/{job['job_id']}").status_code == 409  # finished: nothing to cancel


# -- cancel, retention, storage ---------------------------------------------------------------------


def test_cancel_stops_the_running_page_and_keeps_what_was_done(make_app, runner, monkeypatch):
    import dots_ocr_server.jobs.pages as job_pages

    original = job_pages.page_request
    monkeypatch.setattr(job_pages, "page_request", lambda *a: _ignore_eos(original(*a)))
    app = make_app()
    client = app.test_client()
    # long pages (eos ignored): the running one must be stopped, not waited for
    job = _submit(client, document=base64.b64encode(_pdf(4)).decode(), document_format="base64",
                  max_new_tokens=3000).get_json()
    state = app.extensions["dots_ocr"]
    jobs = state.jobs
    wait_for(lambda: client.get(f"/jobs/{job['job_id']}").get_json()["pages"][0]["status"] == "running",
             what="the first page running")
    started = time.monotonic()
    cancelled = client.delete(f"/jobs/{job['job_id']}")
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    status = _wait_finished(client, job["job_id"], timeout=30)
    assert time.monotonic() - started < 20  # a 3000-token page was stopped
    assert status["status"] == "cancelled"
    assert [p["status"] for p in status["pages"]] == ["cancelled"] * 4
    assert not jobs.busy and state.lock.running == 0
    result = client.get(f"/jobs/{job['job_id']}/result").get_json()
    assert result["status"] == "cancelled" and result["pages_done"] == 0
    assert not (Path(jobs.root) / "documents" / job["job_id"]).exists()  # the stored document is gone


def _ignore_eos(request):
    import dataclasses

    return dataclasses.replace(request, ignore_eos=True)


def test_finished_jobs_expire_with_their_files(make_app):
    app = make_app(job_retention="2d")
    client = app.test_client()
    job = _submit(client, document=base64.b64encode(_pdf(1)).decode(), document_format="base64").get_json()
    _wait_finished(client, job["job_id"])
    jobs = app.extensions["dots_ocr"].jobs
    assert jobs.expire(now=time.time() + 86400) == 0  # a day later: kept
    assert jobs.expire(now=time.time() + 3 * 86400) == 1  # three days later: gone
    assert client.get(f"/jobs/{job['job_id']}").status_code == 404
    assert not (jobs.root / "jobs" / job["job_id"]).exists() and not list((jobs.root / "documents").iterdir())
    assert make_app(job_retention="none").extensions["dots_ocr"].jobs.retention_s is None


def test_a_job_that_would_pass_the_storage_cap_is_refused_with_507(make_app):
    client = make_app(max_job_storage="8K").test_client()
    small = _submit(client, document=base64.b64encode(page_png()).decode(), document_format="base64")
    assert small.status_code == 202
    big = _submit(client, document=base64.b64encode(make_pdf([(612, 792)] * 40)).decode(), document_format="base64")
    assert big.status_code == 507 and "--max-job-storage" in big.get_json()["error"]
    assert len(_jobs(client)) == 1


# -- the generation slots ---------------------------------------------------------------------------


@pytest.mark.slow
def test_an_ocr_request_is_served_while_a_job_runs_at_batch_size_2(tiny_ckpt, tmp_path, make_app):
    from model_runner.runner import ModelRunner

    runner2 = ModelRunner.from_model(*_model_of(tiny_ckpt), max_batch_size=2)
    app = create_app({"data_dir": str(tmp_path / "b2"), "max_batch_size": 2}, runner=runner2)
    try:
        client = app.test_client()
        jobs = app.extensions["dots_ocr"].jobs
        assert jobs.slots == 1  # --max-batch-size - 1
        job = _submit(client, document=base64.b64encode(_pdf(6)).decode(), document_format="base64",
                      max_new_tokens=400)
        wait_for(lambda: jobs.busy, what="a job page running")
        answered = client.post("/ocr", json={"image": base64.b64encode(page_png()).decode(), "image_format": "base64",
                                             "prompt_type": "prompt_ocr", "max_new_tokens": 4})
        assert answered.status_code == 200, answered.get_json()
        assert client.get(f"/jobs/{job.get_json()['job_id']}").get_json()["status"] == "running"
    finally:
        app.extensions["dots_ocr"].jobs.stop()


def _model_of(tiny_ckpt):
    from model_runner.loading import load_checkpoint

    loaded = load_checkpoint(tiny_ckpt, "cpu", "float32")
    return loaded.model, loaded.processor


def test_at_batch_size_1_a_job_page_holds_the_slot_and_ocr_gets_429(make_app, runner, monkeypatch):
    app = make_app()
    client = app.test_client()
    import dots_ocr_server.jobs.pages as job_pages

    original = job_pages.page_request
    monkeypatch.setattr(job_pages, "page_request", lambda *a: _ignore_eos(original(*a)))
    job = _submit(client, document=base64.b64encode(_pdf(1)).decode(), document_format="base64",
                  max_new_tokens=2000).get_json()
    state = app.extensions["dots_ocr"]
    wait_for(lambda: state.lock.running == 1, what="the job page in the slot")
    busy = client.post("/ocr", json={"image": base64.b64encode(page_png()).decode(), "image_format": "base64"})
    assert busy.status_code == 429 and busy.get_json()["error"] == "Server is busy processing another request"
    client.delete(f"/jobs/{job['job_id']}")
    _wait_finished(client, job["job_id"])


@pytest.mark.slow
def test_five_jobs_from_five_clients_all_finish_in_order(make_app):
    app = make_app()
    submitted, lock = [], threading.Lock()
    barrier = threading.Barrier(5)

    def submit(index: int) -> None:
        client = app.test_client()
        barrier.wait()
        answer = _submit(client, document=base64.b64encode(_pdf(2)).decode(), document_format="base64").get_json()
        with lock:
            submitted.append(answer["job_id"])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    client = app.test_client()
    finished = [_wait_finished(client, job_id) for job_id in submitted]
    assert all(s["status"] == "done" and s["pages_done"] == 2 for s in finished)
    by_creation = sorted(finished, key=lambda s: s["created_at"])
    # one worker at --max-batch-size 1: each job starts after the one submitted before it has ended
    for earlier, later in zip(by_creation, by_creation[1:]):
        assert earlier["finished_at"] <= later["started_at"]
    assert [j["job_id"] for j in _jobs(client)] == [s["job_id"] for s in reversed(by_creation)]


# -- around it --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_jobs_in_metrics_and_in_the_openapi_document(make_app):
    from test_metrics import _scrape, _value

    client = make_app().test_client()
    job = _submit(client, document=base64.b64encode(_pdf(2)).decode(), document_format="base64").get_json()
    _wait_finished(client, job["job_id"])
    samples = _scrape(client)
    assert _value(samples, "dots_ocr:jobs", status="done") == 1
    assert _value(samples, "dots_ocr:job_pages", status="done") == 2
    assert _value(samples, "dots_ocr:job_queue_pages") == 0
    assert _value(samples, "dots_ocr:generation_tokens_total", route="/jobs") > 0
    paths = client.get("/openapi.json").get_json()["paths"]
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/result", "/jobs/{job_id}/events"} <= set(paths)
    assert {"post", "get"} <= set(paths["/jobs"]) and "delete" in paths["/jobs/{job_id}"]


def test_no_jobs_turns_the_routes_off(make_app):
    client = make_app(jobs=False).test_client()
    assert client.post("/jobs", json={"document": "x"}).status_code == 404
    assert client.get("/jobs").status_code == 404


def test_the_api_key_guards_the_job_routes(make_app):
    client = make_app(api_key="k").test_client()
    assert client.get("/jobs").status_code == 401
    assert client.get("/jobs", headers={"Authorization": "Bearer k"}).status_code == 200


def test_the_pages_selection():
    from dots_ocr_server.errors import RequestError
    from dots_ocr_server.jobs import parse_pages

    assert parse_pages(None, 3) == [1, 2, 3]
    assert parse_pages("1-3,7", 9) == [1, 2, 3, 7]
    assert parse_pages(" 2 , 2-3 ", 3) == [2, 3]
    for bad in ("0", "3-1", "a", "1-", "", "4"):
        with pytest.raises(RequestError, match="^Invalid 'pages': "):
            parse_pages(bad, 3)
    with pytest.raises(RequestError, match=r"^Invalid 'pages': page 4 is past the document's 3 pages$"):
        parse_pages("1,4", 3)


def test_sizes_and_durations_of_the_flags():
    from dots_ocr_server.api.config import parse_args, parse_duration, parse_size

    assert parse_duration("7d") == 7 * 86400 and parse_duration("90m") == 5400 and parse_duration("none") is None
    assert parse_size("20G") == 20 * 2**30 and parse_size("500M") == 500 * 2**20 and parse_size("none") is None
    config = parse_args(["--data-dir", "/srv/x", "--job-retention", "36h", "--max-job-storage", "1T",
                         "--job-slots", "3", "--job-page-retries", "2", "--no-jobs"])
    assert (config.data_dir, config.job_retention_s, config.max_job_storage_bytes) == ("/srv/x", 36 * 3600, 2**40)
    assert (config.job_slots, config.job_page_retries, config.jobs) == (3, 2, False)
    with pytest.raises(ValueError):
        parse_size("lots")
