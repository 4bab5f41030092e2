"""SVG answers (prompt_image_to_svg): extraction, repair of cut answers, rendering with resvg, and
the visualization_error of an SVG that does not render. Pure functions, no model."""
import base64
import io
import random
import string
from xml.parsers import expat

import pytest
from lxml import etree
from PIL import Image

from dots_ocr_server.layout import (
    SvgRenderError,
    SvgResult,
    extract_svg,
    postprocess_response,
    render_svg_png,
    svg_visualization,
    visualize_response,
)

SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 200 100" width="200" height="100">'
       '<rect x="0" y="0" width="100" height="100" fill="#ff0000"/>'
       '<g fill="#0000ff"><path d="M100 0 L200 0 L200 100 L100 100 Z"/></g></svg>')


def well_formed(svg: str) -> None:
    """Raises unless ``svg`` is a well-formed XML document with an <svg> root (namespace-unaware
    check: a model may write odd xmlns values, which XML itself allows)."""
    parser = expat.ParserCreate()
    roots = []
    parser.StartElementHandler = lambda name, attrs: roots.append(name)
    parser.Parse(svg, True)
    assert roots[0].rsplit(":", 1)[-1].lower() == "svg"


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


# --------------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("wrapped", [
    SVG,
    f"```xml\n{SVG}\n```",
    f"Here is the SVG code:\n{SVG}\nIt draws two squares.",
    f"{SVG}<|endofassistant|>",
    f'<?xml version="1.0"?>\n{SVG}',
])
def test_clean_svg_is_returned_as_written(wrapped):
    assert extract_svg(wrapped) == SvgResult(svg=SVG, repaired=False)


def test_nested_svg_is_kept_whole():
    nested = ('<svg xmlns="http://www.w3.org/2000/svg"><svg x="5"><rect width="1" height="1"/></svg>'
              '<circle r="2"/></svg>')
    assert extract_svg(nested + " trailing") == SvgResult(svg=nested, repaired=False)


def test_truncated_svg_is_closed():
    cut = SVG[: SVG.index("L200 100")]  # inside the path's d attribute, inside <g>
    result = extract_svg(cut)
    assert result.repaired
    root = etree.fromstring(result.svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    path = root.find(".//{http://www.w3.org/2000/svg}g/{http://www.w3.org/2000/svg}path")
    assert path.get("d") == "M100 0 L200 0 "  # kept up to the cut
    assert root.find("{http://www.w3.org/2000/svg}rect").get("fill") == "#ff0000"


@pytest.mark.parametrize("cut_at", ["<g fill", "<rect x=\"0\" y", "</g>", "</svg>"])
def test_cuts_at_tag_boundaries(cut_at):
    result = extract_svg(SVG[: SVG.index(cut_at)])
    assert result.repaired and result.svg is not None
    etree.fromstring(result.svg)  # well-formed


def test_unclosed_elements_and_broken_markup_are_repaired():
    broken = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10"><g><rect width="3" height="3">'
              '<circle r="1"/></g>')
    result = extract_svg(broken)
    assert result.repaired
    root = etree.fromstring(result.svg)
    assert [e.tag.split("}")[1] for e in root.iter()] == ["svg", "g", "rect", "circle"]


def test_two_documents_keep_the_first():
    first = '<svg xmlns="http://www.w3.org/2000/svg"><rect width="1" height="1"/></svg>'
    assert extract_svg(first + '<svg xmlns="http://www.w3.org/2000/svg"><circle r="1"/></svg>').svg == first


@pytest.mark.parametrize("text", ["", "I cannot draw this.", "<svgfoo/>", "<html><body/></html>", None, 42])
def test_no_svg(text):
    assert extract_svg(text) == SvgResult(svg=None, repaired=True)


def test_entities_are_not_expanded():
    bomb = ('<!DOCTYPE svg [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            '<svg xmlns="http://www.w3.org/2000/svg"><text>&b;</text></svg>')
    result = extract_svg(bomb)
    assert result.svg is not None and "aaaaaaaaaa" not in result.svg


def _mutations(rng):
    alphabet = string.printable + "<>/\"='" * 5 + "é漢\u0000"
    for i in range(300):
        s = SVG
        kind = i % 5
        if kind == 0:
            yield s[: rng.randrange(len(s) + 1)]
        elif kind == 1:
            a = rng.randrange(len(s))
            yield s[:a] + s[a + rng.randrange(1, 30):]
        elif kind == 2:
            a = rng.randrange(len(s))
            yield s[:a] + "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 20))) + s[a:]
        elif kind == 3:
            chars = list(s)
            for _ in range(rng.randrange(1, 8)):
                chars[rng.randrange(len(chars))] = rng.choice(alphabet)
            yield "".join(chars)
        else:
            yield "<svg" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 300)))


