"""Per input, once every page of it is done: its document, ``document.md``, ``document.json``,
``figures/`` (and ``chunks.jsonl`` with ``--chunks``) in ``OUT/<input>/`` next to its
``page_NNNN/`` folders, assembled from those folders by :mod:`dots_ocr_server.document` (the same
reading as ``dots-ocr-assemble``, so both give the same files).

Only for the layout prompt types (the others give no cells to assemble). An input with a failed
page gets no new document (an earlier one, if any, is left as it was); running the client again
redoes the failed pages and then writes it. Figures are cropped from the input itself: the image
file, or the PDF page rendered again at ``--dpi``; only for pages done in this run or whose figure
files are missing (a resumed run does not render a long PDF again for figures it already has).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dots_ocr_server.document import (
    AssembleOptions,
    DocumentInputError,
    MissingPageImageError,
    assemble,
    read_client_folder,
    write_document,
)
from model_runner.prompts import LAYOUT_PROMPT_TYPES

from .errors import PageError
from .inputs import InputFile, page_image
from .outputs import PageRecord

__all__ = ["InputDocuments"]


class InputDocuments:
    """Writes each input's document when its last page is done (:meth:`page_done`), and those of
    inputs with nothing left to do (:meth:`finish`). Counts what was written and what failed."""

    def __init__(self, items: list[InputFile], pending: list[InputFile], out: Path, *, prompt_type: str,
                 dpi: int, keep_headers: bool = False, chunks: bool = False,
                 say: Callable[[str], None] = print):
        self.enabled = prompt_type in LAYOUT_PROMPT_TYPES
        self.out = out
        self.dpi = dpi
        self.options = AssembleOptions(keep_headers=keep_headers)
        self.chunks = chunks
        self.say = say
        self.written = 0
        self.failed: list[dict[str, str]] = []
        self._items = [item for item in items if item.kind != "invalid"]
        self._left = {id(item): 0 for item in self._items}   # pages of the input still to finish
        for item in pending:
            self._left[id(item)] += 1
        self._broken: set[int] = set()   # inputs with a failed page
        self._done: set[int] = set()     # inputs whose document was handled
        self._redone: dict[int, set[int]] = {}  # input -> its pages done in this run

    def summary(self) -> dict[str, Any] | None:
        return {"written": self.written, "failed": self.failed} if self.enabled else None

    def page_done(self, item: InputFile, record: PageRecord) -> None:
        """One page of ``item`` finished (ok or failed); the last one writes the document."""
        if record.status == "failed":
            self._broken.add(id(item))
        elif record.page is not None:
            self._redone.setdefault(id(item), set()).add(record.page)
        self._left[id(item)] -= 1
        if self._left[id(item)] == 0:
            self._handle(item)

    def finish(self) -> None:
        """The inputs that had no page to do this run (all done before) get their document too."""
        for item in self._items:
            if self._left[id(item)] == 0 and id(item) not in self._done:
                self._handle(item)

    def _handle(self, item: InputFile) -> None:
        self._done.add(id(item))
        if not self.enabled:
            return
        if id(item) in self._broken:
            self.say(f"document of {item.label} not written: a page failed (run again to redo it)")
            return
        try:
            self._write(item)
            self.written += 1
        except (DocumentInputError, MissingPageImageError, PageError) as exc:
            self._fail(item, str(exc))
        except OSError as exc:
            self._fail(item, f"cannot write it in {self.out / item.name}: {exc}")

    def _fail(self, item: InputFile, error: str) -> None:
        self.failed.append({"input": item.label, "error": error})
        self.say(f"FAILED document of {item.label}: {error}")

    def _write(self, item: InputFile) -> None:
        folder = self.out / item.name
        pages = read_client_folder(folder, page_count=item.page_count)
        metadata = dict(pages.metadata)
        if item.kind == "pdf":
            metadata["dpi"] = self.dpi
        else:
            metadata.pop("dpi", None)
        document = assemble(pages.pages, self.options, source=item.label, metadata=metadata)
        redone = self._redone.get(id(item), set())
        missing = {figure.page for figure in document.figures if not (folder / figure.file).is_file()}

        def image(page: int):
            # None: the page's figure files, cropped when the page was done, are kept as they are.
            return page_image(item, page, self.dpi) if page in redone or page in missing else None

        write_document(document, folder, image, chunks=self.chunks)
