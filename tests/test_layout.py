"""Tests of the layout post-processing package (pure functions, no model)."""
from __future__ import annotations

import base64
import io
import json
import random
import string

import pytest
from PIL import Image, ImageChops

from dots_ocr_server.layout import (
    LAYOUT_CATEGORIES,
    ParseResult,
    cells_to_markdown,
    draw_layout,
    normalize_formula,
    parse_layout,
    postprocess_response,
    scale_cells,
    visualize_png_base64,
    visualize_response,
)


def cell(bbox, category="Text", text=None):
    c = {"bbox": bbox, "category": category}
    if text is not None:
        c["text"] = text
    return c


PAGE = [
    cell([10, 10, 200, 40], "Page-header", "Journal of Things"),
    cell([20, 60, 580, 100], "Title", "A Study of Layout"),
    cell([20, 110, 300, 130], "Section-header", "## 1. Introduction"),
    cell([20, 140, 580, 300], "Text", "Body text with $x^2$ inline math."),
    cell([20, 310, 580, 360], "Formula", "\\[ E = mc^2 \\]"),
    cell([20, 370, 300, 560], "Picture"),
    cell([20, 565, 300, 580], "Caption", "Figure 1: a picture."),
    cell([20, 590, 580, 700], "Table", "<table><tr><td>1</td></tr></table>"),
    cell([20, 710, 580, 730], "List-item", "- item one"),
    cell([20, 740, 580, 760], "Footnote", "1 A footnote."),
    cell([250, 780, 350, 800], "Page-footer", "3"),
]
PAGE_JSON = json.dumps(PAGE, ensure_ascii=False)


# ------------------------------------------------------------------------------------ categories

def test_categories_constant():
    assert LAYOUT_CATEGORIES == (
        "Caption", "Footnote", "Formula", "List-item", "Page-footer", "Page-header", "Picture",
        "Section-header", "Table", "Text", "Title",
    )


# ---------------------------------------------------------------------------------------- parsing

def test_valid_json():
    r = parse_layout(PAGE_JSON)
    assert isinstance(r, ParseResult)
    assert r.ok and not r.repaired and r.fallback_text is None
    assert r.cells == PAGE


def test_valid_json_with_whitespace_and_empty_list():
    r = parse_layout("\n  " + PAGE_JSON + "\n")
    assert r.ok and not r.repaired and r.cells == PAGE
    r = parse_layout("[]")
    assert r.ok and not r.repaired and r.cells == []


def test_float_bbox_becomes_int():
    r = parse_layout('[{"bbox": [1.0, 2.0, 30.0, 40.0], "category": "Text", "text": "a"}]')
    assert r.cells[0]["bbox"] == [1, 2, 30, 40] and not r.repaired
    assert all(type(v) is int for v in r.cells[0]["bbox"])
    r = parse_layout('[{"bbox": [1.4, 2.6, 30, 40], "category": "Text", "text": "a"}]')
    assert r.cells[0]["bbox"] == [1, 3, 30, 40] and r.repaired


@pytest.mark.parametrize("sep", ["", "\n", " \n  "])
def test_missing_commas(sep):
    text = "[" + sep.join(json.dumps(c) for c in PAGE[:4]) + "]"
    r = parse_layout(text)
    assert r.ok and r.repaired
    assert r.cells == PAGE[:4]


def test_truncated_mid_string():
    text = PAGE_JSON[: PAGE_JSON.index("A footnote") + 3]
    r = parse_layout(text)
    assert r.ok and r.repaired
    assert r.cells == PAGE[:9]


def test_truncated_mid_bbox():
    full = json.dumps(PAGE[:3])
    text = full[:-1] + ', {"bbox": [20, 14'
    r = parse_layout(text)
    assert r.ok and r.repaired and r.cells == PAGE[:3]