def test_corrupted_answers_never_raise_and_give_well_formed_svg():
    rng = random.Random(5)
    count = 0
    for text in _mutations(rng):
        count += 1
        result = extract_svg(text)
        assert isinstance(result, SvgResult)
        if result.svg is not None:
            well_formed(result.svg)
            assert extract_svg(result.svg).svg == result.svg  # a repaired SVG needs no second repair
        if result.svg != SVG:
            assert result.repaired or "<svg" in text.lower()
        out = postprocess_response(text, prompt_type="prompt_image_to_svg",
                                   model_size=(100, 50), original_size=(200, 100))
        assert out == {"svg": result.svg, "repaired": result.repaired}
    assert count >= 300


@pytest.mark.slow
@pytest.mark.parametrize("garbage", ["<svg" + "<g>" * 50_000, "<svg>" + '<path d="' * 20_000,
                                     "<svg " + 'a="1" ' * 40_000, "<svg>" + "</svg>" * 30_000])
def test_large_garbage_is_fast(garbage):
    import time
    start = time.perf_counter()
    result = extract_svg(garbage)
    assert time.perf_counter() - start < 5 and isinstance(result, SvgResult)


# ---------------------------------------------------------------------------------- rendering

def test_render_draws_the_svg_at_the_original_size():
    image = png(render_svg_png(SVG, (400, 200)))
    assert image.size == (400, 200)
    assert image.getpixel((100, 100)) == (255, 0, 0)
    assert image.getpixel((300, 100)) == (0, 0, 255)


def test_render_keeps_the_svg_aspect_and_caps_the_size():
    image = png(render_svg_png(SVG, (10_000, 5_000)))
    assert image.size == (2048, 1024)
    square = png(render_svg_png(SVG, (300, 300)))  # fitted into the box, aspect of the SVG kept
    assert square.size == (300, 150)


def test_render_of_a_repaired_svg_and_white_background():
    cut = extract_svg(SVG[: SVG.index("<g")]).svg
    image = png(render_svg_png(cut, (200, 100)))
    assert image.getpixel((50, 50)) == (255, 0, 0) and image.getpixel((150, 50)) == (255, 255, 255)


def test_render_ignores_references_to_local_files(tmp_path):
    probe = tmp_path / "probe.png"
    Image.new("RGB", (10, 10), (0, 0, 255)).save(probe)
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
           'viewBox="0 0 10 10" width="10" height="10">'
           f'<image href="{probe}" width="10" height="10"/>'
           f'<image xlink:href="file://{probe}" width="10" height="10"/></svg>')
    assert png(render_svg_png(svg, (10, 10))).getpixel((5, 5)) == (255, 255, 255)
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (0, 255, 0)).save(buf, format="PNG")
    inline = svg.replace(f'href="{probe}"', 'href="data:image/png;base64,'
                         + base64.b64encode(buf.getvalue()).decode() + '"')
    assert png(render_svg_png(inline, (10, 10))).getpixel((5, 5)) == (0, 255, 0)  # data URIs stay


@pytest.mark.parametrize("bad", [
    '<svg xmlns="http://www.w3.org/2000/svg" width="0" height="0"/>',
    '<svg xmlns="http://www.w3.org/2000/svg"><text>&undefined;</text></svg>',
    "<html/>",
])
def test_broken_svg_raises_a_render_error(bad):
    with pytest.raises(SvgRenderError):
        render_svg_png(bad, (10, 10))


def test_visualization_error_never_an_exception():
    out = svg_visualization('<svg xmlns="http://www.w3.org/2000/svg" width="0" height="0"/>', (10, 10))
    assert set(out) == {"visualization_error"} and "does not render" in out["visualization_error"]
    assert svg_visualization(None, (10, 10)) == {
        "visualization_error": "the answer holds no SVG document to render"}
    with pytest.raises(ValueError):
        svg_visualization(SVG, (0, 10))  # a bad size is the caller's bug


def test_postprocess_and_visualize_for_image_to_svg():
    image = Image.new("RGB", (400, 200), "white")
    answer = SVG[: SVG.index("</g>")]
    out = postprocess_response(answer, prompt_type="prompt_image_to_svg",
                               model_size=(392, 196), original_size=image.size)
    assert set(out) == {"svg", "repaired"} and out["repaired"] is True
    vis = visualize_response(out, prompt_type="prompt_image_to_svg", image=image)
    rendered = png(base64.b64decode(vis["visualization"]))
    assert rendered.size == (400, 200) and rendered.getpixel((300, 100)) == (0, 0, 255)
    none = postprocess_response("no svg here", prompt_type="prompt_image_to_svg",
                                model_size=(392, 196), original_size=image.size)
    assert none == {"svg": None, "repaired": True}
    assert "visualization_error" in visualize_response(none, prompt_type="prompt_image_to_svg", image=image)
