"""Scene-text spotting answers (prompt_scene_spotting): parsing, repair, mapping to original pixels,
Markdown and drawing. Pure functions, no model."""
import base64
import io
import random
import string

import pytest
from PIL import Image, ImageChops

from image_utils import to_original_coords
from dots_ocr_server.layout import (
    SpotsResult,
    draw_spots,
    parse_spots,
    postprocess_response,
    scale_spots,
    spots_to_markdown,
    visualize_response,
)

ITEMS = [
    ([[12, 30], [220, 28], [221, 70], [13, 72]], "OPEN 24 HOURS"),
    ([[300, 40], [380, 44], [378, 90], [298, 86]], "Café"),
    ([[40, 200], [90, 200], [90, 230], [40, 230]], "Exit (B2)"),
    ([[100, 300], [400, 310], [398, 360], [98, 350]], "出口 3"),
]


def answer(items=ITEMS, sep="\n"):
    return sep.join(", ".join(f"({x}, {y})" for x, y in quad) + f" {text}" for quad, text in items)


ANSWER = answer()
EXPECTED = [{"quad": quad, "text": text} for quad, text in ITEMS]


# ------------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("sep", ["\n", " ", "\n\n", "\r\n"])
def test_clean_answer(sep):
    result = parse_spots(answer(sep=sep))
    assert result == SpotsResult(spots=EXPECTED, repaired=False, ok=True)


def test_spacing_variants_and_special_token_tail():
    text = "(12,30),(220,28),( 221 , 70 ),(13,72)   OPEN 24 HOURS <|endofassistant|>"
    assert parse_spots(text) == SpotsResult(spots=EXPECTED[:1], repaired=False, ok=True)


def test_text_with_brackets_and_points_is_kept_whole():
    text = "(1, 2), (3, 4), (5, 6), (7, 8) Call (555) 12 34 or see (10, 20) on the map"
    assert parse_spots(text).spots == [{"quad": [[1, 2], [3, 4], [5, 6], [7, 8]],
                                        "text": "Call (555) 12 34 or see (10, 20) on the map"}]


@pytest.mark.parametrize("tail", ["(5", "(5, 6", "(5, 6), (7, 8), (9", "(5, 6), (7, 8), (9, 10), (11, 12)",
                                  "(5, 6), (7, 8), (9, 10), (11, 12)  ", "(5,", "(5, 6),"])
def test_truncated_last_item_is_dropped(tail):
    result = parse_spots(ANSWER + "\n" + tail)
    assert result.spots == EXPECTED and result.repaired and result.ok


def test_every_truncation_keeps_the_items_before_the_cut():
    item_starts = [0] + [i + 1 for i, c in enumerate(ANSWER) if c == "\n"]
    for n in range(len(ANSWER) + 1):
        result = parse_spots(ANSWER[:n])
        k = len(result.spots)
        assert result.spots[:max(k - 1, 0)] == EXPECTED[:max(k - 1, 0)], n
        if k:
            last = result.spots[-1]
            assert last["quad"] == EXPECTED[k - 1]["quad"] and EXPECTED[k - 1]["text"].startswith(last["text"]), n
        if k < sum(start < n for start in item_starts):  # a started item was dropped: say so
            assert result.repaired, n
    assert parse_spots(ANSWER[:-3]).spots[-1]["text"] == "出"


def test_text_ending_in_brackets_is_not_a_cut_item():
    text = "(1, 2), (3, 4), (5, 6), (7, 8) Price (10)"
    assert parse_spots(text) == SpotsResult(spots=[{"quad": [[1, 2], [3, 4], [5, 6], [7, 8]],
                                                    "text": "Price (10)"}], repaired=False, ok=True)


def test_prose_before_items_is_repaired():
    result = parse_spots("Here are the texts:\n" + ANSWER)
    assert result.spots == EXPECTED and result.repaired


