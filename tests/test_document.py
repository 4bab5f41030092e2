"""dots_ocr_server.document: the joins, the Markdown, the figures, the chunks and the files, on
hand-built page layouts (boxes in page pixels), and the README's two-page sample."""
from __future__ import annotations

import builtins
import io
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from dots_ocr_server.document import (
    AssembleOptions,
    Cell,
    MissingPageImageError,
    PageInput,
    assemble,
    chunk_document,
    document_files,
    document_zip,
    keep_after_retry,
    page_from_answer,
    read_pages_json,
    write_document,
)
from dots_ocr_server.document.tables import merge_table_html, parse_table
from dots_ocr_server.document.text import continue_paragraph

DATA = Path(__file__).resolve().parent / "data"
W, H = 1000, 1400  # page pixels of the hand-built pages


def page(number: int, *cells: tuple, width: int = W, height: int = H) -> PageInput:
    """A page from ``(category, bbox, text)`` tuples (text may be left out)."""
    return PageInput(number, width, height, tuple(Cell(c[0], c[1], c[2] if len(c) > 2 else None) for c in cells))


def table(*rows: tuple[str, ...], header: tuple[str, ...] | None = None) -> str:
    head = f"<thead><tr>{''.join(f'<th>{c}</th>' for c in header)}</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


TOP, MIDDLE, BOTTOM = (100, 100, 900, 300), (100, 400, 900, 900), (100, 1000, 900, 1250)


def blocks_of(document, category: str):
    return [b for b in document.blocks if b.category == category]


# -- paragraphs across a page break ---------------------------------------------------------------


def test_paragraph_cut_by_the_page_break_is_joined():
    document = assemble([
        page(1, ("Text", TOP, "A first paragraph."), ("Text", BOTTOM, "The results of the second study show that")),
        page(2, ("Text", TOP, "the effect is large."), ("Text", MIDDLE, "A new paragraph.")),
    ])
    texts = [b.text for b in blocks_of(document, "Text")]
    assert texts == ["A first paragraph.", "The results of the second study show that the effect is large.",
                     "A new paragraph."]
    joined = document.blocks[1]
    assert joined.id == "p1-c1" and joined.pages == [1, 2] and joined.joins == ["paragraph"]
    assert [(ref.page, ref.cell, ref.bbox) for ref in joined.sources] == [(1, 1, BOTTOM), (2, 0, TOP)]
    assert document.markdown == ("A first paragraph.\n\nThe results of the second study show that the effect is "
                                 "large.\n\nA new paragraph.\n")
    # Each page's own Markdown is the page alone, before the join.
    assert document.page_markdown == ("A first paragraph.\n\nThe results of the second study show that\n",
                                      "the effect is large.\n\nA new paragraph.\n")


def test_paragraph_that_ends_a_sentence_is_not_joined():
    document = assemble([
        page(1, ("Text", BOTTOM, "This paragraph ends here.")),
        page(2, ("Text", TOP, "and this one starts lower-case, but the sentence before was over.")),
    ])
    assert [b.pages for b in document.blocks] == [[1], [2]]
    # Nor a next page that starts a new sentence, nor with the rule switched off.
    assert continue_paragraph("no full stop", "New sentence.") is None
    assert continue_paragraph('He said "stop."', "and left") is None
    off = assemble([page(1, ("Text", BOTTOM, "cut in")), page(2, ("Text", TOP, "two"))],
                   AssembleOptions(join_paragraphs=False))
    assert len(off.blocks) == 2


def test_hyphenated_word_split_across_the_break():
    document = assemble([
        page(1, ("Text", BOTTOM, "The committee met for an inter-")),
        page(2, ("Text", TOP, "national meeting.")),
    ])
    assert [b.text for b in document.blocks] == ["The committee met for an international meeting."]
    # A capital after the hyphen keeps it (a compound); no space is added either way.
    assert continue_paragraph("written in non-", "English sources") == "written in non-English sources"
    assert continue_paragraph("a range 1-", "5") is None  # a digit before the hyphen: not a word


def test_cjk_lines_join_without_a_space():
    assert continue_paragraph("學生就學貸款銀行對保及", "學校緩繳手續截止。") == (
        "學生就學貸款銀行對保及學校緩繳手續截止。")
    assert continue_paragraph("手續截止。", "學校") is None


