"""GET /ui in a real browser: headless Chromium driven by Playwright (ui_browser_support), against
a real server process on the tiny checkpoint, behind an API key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from serverproc import ROOT, running_server
from ui_browser_support import ARTIFACTS, KEY, launched_browser, ui_page, wait_idle

pytestmark = pytest.mark.slow  # the tier of pyproject.toml's "slow" marker


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    # No repetition guard: the stop test needs a long answer from the looping random model.
    with running_server(tiny_ckpt, "--api-key", KEY, "--repetition-window", "0",
                        log_dir=tmp_path_factory.mktemp("logs")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with launched_browser() as browser:
        yield browser


@pytest.fixture()
def page(browser, server, request):
    with ui_page(browser, server, request.node.name) as page:
        yield page


def _open(page, name: str) -> None:
    page.set_input_files("#file-input", str(ROOT / "samples" / name))
    page.wait_for_function("document.querySelector('#status').textContent.includes('Ready')")


def _run(page, prompt_type: str, max_tokens: int) -> None:
    page.select_option("#prompt-type", prompt_type)
    page.fill("#max-tokens", str(max_tokens))
    page.click("#run")


def _tooltip_offset(page, selector: str) -> tuple[float, float]:
    """Where the hover card sits relative to the bottom-left corner of the hovered element (CSS px)."""
    return tuple(page.evaluate("""(selector) => {
        const target = document.querySelector(selector).getBoundingClientRect();
        const card = document.querySelector('#tooltip').getBoundingClientRect();
        return [card.left - target.left, card.top - target.bottom];
    }""", selector))


def test_wrong_key_is_a_readable_error(browser, server):
    """Also: under the page's own Content-Security-Policy, its scripts and styles load and run."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.goto(server + "/ui")
    page.wait_for_selector("#key-dialog[open]")
    assert page.is_hidden("#error")  # asked for the key, not an error yet
    page.fill("#key-input", "wrong")
    page.click("#key-save")
    page.wait_for_selector("#error:not([hidden])")
    page.wait_for_selector("#key-dialog[open]")  # asked again
    assert "401" in page.text_content("#error") and "API key" in page.text_content("#error")
    assert page.evaluate("getComputedStyle(document.querySelector('header')).display") == "flex"  # style.css applied
    assert problems == []
    page.close()


def test_upload_run_and_see_the_text_stream_in(page, server):
    _open(page, "demo_image1.jpg")
    assert page.is_visible("#stage") and page.get_attribute("#page-image", "src").startswith("data:image/jpeg")
    # count the answer's text changes while it streams
    page.evaluate("""() => {
        window.answerChanges = 0;
        new MutationObserver(() => { window.answerChanges += 1; })
            .observe(document.querySelector('#answer'), {characterData: true, subtree: true, childList: true});
    }""")
    _run(page, "prompt_ocr", 24)
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Done')")
    answer = page.text_content("#answer")
    assert answer and page.evaluate("window.answerChanges") >= 2  # several pieces, not one at the end
    result = json.loads(page.text_content("#json"))
    assert result["response"] == answer and result["eval_count"] > 0
    assert page.get_attribute("#download-json", "href").startswith("blob:")
    # attention for a selected piece of the answer
    page.click("[data-tab=answer]")
    page.evaluate("""() => {
        const node = document.querySelector('#answer').firstChild;
        const range = document.createRange();
        range.setStart(node, 0);
        range.setEnd(node, Math.min(6, node.length));
        getSelection().removeAllRanges();
        getSelection().addRange(range);
    }""")
    # the page takes the selection (an asynchronous selectionchange) before focus moves to the layers field
    page.wait_for_function("document.querySelector('#inspect-target').textContent.startsWith('Selected:')")
    selected = page.evaluate("Math.min(6, document.querySelector('#answer').firstChild.length)")  # UTF-16 units
    assert page.text_content("#inspect-target").endswith(f"(characters 0–{selected})")
    page.fill("#inspect-layers", "-1")  # the last layer (keeps the test short)
    page.click("#inspect-selection")
    page.wait_for_function("/^(Attention for|Failed)/.test(document.querySelector('#status').textContent)"
                           " || !document.querySelector('#error').hidden")
    assert page.text_content("#status").startswith("Attention for"), page.text_content("#error")
    assert page.is_visible("#heatmap")
    width = page.evaluate("document.querySelector('#heatmap').width")
    assert width == 61  # demo_image1 (1700 x 2250) -> 1708 x 2240 model pixels -> 61 x 80 tokens
    assert page.errors == []


