"""dots-ocr-assemble: a document from per-page results that already exist (a JSON file of pages,
a client output folder), with the join switches, and its errors."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from dots_ocr_server.document.cli import main

ROOT = Path(__file__).resolve().parents[1]
PDF = ROOT / "samples" / "demo_pdf1.pdf"
W, H = 400, 500  # page pixels

CUT = [{"bbox": [20, 20, 380, 40], "category": "Page-header", "text": "Running head"},
       {"bbox": [20, 50, 380, 200], "category": "Table", "text": "<table><tr><th>k</th><th>v</th></tr>"
                                                                 "<tr><td>a</td><td>1</td></tr></table>"},
       {"bbox": [20, 300, 380, 480], "category": "Text", "text": "A paragraph that the page break"}]
GOES_ON = [{"bbox": [20, 20, 380, 40], "category": "Page-header", "text": "Running head"},
           {"bbox": [20, 50, 380, 100], "category": "Text", "text": "cuts in two."},
           {"bbox": [50, 120, 250, 320], "category": "Picture"},
           {"bbox": [50, 330, 250, 350], "category": "Caption", "text": "Figure 1."}]


def _image(color=(40, 90, 200)) -> Image.Image:
    image = Image.new("RGB", (W, H), "white")
    ImageDraw.Draw(image).rectangle([60, 130, 240, 310], fill=color)
    return image


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _pages_json(folder: Path, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _image().save(folder / "p2.png")
    data = {"source": "scan.pdf", "metadata": {"model": "dots-ocr"}, "pages": [
        {"page": 1, "width": W, "height": H, "layout": CUT},
        {"page": 2, "width": W, "height": H, "image": "p2.png", "layout": GOES_ON},
    ], **extra}
    (folder / "pages.json").write_text(json.dumps(data))
    return folder / "pages.json"


def _client_folder(folder: Path, layouts: list[list[dict]], prompt_type: str = "prompt_layout_all_en") -> Path:
    """What dots-ocr-client leaves for one input: page_NNNN/{response.json, page.png}."""
    for number, cells in enumerate(layouts, start=1):
        page = folder / f"page_{number:04d}"
        page.mkdir(parents=True)
        Image.new("RGB", (W, H), "white").save(page / "page.png")
        (page / "response.json").write_text(json.dumps({
            "model": "dots-ocr", "response": json.dumps(cells), "prompt_type": prompt_type, "page": number,
            "page_count": len(layouts), "done_reason": "stop", "layout": cells, "repaired": False}))
    return folder


def test_json_file_with_page_images(tmp_path, capsys):
    path = _pages_json(tmp_path / "in")
    assert main([str(path)]) == 0
    out = tmp_path / "in"
    assert (out / "document.md").read_text() == (
        "<table><tr><th>k</th><th>v</th></tr><tr><td>a</td><td>1</td></tr></table>\n\n"
        "A paragraph that the page break cuts in two.\n\n![Figure 1.](figures/page-2-fig-1.png)\n\nFigure 1.\n")
    data = json.loads((out / "document.json").read_text())
    assert data["source"] == "scan.pdf" and data["metadata"]["model"] == "dots-ocr"
    with Image.open(out / "figures" / "page-2-fig-1.png") as crop:
        assert crop.size == (200, 200)
        assert crop.convert("RGB").getpixel((100, 100)) == (40, 90, 200)
    assert f"{out}: document.md, document.json, 1 figure (2 pages, 6 blocks)" in capsys.readouterr().out


def test_every_switch(tmp_path):
    path = _pages_json(tmp_path / "in")
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--keep-headers", "--no-join-paragraphs", "--no-attach-captions",
                 "--no-footnotes-last", "--keep-repeated-table-headers", "--no-merge-tables", "--chunks",
                 "--chunk-chars", "10"]) == 0
    markdown = (out / "document.md").read_text()
    assert markdown.startswith("Running head\n\n<table><tr><th>k</th>")
    assert "the page break\n\nRunning head\n\ncuts in two." in markdown
    metadata = json.loads((out / "document.json").read_text())["metadata"]
    assert metadata["assembly"] == {"keep_headers": True, "join_paragraphs": False, "merge_tables": False,
                                    "drop_repeated_table_headers": False, "footnotes_last": False,
                                    "attach_captions": False}
    chunks = [json.loads(line) for line in (out / "chunks.jsonl").read_text().splitlines()]
    assert len(chunks) == 5 and all(c["headings"] == [] for c in chunks)
    # Again with the defaults: the same folder, chunks.jsonl gone.
    assert main([str(path), "--out", str(out)]) == 0
    assert "Running head" not in (out / "document.md").read_text() and not (out / "chunks.jsonl").exists()


def test_data_uri_and_pdf_page_images(tmp_path):
    folder = tmp_path / "in"
    path = _pages_json(folder)
    data = json.loads(path.read_text())
    data["pages"][1]["image"] = _data_uri(_image((0, 160, 0)))
    path.write_text(json.dumps(data))
    assert main([str(path)]) == 0
    with Image.open(folder / "figures" / "page-2-fig-1.png") as crop:
        assert crop.convert("RGB").getpixel((100, 100)) == (0, 160, 0)
    # A PDF as the image: its page of that number, rendered at the metadata's dpi.
    from image_utils import load_document

    page2 = load_document(str(PDF), "path", page=2, dpi=72).image
    data["metadata"]["dpi"] = 72
    data["pages"] = [{"page": 2, "width": page2.width, "height": page2.height, "image": str(PDF),
                      "layout": [{"bbox": [0, 0, 300, 100], "category": "Picture"}]}]
    path.write_text(json.dumps(data))
    assert main([str(path), "--out", str(tmp_path / "pdf")]) == 0
    with Image.open(tmp_path / "pdf" / "figures" / "page-2-fig-1.png") as crop:
        assert crop.convert("RGB").tobytes() == page2.crop((0, 0, 300, 100)).tobytes()


def test_client_output_folder(tmp_path, capsys):
    folder = _client_folder(tmp_path / "OUT" / "scan", [CUT, GOES_ON])
    source = tmp_path / "scan.png"

    # Figures need the page images: without them (and no earlier figures), a clear error.
    assert main([str(folder)]) == 1
    assert "no page image to crop the figures of page(s) 2 from; pass the input's image or PDF with --source" \
        in capsys.readouterr().err
    assert not (folder / "document.md").exists()

    # With --source (one image cannot be two pages) ...
    _image().save(source)
    assert main([str(folder), "--source", str(source)]) == 1
    assert "is an image, but the document has 2 pages" in capsys.readouterr().err
    shutil.rmtree(folder)
    _client_folder(folder, [GOES_ON])
    assert main([str(folder), "--source", str(source)]) == 0
    assert (folder / "figures" / "page-1-fig-1.png").is_file()
    # ... and later without it: the figures already there are kept.
    assert main([str(folder), "--keep-headers"]) == 0
    assert (folder / "document.md").read_text().startswith("Running head\n\ncuts in two.")
    assert (folder / "figures" / "page-1-fig-1.png").is_file()
    assert json.loads((folder / "document.json").read_text())["metadata"]["page_count"] == 1


def test_whole_client_output_folder(tmp_path, capsys):
    out = tmp_path / "OUT"
    _client_folder(out / "a", [CUT[:2]])
    _client_folder(out / "b", [[{"bbox": [10, 10, 100, 40], "category": "Title", "text": "B"}]])
    (out / "summary.json").write_text("{}")
    assert main([str(out), "--out", str(tmp_path / "docs")]) == 0
    assert (tmp_path / "docs" / "b" / "document.md").read_text() == "# B\n"
    assert (tmp_path / "docs" / "a" / "document.md").read_text().startswith("<table>")
    assert json.loads((tmp_path / "docs" / "b" / "document.json").read_text())["source"] == "b"
    assert main([str(out), "--source", str(PDF)]) == 1
    assert "holds 2 inputs: --source names the file of one of them" in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.json", "missing.json: no such file or folder"),
    (lambda d: (d / "x.json").write_text("{nope") and d / "x.json", "x.json: not valid JSON"),
    (lambda d: (d / "x.json").write_text('{"pages": []}') and d / "x.json", '"pages" is empty'),
    (lambda d: (d / "x.json").write_text('{"pages": [{"page": 1, "height": 9, "layout": []}]}') and d / "x.json",
     "pages[0].width must be a positive integer, got None"),
    (lambda d: (d / "x.json").write_text('{"pages": [{"page": 1, "width": 9, "height": 9, "layout": {}}]}')
     and d / "x.json", "pages[0]: layout must be a list of cells, got dict"),
    (lambda d: (d / "x.json").write_text('{"pages": [{"page": 1, "width": 9, "height": 9}]}') and d / "x.json",
     'pages[0]: no "layout"'),
    (lambda d: _client_folder(d / "ocr", [CUT], prompt_type="prompt_ocr"),
     "made with prompt_type 'prompt_ocr', which gives no layout"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "neither the client's output folder of one input"),
])
def test_bad_input_is_refused_with_a_message(tmp_path, capsys, make, message):
    assert main([str(make(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_page_not_done_and_bad_arguments(tmp_path, capsys):
    folder = _client_folder(tmp_path / "scan", [CUT[:2], CUT[:2], CUT[:2]])
    shutil.rmtree(folder / "page_0002")  # the answers say 3 pages: page 2 is missing
    assert main([str(folder)]) == 1
    assert "page 2 is not done (no page_0002/response.json); run dots-ocr-client" in capsys.readouterr().err
    (folder / "page_0001" / "response.json").unlink()
    assert main([str(folder)]) == 1
    assert "page 1 is not done (no page_0001/response.json)" in capsys.readouterr().err
    for args in (["--chunk-chars", "0"], ["--no-such-switch"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(folder), *args])
        assert exit_info.value.code == 2


@pytest.mark.slow
def test_runs_as_a_command(tmp_path):
    path = _pages_json(tmp_path / "in")
    proc = subprocess.run([sys.executable, "-m", "dots_ocr_server.document.cli", str(path),
                           "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "document.md").is_file()
    proc = subprocess.run([sys.executable, "-m", "dots_ocr_server.document.cli", str(tmp_path / "nope.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "no such file" in proc.stderr


def test_document_and_client_import_no_torch(tmp_path):
    """The client side (base install, no torch): assembling a document imports neither torch nor the
    server's libraries."""
    path = _pages_json(tmp_path / "in")
    code = ("import sys; from dots_ocr_server.document.cli import main; import dots_ocr_server.client.cli; "
            f"rc = main([{str(path)!r}]); "
            "heavy = [m for m in ('torch', 'transformers', 'flask', 'lxml') if m in sys.modules]; "
            "print(rc, heavy)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stderr