def test_item_without_text_and_repeats_are_dropped():
    empty = "(1, 1), (2, 1), (2, 2), (1, 2)\n"
    loop = "\n".join([answer(ITEMS[:1])] * 30)
    result = parse_spots(empty + loop)
    assert result.spots == EXPECTED[:1] and result.repaired


def test_odd_coordinates_are_rounded_and_clipped():
    result = parse_spots("(1.6, -3), (10, 0), (10.4, 9), (0, 9) A")
    assert result.spots == [{"quad": [[2, 0], [10, 0], [10, 9], [0, 9]], "text": "A"}]
    assert result.repaired


@pytest.mark.parametrize("text", ["No text in this image.", "(1, 2), (3, 4) half", "{}", "<svg/>"])
def test_nothing_parsable(text):
    assert parse_spots(text) == SpotsResult(spots=[], repaired=True, ok=False)


@pytest.mark.parametrize("text", ["", "   \n", None, "<|endofassistant|>"])
def test_empty_answer_is_a_clean_no_text(text):
    assert parse_spots(text) == SpotsResult(spots=[], repaired=False, ok=True)


def _mutations(rng):
    alphabet = string.printable + "(),-0123456789" * 4 + "é漢字\u0000"
    for i in range(400):
        s = ANSWER
        kind = i % 6
        if kind == 0:  # cut anywhere
            yield s[: rng.randrange(len(s) + 1)]
        elif kind == 1:  # delete a span
            a = rng.randrange(len(s))
            yield s[:a] + s[a + rng.randrange(1, 30):]
        elif kind == 2:  # insert garbage
            a = rng.randrange(len(s))
            yield s[:a] + "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 20))) + s[a:]
        elif kind == 3:  # replace characters
            chars = list(s)
            for _ in range(rng.randrange(1, 10)):
                chars[rng.randrange(len(chars))] = rng.choice(alphabet)
            yield "".join(chars)
        elif kind == 4:  # pure garbage
            yield "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 400)))
        else:  # repetition loop, then cut
            loop = s + ("\n" + answer(ITEMS[1:2])) * rng.randrange(2, 50)
            yield loop[: rng.randrange(len(s), len(loop) + 1)]


def test_corrupted_answers_never_raise():
    rng = random.Random(99)
    count = 0
    for text in _mutations(rng):
        count += 1
        result = parse_spots(text)
        assert isinstance(result, SpotsResult)
        assert result.ok == bool(result.spots) or (not text.strip() and result.ok)
        for spot in result.spots:
            assert set(spot) == {"quad", "text"} and spot["text"].strip() == spot["text"] != ""
            assert len(spot["quad"]) == 4
            assert all(len(p) == 2 and all(type(v) is int and v >= 0 for v in p) for p in spot["quad"])
        out = postprocess_response(text, prompt_type="prompt_scene_spotting",
                                   model_size=(448, 392), original_size=(900, 800))
        assert set(out) == {"spots", "markdown", "repaired"}
        assert all(0 <= x <= 900 and 0 <= y <= 800 for s in out["spots"] for x, y in s["quad"])
    assert count >= 400
    assert parse_spots(ANSWER).repaired is False


@pytest.mark.parametrize("garbage", ["(" * 100_000, "(1, " * 50_000, "(1, 2), " * 40_000, "9," * 100_000])
def test_large_garbage_is_fast(garbage):
    import time
    start = time.perf_counter()
    result = parse_spots(garbage)
    assert time.perf_counter() - start < 5
    assert isinstance(result, SpotsResult)


# ---------------------------------------------------------------------------- mapping + output

def test_quads_map_back_to_original_pixels():
    spots = [{"quad": [[0, 0], [100, 0], [100, 50], [0, 50]], "text": "A"},
             {"quad": [[10, 10], [30, 12], [29, 40], [9, 38]], "text": "B"}]
    out = scale_spots(spots, (200, 100), (400, 200))  # exact factor 2
    assert out == [{"quad": [[0, 0], [200, 0], [200, 100], [0, 100]], "text": "A"},
                   {"quad": [[20, 20], [60, 24], [58, 80], [18, 76]], "text": "B"}]
    assert spots[0]["quad"][1] == [100, 0]  # the input is not modified