def test_pdf_page_picker(page):
    _open(page, "demo_pdf1.pdf")
    assert page.is_visible("#page-picker") and page.text_content("#page-count") == "2"
    assert "page 1 of 2" in page.text_content("#status")
    first = page.get_attribute("#page-image", "src")
    page.click("#page-next")
    page.wait_for_function("document.querySelector('#status').textContent.includes('page 2 of 2')")
    assert page.get_attribute("#page-image", "src") != first
    page.click("#page-next")  # there is no page 3: a readable message, the page stays
    page.wait_for_selector("#error:not([hidden])")
    assert "does not exist" in page.text_content("#error")
    assert page.errors == []


def test_drag_a_box_for_grounding_ocr(page, server):
    _open(page, "demo_image1.jpg")
    page.fill("#max-tokens", "12")
    stage = page.locator("#stage").bounding_box()
    page.mouse.move(stage["x"] + 40, stage["y"] + 40)
    page.mouse.down()
    page.mouse.move(stage["x"] + 200, stage["y"] + 120, steps=5)
    page.mouse.up()
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Region read')")
    title = page.text_content("#grounding li strong")
    x1, y1, x2, y2 = json.loads(title)
    assert 0 <= x1 < x2 <= 1700 and 0 <= y1 < y2 <= 2250  # original pixels
    assert page.text_content("#grounding li .grounding-text")
    assert page.locator("#boxes .box.region").count() == 1
    assert page.errors == []


def test_stop_cancels_and_frees_the_server(page, server):
    _open(page, "demo_image1.jpg")
    _run(page, "prompt_layout_only_en", 4000)
    page.wait_for_function("document.querySelector('#answer').textContent.length > 0")
    assert requests.get(server + "/health", timeout=5).json()["running"] == 1
    page.click("#stop")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Stopped')")
    wait_idle(server)
    assert page.errors == []


def test_errors_are_readable_messages(page, server):
    """A file the server cannot read (a real 400), and the server's 429 and 'Model not loaded'
    answers (replayed here with the server's exact bodies: the random model cannot be made to hold
    the only slot for a known time, and it is loaded)."""
    page.set_input_files("#file-input", files=[{"name": "page.png", "mimeType": "image/png", "buffer": b"not a png"}])
    page.wait_for_selector("#error:not([hidden])")
    assert "refused" in page.text_content("#error") and page.is_disabled("#run")
    _open(page, "demo_image1.jpg")
    answers = iter([(429, "Server is busy processing another request"), (500, "Model not loaded")])

    def replay(route):
        status, message = next(answers)
        route.fulfill(status=status, content_type="application/json", body=json.dumps({"error": message}))

    page.route("**/ocr", replay)
    for expected in ("busy with another request (429)", "model is not loaded (500)"):
        _run(page, "prompt_ocr", 8)
        page.wait_for_function("document.querySelector('#status').textContent === 'Failed.'")
        assert expected in page.text_content("#error")
        page.evaluate("document.querySelector('#status').textContent = ''")
    assert not page.is_disabled("#run")


LAYOUT_ANSWER = [
    {"bbox": [100, 100, 900, 220], "category": "Title", "text": "A <b>title</b>",
     "confidence": {"min": 0.61, "mean": 0.93}},
    {"bbox": [100, 300, 1500, 900], "category": "Text", "text": "<img src=x onerror=\"window.pwned=1\">text"},
]