def test_joins_look_past_headers_footers_and_footnotes():
    document = assemble([
        page(1, ("Page-header", (100, 20, 900, 60), "Journal of Things"), ("Text", MIDDLE, "the light was"),
             ("Footnote", (100, 1280, 900, 1320), "1 A footnote."), ("Page-footer", (450, 1350, 550, 1390), "1")),
        page(2, ("Page-header", (100, 20, 900, 60), "Journal of Things"), ("Text", TOP, "bright and clear.")),
    ])
    assert [b.id for b in document.blocks] == ["p1-c0", "p1-c1", "p1-c2", "p1-c3", "p2-c0"]
    assert document.blocks[1].text == "the light was bright and clear."
    assert document.markdown == "the light was bright and clear.\n\n1 A footnote.\n"


def test_no_join_across_an_empty_page_or_a_gap_in_the_page_numbers():
    cut = ("Text", BOTTOM, "the sentence goes on")
    goes_on = ("Text", TOP, "on the page after")
    assert len(assemble([page(1, cut), page(2), page(3, goes_on)]).blocks) == 2
    assert len(assemble([page(1, cut), page(3, goes_on)]).blocks) == 2


# -- tables across a page break -------------------------------------------------------------------


def test_table_cut_by_the_page_break_is_merged_and_the_repeated_header_dropped():
    first = table(("1", "2", "3"), ("4", "5", "6"), header=("a", "b", "c"))
    second = table(("7", "8", "9"), header=("A", " b ", "c"))  # the header repeated (case and spaces aside)
    document = assemble([page(1, ("Text", TOP, "Results."), ("Table", MIDDLE, first)),
                         page(2, ("Table", TOP, second), ("Text", MIDDLE, "After the table."))])
    merged = blocks_of(document, "Table")
    assert len(merged) == 1 and merged[0].joins == ["table"] and merged[0].pages == [1, 2]
    rows = parse_table(merged[0].text).rows
    assert [row.texts() for row in rows] == [("a", "b", "c"), ("1", "2", "3"), ("4", "5", "6"), ("7", "8", "9")]
    assert [row.section for row in rows] == ["thead", "tbody", "tbody", "tbody"]
    assert merged[0].text in document.markdown and document.markdown.count("<table>") == 1

    kept = assemble([page(1, ("Table", MIDDLE, first)), page(2, ("Table", TOP, second))],
                    AssembleOptions(drop_repeated_table_headers=False))
    assert len(parse_table(kept.blocks[0].text).rows) == 5


def test_table_without_a_repeated_header_gets_all_the_rows():
    first = table(("1", "2"), header=("a", "b"))
    second = table(("3", "4"), ("5", "6"))
    merged = merge_table_html(first, second)
    assert [row.texts() for row in parse_table(merged).rows] == [("a", "b"), ("1", "2"), ("3", "4"), ("5", "6")]


def test_table_over_three_pages_is_one_table():
    parts = [table(("1", "x"), header=("n", "v")), table(("2", "y"), header=("n", "v")), table(("3", "z"))]
    document = assemble([page(1, ("Table", MIDDLE, parts[0])), page(2, ("Table", (100, 100, 900, 1300), parts[1])),
                         page(3, ("Table", TOP, parts[2]))])
    assert len(document.blocks) == 1 and document.blocks[0].pages == [1, 2, 3]
    assert [row.texts() for row in parse_table(document.blocks[0].text).rows] == [
        ("n", "v"), ("1", "x"), ("2", "y"), ("3", "z")]


def test_tables_with_different_column_counts_are_not_merged():
    document = assemble([page(1, ("Table", MIDDLE, table(("1", "2", "3")))),
                         page(2, ("Table", TOP, table(("1", "2"))))])
    assert len(blocks_of(document, "Table")) == 2
    assert assemble([page(1, ("Table", MIDDLE, table(("1", "2")))), page(2, ("Table", TOP, table(("3", "4"))))],
                    AssembleOptions(merge_tables=False)).blocks[1].pages == [2]


def test_column_count_counts_colspan_and_rowspan():
    spanned = parse_table('<table><tr><td colspan="2">a</td><td rowspan="2">b</td></tr><tr><td>c</td><td>d</td></tr>'
                          "</table>")
    assert spanned.column_count() == 3
    assert parse_table("<table><tr><td>1<td>2</tr><tr><td>3<td>4</table>").column_count() == 2  # unclosed cells
    assert parse_table("no table here") is None
    assert parse_table("<table><tr><td><table><tr><td>1</td></tr></table></td></tr></table>") is None


