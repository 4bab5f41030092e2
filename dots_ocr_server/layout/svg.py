"""SVG answers of dots.mocr (``prompt_image_to_svg``): take the SVG document out of the answer,
close what a truncated answer left open, and render it to PNG.

* :func:`extract_svg` never raises. A well-formed ``<svg>…</svg>`` in the answer is returned as the
  model wrote it (prose or code fences around it are left out) with ``repaired`` False. Otherwise
  the text from ``<svg`` on goes through lxml's recovering XML parser, which closes unclosed
  elements and drops broken markup, and its serialisation is returned with ``repaired`` True. No
  ``<svg`` at all: ``svg`` None, ``repaired`` True.
* :func:`render_svg_png` renders with resvg (the ``resvg-py`` wheel, a self-contained Rust
  renderer) on white, scaled to fit the original image's size (at most :data:`MAX_RENDER_SIDE`
  pixels a side). Before rendering, references outside the document (``href`` to files or URLs,
  SVG data URIs) are removed so that an answer cannot pull local files into the picture; entities
  are never expanded and no DTD or network access happens.
* :func:`svg_visualization` gives ``{"visualization": base64 PNG}`` or
  ``{"visualization_error": message}``; it never raises.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Sequence

from .parse import _as_text

__all__ = ["SvgResult", "SvgRenderError", "extract_svg", "render_svg_png", "svg_visualization",
           "MAX_RENDER_SIDE"]

MAX_RENDER_SIDE = 2048
_SVG_START = re.compile(r"<svg(?=[\s>/]|$)", re.I)
_SVG_END = re.compile(r"</svg\s*>", re.I)
_MAX_END_TRIES = 8
# The last attribute of the last tag cut inside its quoted value, e.g. '<path d="M0 0 L10 2'.
_CUT_ATTRIBUTE = re.compile(
    r"<[A-Za-z][\w:.-]*(?:\s+[\w:.-]+\s*=\s*(?:\"[^\"]*\"|'[^']*'))*\s+[\w:.-]+\s*=\s*([\"'])[^\"'<>]*$")
_SAFE_HREF = re.compile(r"^\s*(?:#|data:image/(?:png|jpe?g|gif|webp)[;,])", re.I)


@dataclass
class SvgResult:
    """Outcome of :func:`extract_svg`: the SVG document (None when the answer has none) and
    whether it had to be repaired."""

    svg: str | None
    repaired: bool


class SvgRenderError(Exception):
    """The SVG could not be rendered; the message says why."""


def _parser(recover: bool):
    from lxml import etree

    return etree.XMLParser(recover=recover, resolve_entities=False, no_network=True, load_dtd=False,
                           huge_tree=False, remove_comments=False)


def extract_svg(text: str) -> SvgResult:
    """The SVG document in a model answer, closed if the answer was cut (see the module docstring)."""
    try:
        return _extract(_as_text(text))
    except Exception:  # noqa: BLE001 - last line of defence, the contract is "never raises"
        return SvgResult(svg=None, repaired=True)


def _extract(raw: str) -> SvgResult:
    start = _SVG_START.search(raw)
    if start is None:
        return SvgResult(svg=None, repaired=True)
    body = raw[start.start():]
    for end in list(_SVG_END.finditer(body))[:_MAX_END_TRIES]:
        candidate = body[:end.end()]
        if _well_formed(candidate):
            return SvgResult(svg=candidate, repaired=False)
    return _recover(body)


def _well_formed(candidate: str) -> bool:
    from lxml import etree

    try:
        root = etree.fromstring(candidate, _parser(recover=False))
    except (etree.XMLSyntaxError, ValueError):
        return False
    return _is_svg(root)


def _is_svg(root) -> bool:
    return root is not None and isinstance(root.tag, str) and root.tag.rsplit("}", 1)[-1].lower() == "svg"


def _close_cut_attribute(body: str) -> str:
    """Close a last attribute value that the end of the answer cut, and its tag.

    lxml's recovery drops such an element with all its attributes, and a truncated answer usually
    ends inside a long ``<path d="…">``: closing the quote keeps the path drawn up to the cut
    (upstream's repair does the same)."""
    match = _CUT_ATTRIBUTE.search(body[body.rfind("<"):]) if body.rfind("<") >= 0 else None
    return body + match.group(1) + "/>" if match else body


def _recover(body: str) -> SvgResult:
    from lxml import etree

    root = etree.fromstring(_close_cut_attribute(body), _parser(recover=True))
    if not _is_svg(root):
        return SvgResult(svg=None, repaired=True)
    # Two things lxml's recovery keeps that would make the result ill-formed again: references to
    # entities no DTD defines (dropped, the text after them kept) and repeated attributes (the
    # first one kept, as lxml itself reads them).
    for entity in list(root.iter(etree.Entity)):
        _remove_keeping_tail(entity)
    for element in root.iter(tag=etree.Element):
        names = element.attrib.keys()
        if len(names) != len(set(names)):
            first = {name: element.attrib[name] for name in dict.fromkeys(names)}
            element.attrib.clear()
            for name, value in first.items():
                element.set(name, value)
    return SvgResult(svg=etree.tostring(root, encoding="unicode"), repaired=True)


def _remove_keeping_tail(node) -> None:
    parent, tail = node.getparent(), node.tail or ""
    previous = node.getprevious()
    if previous is not None:
        previous.tail = (previous.tail or "") + tail
    else:
        parent.text = (parent.text or "") + tail
    parent.remove(node)


def _is_href(name: str) -> bool:
    return name.rsplit("}", 1)[-1].rsplit(":", 1)[-1].lower() == "href"


def sanitize_for_render(svg: str) -> str:
    """``svg`` re-serialised without external references (see the module docstring); raises
    SvgRenderError when it is not an SVG document."""
    from lxml import etree

    try:
        root = etree.fromstring(svg, _parser(recover=True))
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise SvgRenderError(f"the SVG is not well-formed XML: {exc}") from None
    if not _is_svg(root):
        raise SvgRenderError("the document's root element is not <svg>")
    for element in root.iter():
        if not isinstance(element.tag, str):
            continue
        for name in [n for n in element.attrib if _is_href(n)]:
            if not _SAFE_HREF.match(element.attrib[name]):
                del element.attrib[name]
    return etree.tostring(root, encoding="unicode")


def _fit(size: Sequence[int] | None, max_side: int) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"size must be a (width, height) pair, got {size!r}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def render_svg_png(svg: str, size: Sequence[int], *, max_side: int = MAX_RENDER_SIDE) -> bytes:
    """PNG bytes of ``svg`` rendered on white, scaled to fit ``size`` = (width, height) of the
    original image, shrunk to at most ``max_side`` pixels a side (the SVG's own aspect ratio is
    kept). Raises SvgRenderError when it does not render, ValueError for a bad ``size``."""
    width, height = _fit(size, max_side)
    clean = sanitize_for_render(svg)
    import resvg_py

    try:
        return bytes(resvg_py.svg_to_bytes(svg_string=clean, background="white", width=width, height=height))
    except BaseException as exc:  # a Rust panic arrives as a BaseException subclass
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise SvgRenderError(f"the SVG does not render: {exc}") from None


def svg_visualization(svg: str | None, size: Sequence[int]) -> dict[str, str]:
    """``{"visualization": <base64 PNG>}`` of :func:`render_svg_png`, or
    ``{"visualization_error": <message>}`` when there is no SVG or it does not render. Never raises
    because of the SVG (a bad ``size`` is a caller bug: ValueError)."""
    _fit(size, MAX_RENDER_SIDE)
    if not svg:
        return {"visualization_error": "the answer holds no SVG document to render"}
    try:
        png = render_svg_png(svg, size)
    except SvgRenderError as exc:
        return {"visualization_error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - e.g. lxml refusing odd characters: still not a 500
        return {"visualization_error": f"the SVG does not render: {exc}"}
    return {"visualization": base64.b64encode(png).decode("ascii")}
