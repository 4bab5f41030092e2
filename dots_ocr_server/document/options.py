"""The switches of the assembly: one flag per join rule (see :mod:`.joins`), all on by default
except ``keep_headers``. ``dots-ocr-assemble`` has a command-line switch for each."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["AssembleOptions"]


@dataclass(frozen=True)
class AssembleOptions:
    #: Page-header / Page-footer cells in document.md (they are always in document.json).
    keep_headers: bool = False
    #: Join a paragraph that a page break cut in two (:func:`.joins.join_paragraph`).
    join_paragraphs: bool = True
    #: Merge a table that a page break cut in two (:func:`.joins.merge_table`) ...
    merge_tables: bool = True
    #: ... dropping the next page's repetition of the table's header row(s).
    drop_repeated_table_headers: bool = True
    #: Footnotes go to the end of their page's content (:func:`.joins.footnotes_last`).
    footnotes_last: bool = True
    #: A caption goes next to the picture or table it belongs to (:func:`.joins.attach_captions`).
    attach_captions: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