def test_layout_hover_markdown_and_downloads(page, server):
    """The page's drawing of a finished layout answer. The random tiny model writes no layout, so
    /ocr's stream is answered here with a fixed one (the rest of the page talks to the server)."""
    raw = json.dumps([{k: v for k, v in cell.items() if k != "confidence"} for cell in LAYOUT_ANSWER])
    markdown = ("# A <b>title</b>\n\n<img src=x onerror=\"window.pwned=1\">text\n\n"
                "<table><tr><td onclick=\"x\">1</td></tr></table>")
    lines = [{"model": "dots-ocr", "response": raw[:20], "done": False},
             {"model": "dots-ocr", "response": raw[20:], "done": False},
             {"model": "dots-ocr", "response": "", "done": True, "layout": LAYOUT_ANSWER, "markdown": markdown,
              "repaired": False}]
    page.route("**/ocr", lambda route: route.fulfill(
        status=200, content_type="application/x-ndjson", body="".join(json.dumps(line) + "\n" for line in lines)))
    _open(page, "demo_image1.jpg")
    _run(page, "prompt_layout_all_en", 100)
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Done')")
    boxes = page.locator("#boxes .box[data-index]")
    assert boxes.count() == 2
    assert page.evaluate("getComputedStyle(document.querySelector('.box[data-index=\"0\"]')).borderTopColor") \
        == "rgb(192, 57, 43)"  # Title's colour
    boxes.nth(0).hover()
    page.wait_for_selector("#tooltip:not([hidden])")
    tooltip = page.text_content("#tooltip")
    assert "Title" in tooltip and "A <b>title</b>" in tooltip and "mean 0.930" in tooltip and "min 0.610" in tooltip
    assert _tooltip_offset(page, '.box[data-index="0"]') == pytest.approx((0, 4), abs=1)  # just below the box
    page.click("[data-tab=markdown]")
    assert page.locator("#markdown img").count() == 0 and page.evaluate("window.pwned") is None
    assert page.locator("#markdown table td").count() == 1
    assert page.get_attribute("#markdown table td", "onclick") is None
    assert page.text_content("#markdown h2") == "A <b>title</b>"  # the model's text, shown as text
    with page.expect_download() as download:
        page.click("#download-md")
    assert Path(download.value.path()).read_text() == markdown
    assert page.errors == []


CELL_ANSWER = [{"bbox": [20, 20, 400, 80], "category": "Title", "text": "A title"},
               {"bbox": [20, 120, 560, 420], "category": "Text", "text": "Some text, \"quoted\" {in braces}"}]


def test_a_cell_click_asks_the_server_for_that_cell(page, server):
    """Clicking a layout box sends /inspect the answer and the cell's index (`cell`); the server
    finds the characters that wrote it (the page computes no span of its own). The layout answer is
    replayed as above (on the small sample, 583 x 550); /inspect is the real one, teacher-forcing it."""
    from dots_ocr_server.layout import cell_spans, parse_layout

    raw = json.dumps(CELL_ANSWER)
    lines = [{"model": "dots-ocr", "response": raw, "done": False},
             {"model": "dots-ocr", "response": "", "done": True, "layout": CELL_ANSWER, "markdown": "x",
              "repaired": False}]
    page.route("**/ocr", lambda route: route.fulfill(
        status=200, content_type="application/x-ndjson", body="".join(json.dumps(line) + "\n" for line in lines)))
    _open(page, "demo_image2.png")
    _run(page, "prompt_layout_all_en", 100)
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Done')")
    page.fill("#inspect-layers", "-1")  # the last layer (keeps the test short)
    box = page.locator('#boxes .box[data-index="1"]').bounding_box()
    with page.expect_response("**/inspect") as answered:
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    sent = answered.value.request.post_data_json
    assert sent["cell"] == 1 and "char_span" not in sent and "span" not in sent
    assert sent["text"] == raw and sent["prompt_type"] == "prompt_layout_all_en"
    assert answered.value.status == 200, answered.value.text()
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Attention for cell #1')")
    assert page.is_visible("#heatmap") and page.is_visible('#boxes .box.selected[data-index="1"]')
    # the tokens traced are those that wrote cell 1's text (the server's own rule), inside its object
    text_start, text_end = cell_spans(parse_layout(raw).cells, raw)[1]
    traced = answered.value.json()["char_span"]
    assert raw.index('{"bbox": [20, 120') < traced[0] <= text_start and text_end <= traced[1] < len(raw)
    assert page.errors == []