def test_merged_table_keeps_cell_markup():
    merged = merge_table_html(table(("x<sup>2</sup>", "a &amp; b")), table(("<br/>", "c")))
    assert "<td>x<sup>2</sup></td><td>a &amp; b</td>" in merged and "<td><br/></td>" in merged


# -- headers, footers, footnotes, captions --------------------------------------------------------


def test_headers_and_footers_left_out_of_the_markdown_kept_in_the_json():
    pages = [page(1, ("Page-header", (100, 20, 900, 60), "Running head"), ("Text", MIDDLE, "Body."),
                  ("Page-footer", (450, 1350, 550, 1390), "- 1 -"))]
    document = assemble(pages)
    assert document.markdown == "Body.\n"
    data = document.to_json()
    assert [c["category"] for c in data["pages"][0]["cells"]] == ["Page-header", "Text", "Page-footer"]
    assert [b["category"] for b in data["blocks"]] == ["Page-header", "Text", "Page-footer"]
    assert assemble(pages, AssembleOptions(keep_headers=True)).markdown == "Running head\n\nBody.\n\n- 1 -\n"


def test_footnotes_go_to_the_end_of_their_page():
    footnote = ("Footnote", (100, 1200, 900, 1250), "1 See the appendix.")
    document = assemble([page(1, ("Text", TOP, "First."), footnote, ("Text", MIDDLE, "Second."),
                              ("Page-footer", (450, 1350, 550, 1390), "1"))])
    assert [b.category for b in document.blocks] == ["Text", "Text", "Footnote", "Page-footer"]
    assert document.markdown == "First.\n\nSecond.\n\n1 See the appendix.\n"
    kept = assemble([page(1, ("Text", TOP, "First."), footnote, ("Text", MIDDLE, "Second."))],
                    AssembleOptions(footnotes_last=False))
    assert [b.category for b in kept.blocks] == ["Text", "Footnote", "Text"]


def test_captions_stay_with_their_figure_or_table():
    # The model read the figure caption before the text between: it goes right under its picture.
    document = assemble([page(
        1,
        ("Caption", (100, 60, 900, 95), "Table 1: Counts."),
        ("Table", (100, 100, 900, 300), table(("1", "2"))),
        ("Picture", (100, 400, 600, 800)),
        ("Text", (100, 900, 900, 1000), "Some text."),
        ("Caption", (100, 810, 600, 850), "Figure 1: A [bright] picture."),
    )])
    assert [b.category for b in document.blocks] == ["Caption", "Table", "Picture", "Caption", "Text"]
    caption_of = {b.id: b.caption_of for b in document.blocks if b.category == "Caption"}
    assert caption_of == {"p1-c0": "p1-c1", "p1-c4": "p1-c2"}
    assert document.figures[0].caption == "Figure 1: A [bright] picture."
    assert ("Table 1: Counts.\n\n<table>" in document.markdown
            and "![Figure 1: A \\[bright\\] picture.](figures/page-1-fig-1.png)\n\nFigure 1: A [bright] picture.\n\n"
                "Some text." in document.markdown)
    off = assemble(list(document.pages), AssembleOptions(attach_captions=False))
    assert [b.category for b in off.blocks][-2:] == ["Text", "Caption"] and off.figures[0].caption is None
    assert "![Picture](figures/page-1-fig-1.png)" in off.markdown


def test_caption_of_a_table_merged_across_pages_points_at_the_merged_table():
    document = assemble([
        page(1, ("Table", MIDDLE, table(("1", "2")))),
        page(2, ("Table", TOP, table(("3", "4"))), ("Caption", (100, 310, 900, 340), "Table 1 (end).")),
    ])
    assert [b.category for b in document.blocks] == ["Table", "Caption"]
    assert document.blocks[1].caption_of == document.blocks[0].id == "p1-c0"


# -- Markdown of the categories -------------------------------------------------------------------


