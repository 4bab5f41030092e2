"""From pages to a document: the per-page layouts of one input joined into ``document.md``,
``document.json``, ``figures/`` (and ``chunks.jsonl``), as defined in docs/DOCUMENT_FORMAT.md.

The one call every output path makes (the client, the batch job, the document jobs)::

    from dots_ocr_server.document import AssembleOptions, assemble, page_from_answer, write_document

    pages = [page_from_answer(n, width, height, answer) for n, (width, height, answer) in ...]
    document = assemble(pages, AssembleOptions(keep_headers=False), source="report.pdf",
                        metadata={"model": ..., "prompt_type": ..., "dpi": 200})
    write_document(document, out_dir, page_images)      # or document_files(...) / document_zip(...)

Modules: ``model`` (the dataclasses and their JSON), ``options`` (the switches), ``text`` and
``tables`` (what the cross-page joins test), ``joins`` (the rules), ``markdown`` (blocks ->
Markdown), ``assemble`` (the pure core), ``figures`` (crops), ``chunks`` (retrieval chunks),
``writer`` (the files), ``quality`` (pages that cannot be trusted), ``inputs`` (existing results
-> pages), ``page_ranges`` (``"1-3,7"``: the pages of a job or a client run), ``cli``
(``dots-ocr-assemble``). Nothing here imports torch.
"""
from .assemble import assemble, figure_file, page_figures
from .chunks import DEFAULT_CHUNK_CHARS, Chunk, chunk_document
from .figures import crop_figure, figure_png
from .inputs import (
    DocumentInputError,
    PagesInput,
    cells_from_json,
    load_page_image,
    page_from_answer,
    page_image_loader,
    read_client_folder,
    read_pages_json,
)
from .markdown import render_blocks
from .model import BBox, Block, Cell, CellRef, Document, Figure, PageInput, PageIssue
from .options import AssembleOptions
from .quality import (
    ISSUE_REPETITION,
    ISSUE_UNPARSABLE,
    RETRY_NOTE,
    RETRY_SCALE,
    answer_problem,
    keep_after_retry,
)
from .writer import (
    CHUNKS_NAME,
    FIGURES_DIR,
    JSON_NAME,
    MARKDOWN_NAME,
    MissingPageImageError,
    document_entries,
    document_files,
    document_zip,
    write_bytes_atomic,
    write_document,
)

__all__ = [
    "CHUNKS_NAME", "DEFAULT_CHUNK_CHARS", "FIGURES_DIR", "ISSUE_REPETITION", "ISSUE_UNPARSABLE",
    "JSON_NAME", "MARKDOWN_NAME", "RETRY_NOTE", "RETRY_SCALE",
    "AssembleOptions", "BBox", "Block", "Cell", "CellRef", "Chunk", "Document", "DocumentInputError",
    "Figure", "MissingPageImageError", "PageInput", "PageIssue", "PagesInput",
    "answer_problem", "assemble", "cells_from_json", "chunk_document", "crop_figure", "document_entries",
    "document_files", "document_zip", "figure_file", "figure_png", "keep_after_retry", "load_page_image",
    "page_figures", "page_from_answer", "page_image_loader", "read_client_folder", "read_pages_json",
    "render_blocks", "write_bytes_atomic", "write_document",
]