def test_truncated_after_comma_and_unclosed():
    text = json.dumps(PAGE[:2])[:-1] + ","
    r = parse_layout(text)
    assert r.ok and r.repaired and r.cells == PAGE[:2]


def test_truncated_single_cell_is_salvaged():
    text = '[{"bbox": [10, 20, 300, 400], "category": "Table", "text": "<table><tr><td>ab\\u00'
    r = parse_layout(text)
    assert r.ok and r.repaired
    assert r.cells == [{"bbox": [10, 20, 300, 400], "category": "Table",
                        "text": "<table><tr><td>ab"}]


def test_truncated_single_cell_mid_bbox_is_fallback():
    r = parse_layout('[{"bbox": [10, 20, 3')
    assert not r.ok and r.cells == [] and r.fallback_text == '[{"bbox": [10, 20, 3'


def test_loop_same_cell_30_times():
    c = cell([20, 140, 580, 300], "Text", "again and again")
    text = json.dumps(PAGE[:3] + [c] * 30)
    r = parse_layout(text)
    assert r.ok and r.repaired
    assert r.cells == PAGE[:3] + [c]


def test_loop_same_text_moving_boxes_truncated():
    loop = [cell([20, 100 + 20 * i, 580, 115 + 20 * i], "Text", "repeat") for i in range(200)]
    text = json.dumps(PAGE[:2] + loop)
    text = text[: len(text) - 30]  # cut inside the last cell
    r = parse_layout(text)
    assert r.ok and r.repaired
    assert r.cells == PAGE[:2] + [loop[0]]


def test_long_repeated_tail_text_level():
    # a long repeated tail with missing commas and a truncated end, as a looping model writes it
    unit = '{"bbox": [20, 500, 580, 520], "category": "Text", "text": "lorem ipsum"}\n'
    text = json.dumps(PAGE[:5])[:-1] + ", " + unit * 2000 + unit[:25]
    assert len(text) > 100_000
    r = parse_layout(text)
    assert r.ok and r.repaired
    assert r.cells == PAGE[:5] + [cell([20, 500, 580, 520], "Text", "lorem ipsum")]


def test_dedup_text_threshold_is_five():
    four = [cell([0, i * 10, 50, i * 10 + 5], "Text", "x") for i in range(4)]
    r = parse_layout(json.dumps(four))
    assert r.cells == four and not r.repaired
    five = [cell([0, i * 10, 50, i * 10 + 5], "Text", "x") for i in range(5)]
    r = parse_layout(json.dumps(five))
    assert r.cells == five[:1] and r.repaired


def test_layout_only_cells_not_deduplicated_by_category():
    cells = [cell([0, i * 10, 50, i * 10 + 5], "Text") for i in range(12)]
    r = parse_layout(json.dumps(cells))
    assert r.ok and not r.repaired and r.cells == cells
    assert all("text" not in c for c in r.cells)


def test_identical_bbox_keeps_first():
    cells = [cell([1, 2, 3, 4], "Text", "a"), cell([1, 2, 3, 4], "Title", "b"),
             cell([1, 2, 3, 5], "Text", "c")]
    r = parse_layout(json.dumps(cells))
    assert r.repaired and r.cells == [cells[0], cells[2]]


def test_plain_text_fallback():
    r = parse_layout("  This page says hello.\n\nSecond paragraph.  ")
    assert not r.ok and r.cells == [] and r.repaired
    assert r.fallback_text == "This page says hello.\n\nSecond paragraph."


@pytest.mark.parametrize("text", ["", "   ", "42", '"just a string"', "null", "true",
                                  '{"a": 1}', "[1, 2, 3]", '["a", "b"]', "{", "[", "]"])
def test_not_a_layout_fallback(text):
    r = parse_layout(text)
    assert not r.ok and r.cells == [] and r.fallback_text == text.strip()