def test_markdown_per_category():
    document = assemble([page(
        1,
        ("Title", (100, 50, 900, 90), "# A Title\nin two lines"),
        ("Section-header", (100, 100, 900, 130), "1. Introduction"),
        ("List-item", (100, 140, 900, 170), "• first item"),
        ("List-item", (100, 180, 900, 210), "second item\ngoes on"),
        ("List-item", (100, 220, 900, 250), "3. third"),
        ("Formula", (100, 260, 900, 300), "E = mc^2"),
        ("Text", (100, 310, 900, 340), "`$x^2$`"),
        ("Picture", (0, 350, 0, 360)),  # no area: no figure, nothing shown
    )])
    assert document.markdown == ("# A Title in two lines\n\n## 1. Introduction\n\n- first item\n- second item\n"
                                 "  goes on\n3. third\n\n$$\nE = mc^2\n$$\n\n$x^2$\n")
    assert document.figures == ()


def test_empty_page_and_page_of_only_a_picture(tmp_path):
    document = assemble([page(1), page(2, ("Picture", (50, 60, 950, 1300)))])
    assert document.page_markdown == ("", "![Picture](figures/page-2-fig-1.png)\n")
    assert document.markdown == "![Picture](figures/page-2-fig-1.png)\n"
    assert [b.id for b in document.blocks] == ["p2-c0"] and document.blocks[0].figure == "figures/page-2-fig-1.png"
    image = Image.new("RGB", (W, H), "white")
    write_document(document, tmp_path, {2: image})
    with Image.open(tmp_path / "figures" / "page-2-fig-1.png") as crop:
        assert crop.size == (900, 1240)
    assert json.loads((tmp_path / "document.json").read_text())["pages"][0] == {
        "page": 1, "width": W, "height": H, "cells": [], "markdown": ""}


# -- figures --------------------------------------------------------------------------------------


