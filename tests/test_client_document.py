"""The client's document files (OUT/<input>/document.md, document.json, figures/, chunks.jsonl)
against the scripted fake server, the retry of a looping or unparsable page at scale 0.95, and
the same document.md from the client, from dots-ocr-assemble and from assemble() on the same
pages."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from ocr_client_support import PDF, FakeServer, layout_answer, page_image, read_summary
from PIL import Image

from dots_ocr_server.client import main
from dots_ocr_server.document import assemble, page_from_answer, read_pages_json
from dots_ocr_server.document.cli import main as assemble_main

DATA = Path(__file__).resolve().parent / "data"


def _run(fake: FakeServer, *args: str) -> int:
    return main([*args, "--server", fake.url, "--no-progress", "--retry-wait", "0.05"])


def _uploaded_size(request: dict) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(request["image"]))) as image:
        return image.size


def _picture_page(path: Path) -> Path:
    page_image(200, 260, 0).save(path)
    return path


PICTURE_CELLS = [{"bbox": [0, 0, 200, 20], "category": "Page-header", "text": "Running head"},
                 {"bbox": [10, 10, 120, 90], "category": "Picture"},
                 {"bbox": [10, 95, 120, 110], "category": "Caption", "text": "Figure 1: bars."},
                 {"bbox": [10, 120, 190, 250], "category": "Text", "text": "Some text."}]


@pytest.mark.slow
def test_three_places_give_the_same_document(tmp_path):
    pages = json.loads((DATA / "demo_pdf1.pages.json").read_text(encoding="utf-8"))["pages"]
    fake = FakeServer()
    try:
        fake.script = [layout_answer(p["layout"]) for p in pages]
        out = tmp_path / "out"
        assert _run(fake, str(PDF), "--out", str(out), "--dpi", "200") == 0
    finally:
        fake.close()
    folder = out / "demo_pdf1"
    golden = (DATA / "demo_pdf1.document.md").read_text(encoding="utf-8")
    # 1. The client, next to the page folders.
    assert sorted(p.name for p in folder.iterdir()) == ["document.json", "document.md", "page_0001", "page_0002"]
    assert (folder / "document.md").read_text(encoding="utf-8") == golden
    data = json.loads((folder / "document.json").read_text(encoding="utf-8"))
    assert [(p["page"], p["width"], p["height"]) for p in data["pages"]] == [(1, 2339, 3308), (2, 2339, 3308)]
    assert data["source"].endswith("demo_pdf1.pdf") and data["issues"] == []
    assert {k: data["metadata"][k] for k in ("model", "prompt_type", "dpi", "page_count")} == {
        "model": "dots-ocr", "prompt_type": "prompt_layout_all_en", "dpi": 200, "page_count": 2}
    assert read_summary(out)["documents"] == {"written": 1, "failed": []}
    # 2. dots-ocr-assemble on the client's folder.
    assert assemble_main([str(folder), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "document.md").read_text(encoding="utf-8") == golden
    # 3. assemble() on the same pages, as the batch job's rows (layout as JSON) and the jobs hold them.
    rows = [{"layout": json.dumps(p["layout"]), "finish_reason": "eos", "repaired": False} for p in pages]
    from_rows = assemble([page_from_answer(n, 2339, 3308, row) for n, row in enumerate(rows, start=1)])
    assert from_rows.markdown == golden
    assert assemble(read_pages_json(DATA / "demo_pdf1.pages.json").pages).markdown == golden


def test_figures_headers_and_chunks_from_the_client(tmp_path):
    image = _picture_page(tmp_path / "scan.png")
    fake = FakeServer()
    try:
        fake.script = [layout_answer(PICTURE_CELLS)]
        out = tmp_path / "out"
        assert _run(fake, str(image), "--out", str(out)) == 0
        folder = out / "scan"
        assert (folder / "document.md").read_text() == (
            "![Figure 1: bars.](figures/page-1-fig-1.png)\n\nFigure 1: bars.\n\nSome text.\n")
        with Image.open(folder / "figures" / "page-1-fig-1.png") as crop, Image.open(image) as page:
            assert crop.size == (110, 80)
            assert crop.convert("RGB").tobytes() == page.convert("RGB").crop((10, 10, 120, 90)).tobytes()
        assert not (folder / "chunks.jsonl").exists()
        assert "dpi" not in json.loads((folder / "document.json").read_text())["metadata"]  # an image: no dpi

        # Nothing left to do: no request, and the document is written again with the new switches.
        assert _run(fake, str(image), "--out", str(out), "--keep-headers", "--chunks") == 0
        assert len(fake.requests) == 1
        assert (folder / "document.md").read_text().startswith("Running head\n\n![Figure 1: bars.]")
        chunks = [json.loads(line) for line in (folder / "chunks.jsonl").read_text().splitlines()]
        assert [c["blocks"] for c in chunks] == [["p1-c1", "p1-c2", "p1-c3"]]

        # A resumed run crops again only the figures of pages it redid, or that are missing.
        figure = folder / "figures" / "page-1-fig-1.png"
        before = figure.read_bytes()
        Image.new("RGB", (200, 260), (0, 120, 0)).save(image)  # changed on disk: shows which crops are redone
        assert _run(fake, str(image), "--out", str(out)) == 0
        assert figure.read_bytes() == before
        figure.unlink()
        assert _run(fake, str(image), "--out", str(out)) == 0
        with Image.open(figure) as crop:
            assert crop.convert("RGB").getpixel((5, 5)) == (0, 120, 0)
        page_image(200, 260, 0).save(image)
        assert _run(fake, str(image), "--out", str(out), "--force") == 0  # the page redone: cropped again
        assert figure.read_bytes() == before and len(fake.requests) == 2
    finally:
        fake.close()


def test_looping_page_is_asked_again_at_scale_095(tmp_path):
    image = _picture_page(tmp_path / "scan.png")
    fake = FakeServer()
    try:
        scaled_cells = [{"bbox": [19, 19, 95, 57], "category": "Text", "text": "hello"}]  # pixels of the 0.95 image
        fake.script = [layout_answer([{"bbox": [1, 1, 9, 9], "category": "Text", "text": "a a a"}],
                                     done_reason="repetition"),
                       layout_answer(scaled_cells)]
        out = tmp_path / "out"
        assert _run(fake, str(image), "--out", str(out)) == 0
    finally:
        fake.close()
    assert [_uploaded_size(r) for r in fake.requests] == [(200, 260), (190, 247)]
    page_dir = out / "scan" / "page_0001"
    response = json.loads((page_dir / "response.json").read_text())
    assert response["rescaled_retry"] == {"scale": 0.95, "problem": "repetition", "retry_problem": None,
                                          "kept": "retry"}
    # The retry's cells are in the page's pixels, like every layout the client saves.
    assert response["layout"] == json.loads((page_dir / "layout.json").read_text()) == [
        {"bbox": [20, 20, 100, 60], "category": "Text", "text": "hello"}]
    assert json.loads((out / "scan" / "document.json").read_text())["issues"] == []
    summary = read_summary(out)
    assert summary["rescaled_retries"] == 1 and summary["page_results"][0]["retried"] is True


def test_page_still_unparsable_after_the_retry_is_marked(tmp_path, capsys):
    image = _picture_page(tmp_path / "scan.png")
    fake = FakeServer()
    try:
        fake.script = [layout_answer([], repaired=True, response="{not a layout")]
        out = tmp_path / "out"
        assert _run(fake, str(image), "--out", str(out)) == 0
        assert len(fake.requests) == 2
        assert "1 asked again at a smaller scale" in capsys.readouterr().out
        issues = json.loads((out / "scan" / "document.json").read_text())["issues"]
        assert issues == [{"page": 1, "kind": "unparsable_layout", "retried_at_scale": 0.95}]
        response = json.loads((out / "scan" / "page_0001" / "response.json").read_text())
        assert response["response"] == "{not a layout" and response["rescaled_retry"]["kept"] == "first"

        # Without the retry: one request, the page marked all the same.
        assert _run(fake, str(image), "--out", str(out), "--force", "--no-rescaled-retry") == 0
        assert len(fake.requests) == 3
        issues = json.loads((out / "scan" / "document.json").read_text())["issues"]
        assert issues == [{"page": 1, "kind": "unparsable_layout"}]
    finally:
        fake.close()


@pytest.mark.slow
def test_no_document_for_other_prompt_types_or_with_a_failed_page(tmp_path, capsys):
    image = _picture_page(tmp_path / "scan.png")
    fake = FakeServer()
    try:
        fake.script = [(200, {"model": "dots-ocr", "response": "plain text", "prompt_type": "prompt_ocr"})]
        out = tmp_path / "out"
        assert _run(fake, str(image), "--out", str(out), "--prompt-type", "prompt_ocr", "--chunks") == 0
        assert sorted(p.name for p in (out / "scan").iterdir()) == ["page_0001"]
        assert "documents" not in read_summary(out)
        assert "--chunks has no effect with prompt_ocr" in capsys.readouterr().err

        # A PDF whose second page fails: no document for it; the next run redoes that page and writes it.
        fake.requests.clear()
        fake.script = [layout_answer(PICTURE_CELLS), (500, {"error": "Internal server error: RuntimeError"})]
        out = tmp_path / "out2"
        assert _run(fake, str(PDF), "--out", str(out), "--dpi", "72") == 1
        assert not (out / "demo_pdf1" / "document.md").exists()
        assert "document of" in capsys.readouterr().err
        fake.script = [layout_answer(PICTURE_CELLS)]
        assert _run(fake, str(PDF), "--out", str(out), "--dpi", "72") == 0
        data = json.loads((out / "demo_pdf1" / "document.json").read_text())
        assert [f["file"] for f in data["figures"]] == ["figures/page-1-fig-1.png", "figures/page-2-fig-1.png"]
        assert data["metadata"]["dpi"] == 72
        assert (out / "demo_pdf1" / "figures" / "page-2-fig-1.png").is_file()
    finally:
        fake.close()