def test_wrapped_dict():
    for key in ("layout", "cells", "whatever"):
        r = parse_layout(json.dumps({key: PAGE[:3], "page": 1}))
        assert r.ok and r.cells == PAGE[:3], key
    r = parse_layout(json.dumps({"result": {"layout": PAGE[:2]}}))
    assert r.ok and r.cells == PAGE[:2]
    r = parse_layout(json.dumps(PAGE[1]))  # a single cell object
    assert r.ok and r.cells == [PAGE[1]]
    r = parse_layout('{"layout": []}')
    assert r.ok and r.cells == []


def test_truncated_wrapped_dict():
    text = json.dumps({"layout": PAGE[:4]})[:-10]
    r = parse_layout(text)
    assert r.ok and r.repaired and r.cells == PAGE[:3]


def test_code_fence_and_prose_and_special_tokens():
    r = parse_layout("```json\n" + PAGE_JSON + "\n```")
    assert r.ok and r.cells == PAGE
    r = parse_layout("Here is the layout:\n" + PAGE_JSON + "\nDone.")
    assert r.ok and r.repaired and r.cells == PAGE
    r = parse_layout(PAGE_JSON + "<|endofassistant|>")
    assert r.ok and r.cells == PAGE


def test_double_encoded():
    r = parse_layout(json.dumps(PAGE_JSON))
    assert r.ok and r.repaired and r.cells == PAGE


def test_bbox_validation():
    items = [
        {"bbox": [1, 2, 3], "category": "Text", "text": "three numbers"},
        {"bbox": [1, 2, 3, 4, 5], "category": "Text", "text": "five numbers"},
        {"bbox": [1, 2], "category": "Text", "text": "two"},
        {"bbox": ["a", 2, 3, 4], "category": "Text", "text": "not numbers"},
        {"bbox": [[1, 2], [3, 4]], "category": "Text", "text": "nested"},
        {"bbox": 7, "category": "Text", "text": "scalar"},
        {"bbox": [True, 2, 3, 4], "category": "Text", "text": "bool"},
        {"category": "Title", "text": "no bbox"},
        {"bbox": [300, 400, 100, 200], "category": "Text", "text": "swapped"},
        {"bbox": [-5, -1, 10, 20], "category": "Text", "text": "negative"},
        {"bbox": ["5", "6", "70", "80"], "category": "Text", "text": "numeric strings"},
        {"text": "text only"},
        {"foo": "bar"},
        "not a dict",
        17,
        {"bbox": [1, 2, 3, 9], "category": "Text", "text": None},
        {"bbox": [1, 2, 3, 10], "category": "page-HEADER", "text": 12},
    ]
    r = parse_layout(json.dumps(items))
    assert r.ok and r.repaired
    assert r.cells == [
        {"category": "Text", "text": "three numbers"},
        {"category": "Title", "text": "no bbox"},
        {"bbox": [100, 200, 300, 400], "category": "Text", "text": "swapped"},
        {"bbox": [0, 0, 10, 20], "category": "Text", "text": "negative"},
        {"bbox": [5, 6, 70, 80], "category": "Text", "text": "numeric strings"},
        {"category": "Text", "text": "text only"},
        {"bbox": [1, 2, 3, 9], "category": "Text"},
        {"bbox": [1, 2, 3, 10], "category": "Page-header", "text": "12"},
    ]


def test_non_finite_bbox_dropped():
    r = parse_layout('[{"bbox": [NaN, 1, 2, 3], "category": "Text", "text": "a"},'
                     ' {"bbox": [0, 1, Infinity, 3], "category": "Text", "text": "b"},'
                     ' {"bbox": [0, 1, 2, 3], "category": "Text", "text": "c"}]')
    assert r.cells == [{"bbox": [0, 1, 2, 3], "category": "Text", "text": "c"}]


def test_extra_fields_are_kept():
    r = parse_layout('[{"bbox": [0, 1, 2, 3], "category": "Text", "text": "a", "score": 0.9}]')
    assert r.cells[0]["score"] == 0.9