def _page_image(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).rectangle([width // 10, height // 4, width // 2, height // 2], fill=(200, 30, 30))
    return image


def test_figure_crops_are_the_box_in_page_pixels(tmp_path):
    pages = [page(1, ("Picture", (100, 350, 500, 700)), ("Picture", (900, 1300, 1200, 1500)),
                  ("Text", TOP, "text"), ("Picture", (10, 20, 30, 40)))]
    document = assemble(pages)
    assert [(f.file, f.bbox) for f in document.figures] == [
        ("figures/page-1-fig-1.png", (100, 350, 500, 700)),
        ("figures/page-1-fig-2.png", (900, 1300, 1000, 1400)),  # clamped to the page
        ("figures/page-1-fig-3.png", (10, 20, 30, 40)),
    ]
    image = _page_image(W, H)
    write_document(document, tmp_path, {1: image})
    for figure in document.figures:
        with Image.open(tmp_path / figure.file) as crop:
            assert crop.size == figure.size
            assert crop.convert("RGB").tobytes() == image.crop(figure.bbox).tobytes()
    # A page image at twice the page's resolution gives twice the pixels (its full resolution).
    files = document_files(document, {1: _page_image(2 * W, 2 * H)})
    with Image.open(io.BytesIO(files["figures/page-1-fig-1.png"])) as crop:
        assert crop.size == (800, 700)


def test_writer_replaces_stale_files_and_needs_page_images(tmp_path):
    picture = page(1, ("Picture", (100, 100, 300, 300)), ("Picture", (400, 400, 600, 600)))
    write_document(assemble([picture]), tmp_path, {1: _page_image(W, H)}, chunks=True)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["page-1-fig-1.png", "page-1-fig-2.png"]
    assert (tmp_path / "chunks.jsonl").is_file()

    # Without the page image the figure of an earlier assembly is kept; a figure that is gone is
    # removed, and so is chunks.jsonl when not asked for.
    fewer = assemble([page(1, ("Picture", (100, 100, 300, 300)), ("Text", TOP, "text"))])
    before = (tmp_path / "figures" / "page-1-fig-1.png").read_bytes()
    write_document(fewer, tmp_path, None)
    assert [p.name for p in (tmp_path / "figures").iterdir()] == ["page-1-fig-1.png"]
    assert (tmp_path / "figures" / "page-1-fig-1.png").read_bytes() == before
    assert not (tmp_path / "chunks.jsonl").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]

    with pytest.raises(MissingPageImageError, match=r"page\(s\) 1"):
        write_document(assemble([picture]), tmp_path / "new", None)
    assert not (tmp_path / "new" / "document.md").exists()
    with pytest.raises(MissingPageImageError):
        document_files(assemble([picture]), {})


def test_document_zip_holds_the_files():
    document = assemble([page(1, ("Title", TOP, "Doc"), ("Picture", MIDDLE))])
    with zipfile.ZipFile(io.BytesIO(document_zip(document, {1: _page_image(W, H)}))) as archive:
        assert sorted(archive.namelist()) == ["document.json", "document.md", "figures/page-1-fig-1.png"]
        assert archive.read("document.md").decode() == document.markdown
        assert json.loads(archive.read("document.json")) == document.to_json()


# -- the document, as data ------------------------------------------------------------------------


def test_document_json_fields():
    answer = {"layout": [{"bbox": [10, 20, 300, 60], "category": "title", "text": "Doc",
                          "confidence": {"min": 0.81, "mean": 0.93}}],
              "done_reason": "stop", "repaired": False, "response": "..."}
    document = assemble([page_from_answer(1, W, H, answer)], source="report.pdf",
                        metadata={"model": "dots-ocr", "prompt_type": "prompt_layout_all_en", "dpi": 200})
    data = json.loads(json.dumps(document.to_json()))
    assert list(data) == ["source", "pages", "blocks", "figures", "issues", "metadata"]
    assert data["pages"] == [{"page": 1, "width": W, "height": H, "markdown": "# Doc\n", "cells": [
        {"bbox": [10, 20, 300, 60], "category": "Title", "text": "Doc", "confidence": {"min": 0.81, "mean": 0.93}}]}]
    assert data["blocks"] == [{"id": "p1-c0", "category": "Title", "text": "Doc", "pages": [1],
                               "sources": [{"page": 1, "cell": 0, "bbox": [10, 20, 300, 60]}]}]
    assert data["metadata"] == {"model": "dots-ocr", "prompt_type": "prompt_layout_all_en", "dpi": 200,
                                "assembly": AssembleOptions().to_json()}
    assert data["source"] == "report.pdf" and data["issues"] == [] and data["figures"] == []


def test_pages_that_cannot_be_trusted_are_marked():
    looping = page_from_answer(2, W, H, {"layout": [], "done_reason": "repetition", "response": "[{..."})
    garbled = page_from_answer(3, W, H, {"layout": [], "repaired": True, "response": "not json",
                                         "rescaled_retry": {"scale": 0.95}})
    empty = page_from_answer(4, W, H, {"layout": [], "repaired": False, "response": "[]"})
    row = page_from_answer(5, W, H, {"layout": "[]", "finish_reason": "repetition", "response": "x"})  # batch row
    document = assemble([looping, garbled, empty, row])
    assert [issue.to_json() for issue in document.issues] == [
        {"page": 2, "kind": "repetition"},
        {"page": 3, "kind": "unparsable_layout", "retried_at_scale": 0.95},
        {"page": 5, "kind": "repetition"},
    ]


def test_the_answer_kept_after_a_rescaled_retry():
    first = {"layout": [], "done_reason": "repetition", "response": "a a a"}
    clean = {"layout": [{"bbox": [1, 2, 3, 4], "category": "Text", "text": "ok"}], "done_reason": "stop"}
    kept = keep_after_retry(first, clean, "repetition")
    assert kept["layout"] == clean["layout"] and kept["rescaled_retry"] == {
        "scale": 0.95, "problem": "repetition", "retry_problem": None, "kept": "retry"}
    still = keep_after_retry(first, {"layout": [], "repaired": True, "response": "x"}, "repetition")
    assert still["response"] == "a a a" and still["rescaled_retry"]["kept"] == "first"
    assert page_from_answer(1, W, H, still).issues[0].retried_at_scale == 0.95
    assert page_from_answer(1, W, H, kept).issues == ()


def test_assemble_is_pure_and_checks_page_numbers(monkeypatch):
    pages = [page(2, ("Text", TOP, "two")), page(1, ("Picture", MIDDLE), ("Text", TOP, "one"))]

    def no_files(*args, **kwargs):
        raise AssertionError("assemble opened a file")

    monkeypatch.setattr(builtins, "open", no_files)
    document = assemble(pages)
    monkeypatch.undo()
    assert [p.page for p in document.pages] == [1, 2] and document.to_json() == assemble(pages).to_json()
    with pytest.raises(ValueError, match=r"repeated: \[1\]"):
        assemble([page(1), page(1)])
    with pytest.raises(ValueError, match="width must be a positive integer"):
        PageInput(1, 0, 100)


# -- chunks ---------------------------------------------------------------------------------------


def test_chunks_follow_the_headings_and_keep_captions_with_figures():
    document = assemble([
        page(1, ("Page-header", (100, 20, 900, 60), "Running head"), ("Title", (100, 70, 900, 100), "Report"),
             ("Text", (100, 110, 900, 200), "Intro."),
             ("Section-header", (100, 300, 900, 340), "Methods"), ("Text", (100, 350, 900, 400), "We measured."),
             ("Picture", (100, 410, 900, 1000)), ("Caption", (100, 1010, 900, 1050), "Figure 1: Setup."),
             ("Text", (100, 1100, 900, 1300), "The setup is cut by the")),
        page(2, ("Text", TOP, "page break, in fact."),),
    ])
    chunks = chunk_document(document)
    assert [(c.headings, c.pages, c.blocks) for c in chunks] == [
        (("Report",), (1,), ("p1-c2",)),
        (("Report", "Methods"), (1, 2), ("p1-c4", "p1-c5", "p1-c6", "p1-c7")),
    ]
    assert chunks[0].text == "Intro."
    assert chunks[1].text.endswith("Figure 1: Setup.\n\nThe setup is cut by the page break, in fact.")
    assert chunks[1].boxes[-2:] == ((1, (100, 1100, 900, 1300)), (2, TOP))
    # A small limit cuts between blocks, never between a picture and its caption.
    small = chunk_document(document, max_chars=20)
    assert [c.blocks for c in small] == [("p1-c2",), ("p1-c4",), ("p1-c5", "p1-c6"), ("p1-c7",)]
    assert all("Running head" not in c.text for c in small)
    assert small[2].to_json()["boxes"][0] == {"page": 1, "bbox": [100, 410, 900, 1000]}


def test_chunks_file_is_json_lines(tmp_path):
    document = assemble([page(1, ("Section-header", TOP, "A"), ("Text", MIDDLE, "a."), ("Section-header", BOTTOM, "B"),
                              ("Text", (100, 1260, 900, 1300), "b."))])
    write_document(document, tmp_path, None, chunks=True)
    lines = (tmp_path / "chunks.jsonl").read_text().splitlines()
    assert [json.loads(line)["headings"] for line in lines] == [["A"], ["B"]]


# -- the README's sample: samples/demo_pdf1.pdf, two pages ----------------------------------------


def test_demo_pdf_document_from_hand_written_layouts():
    pages = read_pages_json(DATA / "demo_pdf1.pages.json")
    document = assemble(pages.pages, source=pages.source, metadata=pages.metadata)
    assert document.markdown == (DATA / "demo_pdf1.document.md").read_text(encoding="utf-8")
    # Two titles, twelve months, no join (no paragraph or table goes on across the break), the
    # remarks caption above the remarks table.
    lines = document.markdown.splitlines()
    assert [line for line in lines if line.startswith("# ")] == [
        "# 高雄醫學大學 108 學年度行事曆 第一學期", "# 高雄醫學大學 108 學年度行事曆 第二學期"]
    assert len([line for line in lines if line.startswith("## ")]) == 12
    assert not any(block.joins for block in document.blocks)
    remarks = next(b for b in document.blocks if b.category == "Caption")
    assert remarks.text == "備註：每月定期舉行會議名稱" and remarks.caption_of == "p2-c51"
    assert document.markdown.endswith("備註：每月定期舉行會議名稱\n\n<table><tbody><tr><td>"
                                      "1、第一個星期一中午十二時三十分"
                                      "採購委員會會議<br>2、第一、三個星期四下午三時三十分財物及勞務 50~400 萬、工程 "
                                      "50~800萬採購小組會議</td><td>3、第二個星期四下午二時行政會議<br>4、政府公布之國定"
                                      "假日與本行事曆不一致時，依政府公告為準。<br>5、附屬醫療機構教學、服務，以醫院行事曆"
                                      "為準。</td></tr></tbody></table>\n")


def test_readme_shows_that_document():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Whole documents", 1)[1]
    shown = section.split("```markdown\n", 1)[1].split("\n```", 1)[0].splitlines()
    lines = (DATA / "demo_pdf1.document.md").read_text(encoding="utf-8").splitlines()
    at = 0
    for line in shown:  # every line shown, in order; a line cut short ("…") is the start of one
        head = line.split("…", 1)[0]
        while at < len(lines) and not (lines[at] == line or ("…" in line and lines[at].startswith(head))):
            at += 1
        assert at < len(lines), f"README line not in document.md (in order): {line!r}"
        at += 1
