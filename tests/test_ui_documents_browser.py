"""The Documents view of GET /ui in a real browser (ui_browser_support), against a real server on the
tiny checkpoint with document jobs (their data in a temporary folder), behind an API key: a PDF sent
as a job, its pages followed through the job's events, a page opened in the page view, the
document's Markdown and JSON downloaded, a running job cancelled, an upload the server refuses.

The tiny random model writes noise: prompt_ocr pages end done, a layout type's pages fail (no
layout in the answer). Answers stay short (max_new_tokens 8) and PDF pages small (72 dpi)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from serverproc import ROOT, running_server, wait_for
from ui_browser_support import AUTH, KEY, launched_browser, ui_page, wait_idle

pytestmark = pytest.mark.slow  # the tier of pyproject.toml's "slow" marker

PDF = ROOT / "samples" / "demo_pdf1.pdf"  # two pages


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    # No repetition guard: the cancel test needs a page that runs long (the looping random model).
    with running_server(tiny_ckpt, "--api-key", KEY, "--repetition-window", "0",
                        "--data-dir", str(tmp_path_factory.mktemp("job-data")),
                        log_dir=tmp_path_factory.mktemp("logs")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with launched_browser() as browser:
        yield browser


@pytest.fixture()
def page(browser, server, request):
    with ui_page(browser, server, request.node.name) as page:
        page.click("#view-documents")
        page.wait_for_selector("#documents-view:not([hidden])")
        yield page


def _fill_job(page, path: Path | dict, prompt_type: str, max_tokens: int, pages: str = "") -> None:
    page.set_input_files("#job-file", path if isinstance(path, dict) else str(path))
    page.select_option("#job-prompt-type", prompt_type)
    page.fill("#job-max-tokens", str(max_tokens))
    page.fill("#job-dpi", "72")
    page.fill("#job-pages-spec", pages)


def _submit(page, path: Path | dict, prompt_type: str, max_tokens: int, pages: str = "") -> str:
    """Send a job from the form; its id (from the server's 202)."""
    _fill_job(page, path, prompt_type, max_tokens, pages)
    with page.expect_response(lambda r: r.url.endswith("/jobs") and r.request.method == "POST") as answered:
        page.click("#job-submit")
    assert answered.value.status == 202, answered.value.text()
    return answered.value.json()["job_id"]


def test_a_pdf_job_from_upload_to_its_pages_and_downloads(page, server):
    events = []
    page.on("request", lambda r: events.append(r) if r.url.endswith("/events") else None)
    job_id = _submit(page, PDF, "prompt_ocr", 8)
    # the list shows the job, newest first, and follows it to its end
    row = f'#job-list li[data-job="{job_id}"]'
    page.wait_for_selector(f'{row}[data-status="done"]')
    assert page.get_attribute("#job-list li:first-child", "data-job") == job_id
    assert "2 of 2 pages done" in page.text_content(row)
    page.wait_for_selector('#job-pages li[data-page="2"][data-status="done"]')
    assert page.locator('#job-pages li[data-status="done"]').count() == 2
    assert page.text_content("#job-title") == "demo_pdf1.pdf"
    # the pages came through the job's events, read with the API key (EventSource cannot send it)
    assert [r.url for r in events] == [f"{server}/jobs/{job_id}/events"]
    assert events[0].headers["authorization"] == f"Bearer {KEY}"
    lines = [json.loads(line) for line in events[0].response().text().splitlines() if line.strip()]
    assert [(e["event"], e.get("page"), e.get("status")) for e in lines] == \
        [("page", 1, "done"), ("page", 2, "done"), ("end", None, "done")]

    # the downloads carry what the server answers for the document
    markdown = requests.get(f"{server}/jobs/{job_id}/result?format=markdown", headers=AUTH, timeout=10).text
    result = requests.get(f"{server}/jobs/{job_id}/result", headers=AUTH, timeout=10).json()
    page.wait_for_selector("#job-download-md:not(.disabled)")
    with page.expect_download() as download:
        page.click("#job-download-md")
    assert Path(download.value.path()).read_text(encoding="utf-8") == markdown
    assert download.value.suggested_filename == "demo_pdf1.md"
    with page.expect_download() as download:
        page.click("#job-download-json")
    assert json.loads(Path(download.value.path()).read_text(encoding="utf-8")) == result

    # page 2 in the page view: rendered from the file sent, at the job's dpi, with its text and box
    second = result["pages"][1]
    assert second["answer"], "the tiny model wrote nothing on page 2"
    page.click('#job-pages li[data-page="2"] button[data-open-page]')
    page.wait_for_function("document.querySelector('#status').textContent.includes('from the job')")
    assert page.is_visible("#page-view") and page.is_hidden("#documents-view")
    assert page.get_attribute("#view-page", "aria-selected") == "true"
    status = page.text_content("#status")
    assert status.startswith(f"{second['width']} × {second['height']} px, page 2 of 2"), status
    assert page.get_attribute("#page-image", "src").startswith("data:image/jpeg")
    assert page.text_content("#answer") == second["answer"]
    assert page.locator("#boxes .box[data-index]").count() == len(second["cells"]) == 1  # prompt_ocr: one text block
    shown = json.loads(page.text_content("#json"))
    assert (shown["job_id"], shown["page"], shown["response"]) == (job_id, 2, second["answer"])
    page.click("[data-tab=markdown]")
    assert page.text_content("#markdown").strip()
    assert page.errors == []


def test_the_page_view_tools_work_on_a_job_page(page, server):
    """A job page opened in the page view is asked about as the job read it: /inspect gets the
    job's answer, its page and its dpi; a box that is the whole page (prompt_ocr) is not a cell."""
    job_id = _submit(page, PDF, "prompt_ocr", 8, pages="2")
    page.wait_for_selector(f'#job-list li[data-job="{job_id}"][data-status="done"]')
    answer = requests.get(f"{server}/jobs/{job_id}/result", headers=AUTH, timeout=10).json()["pages"][0]
    assert [p["page"] for p in page_statuses(server, job_id)] == [2]
    page.click('#job-pages li[data-page="2"] button[data-open-page]')
    page.wait_for_function("document.querySelector('#status').textContent.includes('from the job')")
    # the one box covers the page: a click explains, and asks the server nothing
    inspected = []
    page.on("request", lambda r: inspected.append(r) if r.url.endswith("/inspect") else None)
    box = page.locator('#boxes .box[data-index="0"]').bounding_box()
    page.mouse.click(box["x"] + 20, box["y"] + 20)
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('This box is the whole page')")
    assert inspected == []
    # a selection of the answer: /inspect on page 2 at 72 dpi, with the job's answer
    page.click("[data-tab=answer]")
    page.evaluate("""() => {
        const node = document.querySelector('#answer').firstChild;
        const range = document.createRange();
        range.setStart(node, 0);
        range.setEnd(node, Math.min(4, node.length));
        getSelection().removeAllRanges();
        getSelection().addRange(range);
    }""")
    page.wait_for_function("document.querySelector('#inspect-target').textContent.startsWith('Selected:')")
    page.fill("#inspect-layers", "-1")
    with page.expect_response("**/inspect") as answered:
        page.click("#inspect-selection")
    sent = answered.value.request.post_data_json
    assert (sent["page"], sent["dpi"], sent["prompt_type"], sent["text"]) == (2, 72, "prompt_ocr", answer["answer"])
    assert "char_span" in sent and "cell" not in sent
    assert answered.value.status == 200, answered.value.text()
    assert answered.value.json()["grid"]["original_size"] == [answer["width"], answer["height"]]
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Attention for')")
    assert page.is_visible("#heatmap")
    assert page.errors == []


def test_after_a_reload_the_jobs_file_is_picked_again(page, server):
    """The server keeps no copy of a finished job's document, and a reload empties the tab: the
    list comes back from the server (#documents stays in the address), and opening a page asks for
    the file again, which must be the same file (its SHA-256)."""
    job_id = _submit(page, PDF, "prompt_ocr", 8, pages="1")
    page.wait_for_selector(f'#job-list li[data-job="{job_id}"][data-status="done"]')
    page.reload()  # the key stays in this tab's sessionStorage
    page.wait_for_selector(f'#job-list li[data-job="{job_id}"][data-status="done"]')
    assert page.is_visible("#documents-view") and page.is_hidden("#page-view")
    page.click(f'#job-list li[data-job="{job_id}"] button')
    page.click('#job-pages li[data-page="1"] button[data-open-page]:not([disabled])')
    page.wait_for_selector("#job-refile:not([hidden])")
    page.set_input_files("#job-refile-input", str(ROOT / "samples" / "demo_image2.png"))
    page.wait_for_selector("#error:not([hidden])")
    assert "not this job's document" in page.text_content("#error")
    page.set_input_files("#job-refile-input", str(PDF))
    page.wait_for_function("document.querySelector('#status').textContent.includes('from the job')")
    assert page.is_visible("#page-view") and page.is_hidden("#error")
    assert "page 1 of 2" in page.text_content("#status")
    assert page.errors == []


def page_statuses(server: str, job_id: str) -> list[dict]:
    return requests.get(f"{server}/jobs/{job_id}", headers=AUTH, timeout=10).json()["pages"]


def test_cancel_a_running_job(page, server):
    job_id = _submit(page, PDF, "prompt_layout_all_en", 4000)  # a long answer: the page runs until cancelled
    page.wait_for_selector('#job-pages li[data-status="running"]')
    assert page.is_visible("#job-cancel")
    page.click("#job-cancel")
    page.wait_for_selector('#job-detail[data-status="cancelled"]')
    page.wait_for_selector(f'#job-list li[data-job="{job_id}"][data-status="cancelled"]')
    assert requests.get(f"{server}/jobs/{job_id}", headers=AUTH, timeout=10).json()["status"] == "cancelled"
    # the running page stops; the result (what was done: nothing) can then be downloaded
    page.wait_for_selector("#job-download-json:not(.disabled)")
    assert page.locator('#job-pages li[data-status="running"]').count() == 0
    assert page.is_hidden("#job-cancel")
    # the stopped page is written as cancelled once its generation has left the engine
    wait_for(lambda: all(p["status"] == "cancelled" for p in page_statuses(server, job_id)), 30,
             what="every page cancelled", interval_s=0.05)
    wait_idle(server)
    assert page.errors == []


def test_a_refused_upload_shows_the_servers_error(page, server):
    before = requests.get(f"{server}/jobs?limit=200", headers=AUTH, timeout=10).json()["jobs"]
    broken = {"name": "broken.pdf", "mimeType": "application/pdf", "buffer": b"%PDF-1.4 no more than this"}
    expected = requests.post(f"{server}/jobs", headers=AUTH, timeout=10,
                             files={"file": ("broken.pdf", broken["buffer"], "application/pdf")}).json()["error"]
    _fill_job(page, broken, "prompt_ocr", 8)
    with page.expect_response(lambda r: r.url.endswith("/jobs") and r.request.method == "POST") as answered:
        page.click("#job-submit")
    assert answered.value.status == 400
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error") == f"The server refused the request: {expected}"
    assert page.text_content("#job-submit-status") == "The server did not take the job."
    # a page past the document's end: the server's message about 'pages'
    _fill_job(page, PDF, "prompt_ocr", 8, pages="1,9")
    page.click("#job-submit")
    page.wait_for_function("document.querySelector('#error').textContent.includes('page 9')")
    assert "Invalid 'pages': page 9 is past the document's 2 pages" in page.text_content("#error")
    after = requests.get(f"{server}/jobs?limit=200", headers=AUTH, timeout=10).json()["jobs"]
    assert len(after) == len(before)  # no job was made
    assert not page.is_disabled("#job-submit")  # fix the field, send again
    assert page.errors == []