def test_text_with_braces_and_quotes_survives_repair():
    tricky = cell([0, 0, 10, 10], "Formula", 'f(x) = \\frac{1}{2} {"a": "}{"}')
    text = json.dumps(tricky) + json.dumps(PAGE[0])  # missing comma, no brackets
    r = parse_layout(text)
    assert r.ok and r.cells == [tricky, PAGE[0]]


def _mutations(rng: random.Random):
    base = [PAGE_JSON, json.dumps({"layout": PAGE}), json.dumps(PAGE[:2])]
    alphabet = string.printable + '{}[]":,\\' * 5 + "é漢字\u0000\ud7ff"
    for i in range(400):
        s = rng.choice(base)
        kind = i % 8
        if kind == 0:  # cut anywhere
            yield s[: rng.randrange(len(s) + 1)]
        elif kind == 1:  # delete a random span
            a = rng.randrange(len(s))
            yield s[:a] + s[a + rng.randrange(1, 40):]
        elif kind == 2:  # insert random characters
            a = rng.randrange(len(s))
            yield s[:a] + "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 20))) + s[a:]
        elif kind == 3:  # replace characters
            chars = list(s)
            for _ in range(rng.randrange(1, 10)):
                chars[rng.randrange(len(chars))] = rng.choice(alphabet)
            yield "".join(chars)
        elif kind == 4:  # random garbage
            yield "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 300)))
        elif kind == 5:  # duplicated chunks
            a = rng.randrange(len(s))
            b = min(len(s), a + rng.randrange(1, 200))
            yield s[:b] + s[a:b] * rng.randrange(2, 30) + s[b:]
        elif kind == 6:  # structural junk
            yield rng.choice(["[" * 5000, "{" * 3000, '{"' * 2000, "[{" * 2000 + "}]" * 10,
                              '[{"bbox": [' + "9," * 1000, '"' * 999, "\\" * 77,
                              '{"layout": {"layout": {"layout": [' + "{}," * 50])
        else:  # drop all commas / all brackets
            yield s.replace(",", "") if rng.random() < 0.5 else s.replace("[", "").replace("]", "")


def test_never_raises_on_garbage():
    rng = random.Random(1234)
    count = 0
    for s in _mutations(rng):
        r = parse_layout(s)
        count += 1
        assert isinstance(r, ParseResult)
        if r.ok:
            assert r.fallback_text is None
            for c in r.cells:
                assert isinstance(c, dict) and isinstance(c["category"], str)
                if "bbox" in c:
                    b = c["bbox"]
                    assert len(b) == 4 and all(type(v) is int and v >= 0 for v in b)
                    assert b[0] <= b[2] and b[1] <= b[3]
                if "text" in c:
                    assert isinstance(c["text"], str)
            out = postprocess_response(s, prompt_type="prompt_layout_all_en",
                                       model_size=(616, 812), original_size=(1000, 1300))
            assert set(out) == {"layout", "markdown", "repaired"}
        else:
            assert r.cells == [] and isinstance(r.fallback_text, str)
    assert count >= 400


@pytest.mark.parametrize("value", [None, b'[{"bbox": [1, 2, 3, 4], "category": "Text"}]',
                                   12, ["x"], object()])
def test_non_string_input(value):
    r = parse_layout(value)
    assert isinstance(r, ParseResult)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["random", "starts", "nested_objects", "nested_cells", "keys"])
def test_large_garbage_is_fast(kind):
    import time
    rng = random.Random(7)
    s = {
        "random": "".join(rng.choice('{"[],: ab') for _ in range(200_000)),
        "starts": '{"' * 100_000,
        "nested_objects": '{"a":' * 40_000,
        "nested_cells": '{"bbox":' * 25_000,
        "keys": '{"a": 1, ' * 25_000,
    }[kind]
    t0 = time.perf_counter()
    r = parse_layout(s)
    assert time.perf_counter() - t0 < 5
    assert not r.ok


