"""layout.confidence on its own: which characters of a raw answer count for each parsed cell."""
import json
import math

from dots_ocr_server.layout import parse_layout
from dots_ocr_server.layout.confidence import add_confidence, cell_spans, raw_objects, span_confidence


def _cells(answer):
    return parse_layout(answer).cells


def test_text_value_spans_and_textless_cells():
    answer = json.dumps([{"bbox": [1, 2, 3, 4], "category": "Title", "text": "Hi \"you\""},
                         {"bbox": [5, 6, 7, 8], "category": "Picture"}])
    spans = cell_spans(_cells(answer), answer)
    start, end = spans[0]
    assert answer[start:end] == 'Hi \\"you\\"'  # the string value as written, inside its quotes
    start, end = spans[1]
    assert answer[start:end] == '{"bbox": [5, 6, 7, 8], "category": "Picture"}'


def test_repaired_answers_wrappers_and_dropped_duplicates():
    cell = '{"bbox": [%d, 0, 9, 9], "category": "Text", "text": "%s"}'
    missing_commas = "[" + cell % (0, "a") + "\n" + cell % (1, "b") + ", " + cell[:-4] % 2  # + a cut cell
    spans = cell_spans(_cells(missing_commas), missing_commas)
    assert [missing_commas[a:b] for a, b in spans] == ["a", "b"]
    cut = '[{"bbox": [2, 0, 9, 9], "category": "Text", "text": "cu'
    cells = _cells(cut)
    assert [cut[a:b] for a, b in cell_spans(cells, cut)] == [cells[0]["text"]] == ["cu"]
    wrapped = '{"layout": [' + cell % (0, "x") + ", " + cell % (0, "y") + "]}"  # y repeats x's bbox: dropped
    cells = _cells(wrapped)
    assert [c["text"] for c in cells] == ["x"]
    assert [wrapped[a:b] for a, b in cell_spans(cells, wrapped)] == ["x"]
    assert len(raw_objects(wrapped)) == 2


def test_plain_text_cell_is_found_verbatim_and_a_missing_one_is_none():
    answer = "  inside the box  "
    assert cell_spans([{"category": "Text", "text": "inside the box"}], answer) == [(2, 16)]
    assert cell_spans([{"category": "Text", "text": "elsewhere"}], answer) == [None]


def test_min_and_mean_over_overlapping_tokens_only():
    offsets = [(0, 2), (2, 5), (5, 5), (5, 9)]  # the third token (eos) has no characters
    logprobs = [math.log(0.5), math.log(0.9), math.log(0.01), math.log(0.7)]
    assert span_confidence(offsets, logprobs, (3, 6)) == {"min": 0.7, "mean": 0.8}
    assert span_confidence(offsets, logprobs, (9, 12)) is None
    cells = add_confidence([{"text": "ab"}], "xxab", [(0, 2), (2, 4)], [math.log(0.1), math.log(0.4)])
    assert cells == [{"text": "ab", "confidence": {"min": 0.4, "mean": 0.4}}]
