"""One document per input beside the page rows: ``--out/_documents/<name>/`` with ``document.md``,
``document.json`` and ``figures/`` (the format of docs/DOCUMENT_FORMAT.md, built by the same
``dots_ocr_server.document.assemble`` as the client's and the document jobs').

After a run, every input whose pages all have an ok row (this run's or an earlier one's: a resumed
run completes documents too) and a layout in page pixels gets its document. ``<name>`` is the
file's stem and the start of its content hash, so two inputs called ``report.pdf`` in different
folders stay apart. The figures are cropped from the pages rendered again at the job's dpi (only
the pages that have a picture). Writing goes through the job's filesystem (local or fsspec), each
file under a hidden name renamed into place.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import PurePosixPath
from typing import Any

from .inputs import open_filesystem, page_policy, read_source
from .outputs import _read_rows, _write_atomic, shard_files

log = logging.getLogger(__name__)

__all__ = ["DOCUMENTS_FOLDER", "document_name", "write_documents"]

# "_": readers of the row shards (pyarrow.parquet.read_table(OUT), pandas.read_parquet(OUT)) skip it
DOCUMENTS_FOLDER = "_documents"
_COLUMNS = ["source", "sha256", "page", "page_count", "prompt_type", "response", "finish_reason", "layout",
            "repaired", "width", "height", "error"]


def document_name(source: str, sha256: str) -> str:
    """``<stem>-<first 8 hex of the content hash>`` (a folder name that two inputs do not share)."""
    stem = PurePosixPath(source.replace("\\", "/")).stem or "document"
    return f"{stem}-{sha256[:8]}"


def _complete_inputs(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """sha256 -> its rows, one per page in order, for the inputs whose every page has an ok row."""
    by_input: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        if row.get("error") is None and row.get("sha256") and row.get("width") and row.get("height"):
            by_input[row["sha256"]][int(row["page"])] = row
    complete = {}
    for sha, pages in by_input.items():
        count = next(iter(pages.values())).get("page_count") or len(pages)
        if sorted(pages) == list(range(1, int(count) + 1)):
            complete[sha] = [pages[n] for n in sorted(pages)]
    return complete


def write_documents(out: str, settings, options=None) -> list[str]:
    """Write the document of every complete input under ``out`` (see the module docstring); the
    folders written. ``settings``: the job's ``JobSettings`` (prompt type, dpi, model)."""
    from model_runner.prompts import LAYOUT_PROMPT_TYPES

    from ..document import AssembleOptions, assemble, document_files, page_from_answer

    if settings.prompt_type not in LAYOUT_PROMPT_TYPES or not settings.postprocess:
        return []
    fs, root = open_filesystem(out)
    root = root.rstrip("/") or "/"
    rows = [row for path in shard_files(fs, root) for row in _read_rows(fs, path, None)]
    rows = [{name: row.get(name) for name in _COLUMNS} for row in rows
            if row.get("prompt_type") == settings.prompt_type]
    written = []
    for sha, pages in sorted(_complete_inputs(rows).items()):
        source = pages[0]["source"]
        inputs = [page_from_answer(row["page"], row["width"], row["height"], row) for row in pages]
        metadata = {"model": settings.model_path or ("demo" if settings.demo else None),
                    "prompt_type": settings.prompt_type, "dpi": settings.dpi}
        document = assemble(inputs, options or AssembleOptions(), source=source, metadata=metadata)
        files = document_files(document, _page_loader(source, settings.dpi))
        folder = f"{root}/{DOCUMENTS_FOLDER}/{document_name(source, sha)}"
        fs.makedirs(f"{folder}/figures", exist_ok=True)
        for name, data in files.items():  # in the writer's order: figures first, document.json last
            _write_atomic(fs, f"{folder}/{name}", data)
        written.append(folder)
    return written


def _page_loader(source: str, dpi: float):
    """Page number -> the page's image, as the job loaded it (read once, rendered per page)."""
    from ..pages import PageService, PageSource

    pages = PageService(None, page_policy())
    data: list[bytes] = []

    def load(page: int):
        if not data:
            data.append(read_source(source))
        return pages.load(PageSource(data=data[0], page=page, dpi=dpi)).image

    return load