# --------------------------------------------------------------------------- coordinate mapping

@pytest.mark.parametrize("model_size,orig", [
    ((1008, 1316), (1654, 2339)),   # A4 at 200 dpi, smart-resized
    ((616, 812), (600, 800)),       # slight up-scaling
    ((3360, 3360), (5000, 5000)),   # big square page, down-scaled
    ((112, 2912), (100, 2600)),     # very tall strip
    ((3332, 56), (5000, 80)),       # very wide strip
    ((56, 56), (20, 30)),           # tiny image up-scaled
])
def test_scale_cells_sizes(model_size, orig):
    w_in, h_in = model_size
    w_o, h_o = orig
    cells = [
        cell([0, 0, w_in, h_in], "Picture"),                      # the whole page
        cell([w_in // 4, h_in // 4, w_in // 2, h_in // 2], "Text", "t"),
        cell([w_in - 1, h_in - 1, w_in + 500, h_in + 500]),      # beyond the page
        {"category": "Title", "text": "no box"},
    ]
    out = scale_cells(cells, model_size, orig)
    assert out[0]["bbox"] == [0, 0, w_o, h_o]
    x1, y1, x2, y2 = out[1]["bbox"]
    assert abs(x1 - (w_in // 4) * w_o / w_in) <= 0.5 and abs(y2 - (h_in // 2) * h_o / h_in) <= 0.5
    assert abs(x2 - (w_in // 2) * w_o / w_in) <= 0.5 and abs(y1 - (h_in // 4) * h_o / h_in) <= 0.5
    for c in out[:3]:
        bx1, by1, bx2, by2 = c["bbox"]
        assert 0 <= bx1 <= bx2 <= w_o and 0 <= by1 <= by2 <= h_o
        assert all(type(v) is int for v in c["bbox"])
    assert out[2]["bbox"][2:] == [w_o, h_o]
    assert out[3] == {"category": "Title", "text": "no box"}
    assert cells[0]["bbox"] == [0, 0, w_in, h_in]  # input untouched


def test_cells_use_the_one_box_mapping():
    """The same mapping as a client's box takes back from the model's pixels (the ceiling of the
    exact scale), whatever the caller: server, batch job, client."""
    from image_utils import to_original_coords

    for box, model, orig in (([1, 1, 3, 5], (4, 8), (6, 12)), ([7, 13, 640, 470], (644, 476), (1000, 740)),
                             ([10, 20, 30, 40], (100, 100), (100, 100))):
        assert scale_cells([cell(box)], model, orig)[0]["bbox"] == to_original_coords(box, model, orig)
    assert scale_cells([cell([1, 1, 3, 5])], (4, 8), (6, 12))[0]["bbox"] == [2, 2, 5, 8]  # 1.5 -> 2, 4.5 -> 5, 7.5 -> 8


def test_scale_cells_orders_and_clamps():
    out = scale_cells([cell([1, 2, 300, 400])], (100, 100), (1000, 1000))
    assert out[0]["bbox"] == [10, 20, 1000, 1000]
    out = scale_cells([cell([30, 40, 20, 10])], (100, 100), (100, 100))
    assert out[0]["bbox"] == [20, 10, 30, 40]


def test_scale_cells_bad_sizes():
    with pytest.raises(ValueError):
        scale_cells([], (0, 10), (10, 10))
    with pytest.raises(ValueError):
        scale_cells([], (10, 10), (10,))


# ------------------------------------------------------------------------------------- markdown

def test_markdown_all_categories():
    md = cells_to_markdown(PAGE)
    assert md == (
        "Journal of Things\n\n"
        "A Study of Layout\n\n"
        "## 1. Introduction\n\n"
        "Body text with $x^2$ inline math.\n\n"
        "$$\nE = mc^2\n$$\n\n"
        "![Picture](picture_5.png)\n\n"
        "Figure 1: a picture.\n\n"
        "<table><tr><td>1</td></tr></table>\n\n"
        "- item one\n\n"
        "1 A footnote.\n\n"
        "3"
    )


def test_markdown_skip_headers_footers():
    md = cells_to_markdown(PAGE, skip_headers_footers=True)
    assert "Journal of Things" not in md and not md.endswith("\n\n3")
    assert md.startswith("A Study of Layout")


def test_markdown_trims_and_backtick_math():
    cells = [cell([0, 0, 1, 1], "Text", "  padded  \n"), cell([0, 0, 1, 2], "Text", "`$a+b$`"),
             cell([0, 0, 1, 3], "Text", "   ")]
    assert cells_to_markdown(cells) == "padded\n\n$a+b$"


@pytest.mark.parametrize("text,expected", [
    ("\\[ a^2 + b^2 = c^2 \\]", "$$\na^2 + b^2 = c^2\n$$"),
    ("$$a^2$$", "$$\na^2\n$$"),
    ("$$\n\\frac{1}{2}\n$$", "$$\n\\frac{1}{2}\n$$"),
    ("\\frac{a}{b}", "$$\n\\frac{a}{b}\n$$"),
    ("`\\sum_i x_i`", "$$\n\\sum_i x_i\n$$"),
    ("```latex\n\\int_0^1 f\n```", "$$\n\\int_0^1 f\n$$"),
    ("\\documentclass{article}\n\\usepackage{amsmath}\n\\begin{document}\nx_1 + x_2\n"
     "\\end{document}", "$$\nx_1 + x_2\n$$"),
    ("where $x$ is the input", "where $x$ is the input"),
    ("Let \\[x=1\\] hold", "Let \\[x=1\\] hold"),
    ("plain words only", "plain words only"),
    ("$$a$ b$$", "$$a$ b$$"),
    ("   ", ""),
])
def test_formula_variants(text, expected):
    assert normalize_formula(text) == expected
    md = cells_to_markdown([cell([0, 0, 5, 5], "Formula", text)])
    assert md == expected


def test_markdown_layout_only_cells():
    cells = [cell([0, 0, 10, 10], "Title"), cell([0, 20, 10, 30], "Picture"),
             cell([0, 40, 10, 50], "Text")]
    assert cells_to_markdown(cells) == "![Picture](picture_1.png)"


def test_markdown_picture_ref_callable_and_text():
    cells = [cell([0, 0, 10, 10], "Text", "a"), cell([0, 20, 10, 30], "Picture", "chart label")]
    md = cells_to_markdown(cells, picture_ref=lambda i, c: f"/img/{i}-{c['bbox'][1]}.png")
    assert md == "a\n\n![Picture](/img/1-20.png)\n\nchart label"


def _png_from_data_uri(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_markdown_picture_embed():
    img = Image.new("RGB", (200, 100), "white")
    img.paste((255, 0, 0), (50, 20, 150, 80))
    cells = [cell([50, 20, 150, 80], "Picture"), cell([0, 0, 0, 0], "Picture"),
             {"category": "Picture"}]
    md = cells_to_markdown(cells, img, picture_mode="embed")
    blocks = md.split("\n\n")
    assert blocks[0].startswith("![Picture](data:image/png;base64,")
    crop = _png_from_data_uri(blocks[0][len("![Picture]("):-1])
    assert crop.size == (100, 60)
    assert crop.convert("RGB").getpixel((50, 30)) == (255, 0, 0)
    assert blocks[1:] == ["![Picture](picture_1.png)", "![Picture](picture_2.png)"]
    # embed without an image falls back to references
    assert cells_to_markdown(cells[:1], None, picture_mode="embed") == "![Picture](picture_0.png)"
    with pytest.raises(ValueError):
        cells_to_markdown(cells, picture_mode="inline")


def test_markdown_ignores_junk_cells():
    assert cells_to_markdown([None, 3, {"text": "x"}, {"category": "Text", "text": 5}]) == "x\n\n5"


# -------------------------------------------------------------------------------------- drawing

def _page(w, h):
    img = Image.new("RGB", (w, h), (250, 250, 250))
    return img


@pytest.mark.parametrize("size", [(100, 140), (1654, 2339), (5000, 3000), (120, 4000)])
def test_draw_layout(size):
    w, h = size
    img = _page(w, h)
    before = img.tobytes()
    box = [w // 4, h // 3, w // 2, h // 2]
    cells = [cell(box, "Text", "x"), cell([0, 0, w, h // 10], "Page-header"),
             cell([w - 5, h - 5, w + 100, h + 100], "Unknown-cat"), {"category": "Title"}]
    out = draw_layout(img, cells)
    assert out.size == img.size and out.mode == "RGB"
    assert img.tobytes() == before  # input untouched
    # inside the box the fill changed the pixels
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    assert out.getpixel((cx, cy)) != img.getpixel((cx, cy))
    # far from every box (bottom-left area, below the Text box) nothing changed
    far = (0, h // 2 + max(2, h // 20), w // 5, h - max(10, h // 10))
    if far[3] > far[1]:
        diff = ImageChops.difference(out.crop(far), img.crop(far)).getbbox()
        assert diff is None


def test_draw_layout_changes_stay_near_boxes():
    w, h = 800, 1000
    img = _page(w, h)
    box = [300, 400, 500, 600]
    out = draw_layout(img, [cell(box, "Formula")])
    diff = ImageChops.difference(out, img).getbbox()
    assert diff is not None
    x1, y1, x2, y2 = diff
    assert x1 >= box[0] - 2 and x2 <= box[2] + 200 and y2 <= box[3] + 2
    assert y1 >= box[1] - 60  # the label sits right above the box
    assert y1 < box[1]  # ...and is there
    out2 = draw_layout(img, [cell(box, "Formula")], show_labels=False)
    assert ImageChops.difference(out2, img).getbbox() == (box[0], box[1], box[2] + 1, box[3] + 1)


def test_draw_label_inside_page_for_top_box():
    img = _page(300, 300)
    out = draw_layout(img, [cell([250, 0, 300, 40], "Section-header")])
    assert out.size == (300, 300)
    # the label is moved inside the page: something changed in the top-left part of the box area
    assert ImageChops.difference(out, img).getbbox()[0] < 250


def test_draw_rgba_and_grayscale_inputs():
    rgba = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    out = draw_layout(rgba, [cell([10, 10, 50, 50], "Text")], show_labels=False)
    assert out.mode == "RGB" and out.getpixel((150, 150)) == (255, 255, 255)
    gray = Image.new("L", (200, 200), 200)
    out = draw_layout(gray, [cell([10, 10, 50, 50], "Table")])
    assert out.mode == "RGB" and gray.mode == "L"


def test_visualize_png_base64():
    img = _page(300, 400)
    s = visualize_png_base64(img, [cell([10, 10, 100, 100], "Picture")])
    dec = Image.open(io.BytesIO(base64.b64decode(s)))
    assert dec.format == "PNG" and dec.size == (300, 400)


# ------------------------------------------------------------------------------- postprocessing

def test_postprocess_layout_all():
    model_size, orig = (616, 812), (1232, 1624)  # exact factor 2
    out = postprocess_response(PAGE_JSON, prompt_type="prompt_layout_all_en",
                               model_size=model_size, original_size=orig)
    assert out["repaired"] is False
    assert out["layout"][1]["bbox"] == [40, 120, 1160, 200]
    assert out["layout"][1]["text"] == "A Study of Layout"
    assert "![Picture](picture_5.png)" in out["markdown"]
    assert out["markdown"].startswith("Journal of Things")
    out = postprocess_response(PAGE_JSON, prompt_type="prompt_layout_all_en",
                               model_size=model_size, original_size=orig,
                               skip_headers_footers=True)
    assert out["markdown"].startswith("A Study of Layout")
    assert len(out["layout"]) == len(PAGE)  # the layout keeps every cell


def test_postprocess_embeds_pictures_when_image_given():
    img = Image.new("RGB", (1232, 1624), "white")
    out = postprocess_response(PAGE_JSON, prompt_type="prompt_layout_all_en",
                               model_size=(616, 812), original_size=img.size, image=img)
    assert "![Picture](data:image/png;base64," in out["markdown"]
    out = postprocess_response(PAGE_JSON, prompt_type="prompt_layout_all_en",
                               model_size=(616, 812), original_size=img.size, image=img,
                               picture_mode="ref")
    assert "![Picture](picture_5.png)" in out["markdown"]


def test_postprocess_layout_only_and_repaired():
    cells = [cell([0, 0, 100, 50], "Title"), cell([0, 60, 100, 200], "Picture")]
    text = json.dumps(cells)[:-1] + ', {"bbox": [0, 2'
    out = postprocess_response(text, prompt_type="prompt_layout_only_en",
                               model_size=(100, 200), original_size=(50, 100))
    assert out == {"layout": [cell([0, 0, 50, 25], "Title"), cell([0, 30, 50, 100], "Picture")],
                   "markdown": "![Picture](picture_1.png)", "repaired": True}


def test_postprocess_fallback_and_other_prompts():
    out = postprocess_response("  Just text.  ", prompt_type="prompt_layout_all_en",
                               model_size=(100, 100), original_size=(100, 100))
    assert out == {"layout": [], "markdown": "Just text.", "repaired": True}
    out = postprocess_response("Inside the box", prompt_type="prompt_grounding_ocr",
                               model_size=(100, 100), original_size=(100, 100))
    assert out == {"layout": [], "markdown": "Inside the box", "repaired": False}
    out = postprocess_response(" # OCR text ", prompt_type="prompt_ocr",
                               model_size=(100, 100), original_size=(100, 100))
    assert out == {"layout": [], "markdown": "# OCR text", "repaired": False}


def test_postprocess_web_parsing_is_a_layout():
    """prompt_web_parsing answers layout JSON: the same post-processing as prompt_layout_all_en."""
    kwargs = dict(model_size=(616, 812), original_size=(1232, 1624))
    web = postprocess_response(PAGE_JSON, prompt_type="prompt_web_parsing", **kwargs)
    assert web == postprocess_response(PAGE_JSON, prompt_type="prompt_layout_all_en", **kwargs)
    assert web["layout"][1]["bbox"] == [40, 120, 1160, 200] and web["repaired"] is False
    cut = postprocess_response(PAGE_JSON[:300], prompt_type="prompt_web_parsing", **kwargs)
    assert cut["repaired"] is True and cut["layout"]


def test_postprocess_general_passes_through():
    out = postprocess_response(" The sign says STOP. ", prompt_type="prompt_general",
                               model_size=(100, 100), original_size=(100, 100))
    assert out == {"layout": [], "markdown": "The sign says STOP.", "repaired": False}


@pytest.mark.parametrize("prompt_type", ["prompt_layout_all_en", "prompt_web_parsing", "prompt_grounding_ocr"])
def test_visualize_response_draws_the_layout(prompt_type):
    img = _page(300, 400)
    processed = postprocess_response(json.dumps([cell([10, 10, 100, 100], "Picture")]), prompt_type=prompt_type,
                                     model_size=(300, 400), original_size=img.size)
    out = visualize_response(processed, prompt_type=prompt_type, image=img)
    assert out == {"visualization": visualize_png_base64(img, processed["layout"])}


def test_visualize_response_plain_page_for_other_types():
    img = _page(120, 80)
    out = visualize_response({"layout": [], "markdown": "x", "repaired": False}, prompt_type="prompt_ocr", image=img)
    assert out == {"visualization": visualize_png_base64(img, [])}