def test_quads_use_the_given_mapper_and_are_clamped():
    spots = [{"quad": [[7, 7], [700, 7], [700, 500], [7, 500]], "text": "edge"}]
    out = scale_spots(spots, (644, 476), (1000, 740))
    corners = [to_original_coords([x, y, x, y], (644, 476), (1000, 740))[:2] for x, y in spots[0]["quad"]]
    assert out[0]["quad"] == corners
    assert out[0]["quad"][1] == [1000, 11] and out[0]["quad"][2] == [1000, 740]


def test_bad_quads_are_dropped_and_sizes_checked():
    spots = [{"quad": [[1, 2], [3, 4], [5, 6]], "text": "x"}, {"quad": None}, "junk",
             {"quad": [[1, 2], [3, "a"], [5, 6], [7, 8]]}, {"quad": [[1, 1], [2, 2], [3, 3], [4, 4]], "text": "ok"}]
    assert scale_spots(spots, (10, 10), (10, 10)) == [{"quad": [[1, 1], [2, 2], [3, 3], [4, 4]], "text": "ok"}]
    with pytest.raises(ValueError):
        scale_spots(spots, (0, 10), (10, 10))


def test_postprocess_scene_spotting():
    out = postprocess_response(ANSWER, prompt_type="prompt_scene_spotting",
                               model_size=(448, 392), original_size=(896, 784))
    assert out["repaired"] is False
    assert out["spots"][0] == {"quad": [[24, 60], [440, 56], [442, 140], [26, 144]], "text": "OPEN 24 HOURS"}
    assert out["markdown"] == "OPEN 24 HOURS\n\nCafé\n\nExit (B2)\n\n出口 3"
    assert spots_to_markdown(out["spots"]) == out["markdown"]


def test_postprocess_unparsable_keeps_the_text():
    out = postprocess_response("  I see no text.  ", prompt_type="prompt_scene_spotting",
                               model_size=(100, 100), original_size=(100, 100))
    assert out == {"spots": [], "markdown": "I see no text.", "repaired": True}


# ------------------------------------------------------------------------------------ drawing

def test_draw_spots_marks_the_quads_only():
    image = Image.new("RGB", (400, 300), "white")
    spots = [{"quad": [[50, 100], [200, 100], [200, 150], [50, 150]], "text": "HELLO"}]
    drawn = draw_spots(image, spots)
    assert drawn.size == image.size and image.getpixel((100, 120)) == (255, 255, 255)
    inside = drawn.getpixel((120, 125))
    assert inside != (255, 255, 255) and inside[1] > inside[0]  # green tint inside the quad
    assert drawn.getpixel((50, 125))[1] > 150 and drawn.getpixel((50, 125))[0] < 100  # outline
    bbox = ImageChops.difference(drawn, image).getbbox()
    assert bbox[0] >= 48 and bbox[2] <= 260 and bbox[3] <= 153 and bbox[1] >= 60  # label above it
    assert drawn.getpixel((300, 250)) == (255, 255, 255)


def test_draw_spots_skips_junk_and_survives_odd_images():
    image = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    drawn = draw_spots(image, [{"quad": "x"}, None, {"quad": [[0, 0], [99, 0], [99, 99], [0, 99]], "text": ""}])
    assert drawn.mode == "RGB" and drawn.size == (30, 20)


def test_visualize_response_for_spots():
    image = Image.new("RGB", (896, 784), "white")
    out = postprocess_response(ANSWER, prompt_type="prompt_scene_spotting",
                               model_size=(448, 392), original_size=image.size)
    vis = visualize_response(out, prompt_type="prompt_scene_spotting", image=image)
    assert set(vis) == {"visualization"}
    png = Image.open(io.BytesIO(base64.b64decode(vis["visualization"])))
    assert png.format == "PNG" and png.size == image.size
    assert png.convert("RGB").getpixel((200, 100)) != (255, 255, 255)
