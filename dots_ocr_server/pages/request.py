"""What one page request is, whichever protocol it came in: where the page comes from, which
prompt, how to sample, how long the answer may be, and what to make of it afterwards."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from model_runner.decoding import DecodingOptions
from model_runner.defaults import DEFAULT_MAX_NEW_TOKENS

__all__ = ["DEFAULT_PROMPT_TYPE", "PageSource", "Postprocess", "PageRequest"]

#: The prompt type of a request that names none (the interface document's default).
DEFAULT_PROMPT_TYPE = "prompt_layout_all_en"


@dataclass(frozen=True)
class PageSource:
    """Where the page comes from, one of: a request's ``value`` read through ``transport`` (path,
    url or base64; a data URI whatever the transport says), ``data`` already read (a stored upload,
    a batch job's file), or an ``image`` already decoded (PIL). ``page`` (1-based) and ``dpi`` for a
    PDF; an image has only page 1."""

    value: str | None = None
    transport: str | None = "path"
    data: bytes | None = None
    image: Any = None
    page: int = 1
    dpi: float | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("value", "data", "image") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a page source is one of value, data or image (given: {given or 'none'})")


@dataclass(frozen=True)
class Postprocess:
    """What to make of the answer. ``layout``: the layout (boxes in original pixels), Markdown and
    ``repaired`` (or spots / SVG, by prompt type), each cell with its ``confidence``;
    ``visualize``: a PNG of the page with it drawn; ``skip_headers_footers``: Markdown without
    page headers and footers; ``picture_mode``: pictures in the Markdown as references or as
    embedded data URIs."""

    layout: bool = False
    visualize: bool = False
    skip_headers_footers: bool = False
    picture_mode: str = "ref"

    @property
    def any(self) -> bool:
        return self.layout or self.visualize


@dataclass(frozen=True)
class PageRequest:
    """One page through the model. A trained prompt (``prompt_type``; ``bbox`` in original pixels
    for grounding, ``question`` for ``prompt_general``) or chat ``messages`` (then ``prompt_type``
    is None). ``route``: the entry point, as the metrics label it."""

    source: PageSource
    prompt_type: str | None = DEFAULT_PROMPT_TYPE
    bbox: Sequence[float] | None = None
    question: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ignore_eos: bool = False
    postprocess: Postprocess = field(default_factory=Postprocess)
    route: str = "-"