SPOTS = [{"quad": [[100, 100], [600, 120], [590, 260], [90, 240]], "text": "SALE <b>50%</b>"},
         {"quad": [[800, 1000], [1500, 1000], [1500, 1200], [800, 1200]], "text": ""}]
# onload and <script> must not run: an SVG drawn through <img> is inert
SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 1700 2250" width="1700" height="2250" '
       'onload="window.pwned=1"><script>window.pwned=2</script><rect x="10" y="10" width="300" height="200" '
       'fill="#c0392b"/></svg>')


def _answer_with(page, prompt_type: str, final: dict) -> None:
    """Run `prompt_type` with /ocr's stream answered by `final`'s fields on the last line."""
    lines = [{"model": "dots-ocr", "response": "answer", "done": False},
             {"model": "dots-ocr", "response": "", "done": True, "repaired": False, **final}]
    page.unroute("**/ocr")
    page.route("**/ocr", lambda route: route.fulfill(
        status=200, content_type="application/x-ndjson", body="".join(json.dumps(line) + "\n" for line in lines)))
    _run(page, prompt_type, 100)
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Done')")


def test_scene_spots_and_the_svg_drawing(page, server):
    """dots.mocr's outputs on the page: scene-text quadrilaterals over the image (text on hover), and
    the SVG shown as an image (its script inert) with a download. Answers replayed, as above."""
    _open(page, "demo_image1.jpg")
    _answer_with(page, "prompt_scene_spotting", {"spots": SPOTS, "markdown": "SALE <b>50%</b>"})
    polygons = page.locator("#boxes svg.spots polygon.spot")
    assert polygons.count() == 2
    assert polygons.nth(0).get_attribute("points") == "100,100 600,120 590,260 90,240"
    assert page.get_attribute("#boxes svg.spots", "viewBox") == "0 0 1700 2250"  # original pixels
    polygons.nth(0).hover()
    page.wait_for_selector("#tooltip:not([hidden])")
    assert "Text #0" in page.text_content("#tooltip") and "SALE <b>50%</b>" in page.text_content("#tooltip")
    assert _tooltip_offset(page, "polygon.spot") == pytest.approx((0, 4), abs=1)
    assert page.is_hidden("[data-tab=drawing]") and page.is_hidden("#download-svg")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "spots.png"))

    _answer_with(page, "prompt_image_to_svg", {"svg": SVG})
    assert page.locator("#boxes svg.spots").count() == 0  # the previous answer's drawing is gone
    page.click("[data-tab=drawing]")
    page.wait_for_function("document.querySelector('#drawing img') && document.querySelector('#drawing img').complete")
    assert page.evaluate("document.querySelector('#drawing img').naturalWidth") == 1700  # the browser drew it
    assert page.evaluate("window.pwned") is None
    page.screenshot(path=str(ARTIFACTS / "svg_drawing.png"))
    with page.expect_download() as download:
        page.click("#download-svg")
    assert Path(download.value.path()).read_text() == SVG and download.value.suggested_filename == "demo_image1.svg"

    _answer_with(page, "prompt_ocr", {})  # a plain answer: no drawing tab, no SVG download
    assert page.is_hidden("[data-tab=drawing]") and page.is_hidden("#download-svg")
    assert page.errors == []
