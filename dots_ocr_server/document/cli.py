"""``dots-ocr-assemble``: build ``document.md``, ``document.json`` and ``figures/`` again from
per-page results that already exist, with other switches, without running the model.

INPUT is one of:

* the client's folder of one input (``OUT/<input>``, holding ``page_NNNN/``): the document is
  written there (or in ``--out``);
* the client's whole output folder (``OUT``, holding such folders): each input's document is
  written in its folder (or in ``--out/<input>``);
* a JSON file ``{"pages": [{"page", "width", "height", "image"?, "layout": [cells]}]}``: the
  document is written next to it (or in ``--out``).

Figures are cropped from ``--source`` (the input's image or PDF), from the JSON file's ``image``
fields, or else the figure files of an earlier assembly in the output folder are kept.
Exit codes: 0 done, 1 an input could not be assembled (the message says why), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .assemble import assemble
from .chunks import DEFAULT_CHUNK_CHARS
from .inputs import (
    DocumentInputError,
    PagesInput,
    is_client_input_folder,
    is_pdf_reference,
    page_image_loader,
    read_client_folder,
    read_pages_json,
)
from .model import Document
from .options import AssembleOptions
from .writer import (
    CHUNKS_NAME,
    JSON_NAME,
    MARKDOWN_NAME,
    MissingPageImageError,
    write_document,
)

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_FAILED = 0, 1  # 2: bad arguments (argparse)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dots-ocr-assemble",
        description="Join per-page layouts into one document: document.md, document.json and figures/ "
                    "(and chunks.jsonl with --chunks). INPUT: a dots-ocr-client output folder (of one input, "
                    "or the whole OUT folder) or a JSON file {\"pages\": [{\"page\", \"width\", \"height\", "
                    "\"image\"?, \"layout\": [cells]}]}.",
        epilog="Exit codes: 0 done, 1 an input could not be assembled, 2 bad arguments.",
    )
    add = parser.add_argument
    add("input", metavar="INPUT", help="client output folder or pages JSON file")
    add("--out", metavar="DIR", default=None,
        help="output folder (default: the input's own folder; for a JSON file, the folder it is in)")
    add("--source", metavar="FILE", default=None,
        help="the input's image or PDF, to crop the figures from (default: the JSON file's image fields, "
             "else the figures already in the output folder)")
    add("--dpi", metavar="DPI", type=_positive, default=None,
        help="resolution the PDF given with --source was rendered at for the layout (default: the one recorded "
             "by the client in document.json, else the server's default)")
    add("--keep-headers", action="store_true", help="keep page headers and footers in document.md")
    add("--no-join-paragraphs", action="store_true", help="do not join paragraphs cut by a page break")
    add("--no-merge-tables", action="store_true", help="do not merge tables cut by a page break")
    add("--keep-repeated-table-headers", action="store_true",
        help="when merging a table, keep the next page's repetition of its header row")
    add("--no-footnotes-last", action="store_true", help="leave footnotes where the model put them")
    add("--no-attach-captions", action="store_true", help="leave captions where the model put them")
    add("--chunks", action="store_true", help="also write chunks.jsonl (heading-aware chunks for retrieval)")
    add("--chunk-chars", metavar="N", type=_positive, default=DEFAULT_CHUNK_CHARS,
        help=f"longest chunk in characters, before a block that would pass it (default {DEFAULT_CHUNK_CHARS})")
    return parser


def options_from_args(args: argparse.Namespace) -> AssembleOptions:
    return AssembleOptions(keep_headers=args.keep_headers, join_paragraphs=not args.no_join_paragraphs,
                           merge_tables=not args.no_merge_tables,
                           drop_repeated_table_headers=not args.keep_repeated_table_headers,
                           footnotes_last=not args.no_footnotes_last, attach_captions=not args.no_attach_captions)


def _jobs(args: argparse.Namespace) -> list[tuple[str, Path, Path]]:
    """(kind, input, output folder) for each document to build: kind "folder" or "json"."""
    path = Path(args.input).expanduser()
    if not path.exists():
        raise DocumentInputError(f"{path}: no such file or folder")
    if path.is_file():
        return [("json", path, Path(args.out) if args.out else path.parent)]
    if is_client_input_folder(path):
        return [("folder", path, Path(args.out) if args.out else path)]
    inputs = sorted(child for child in path.iterdir() if child.is_dir() and is_client_input_folder(child))
    if not inputs:
        raise DocumentInputError(f"{path}: neither the client's output folder of one input (page_0001/ ...) "
                                 "nor its whole output folder (such folders inside)")
    if args.source:
        raise DocumentInputError(f"{path} holds {len(inputs)} inputs: --source names the file of one of them; "
                                 "run dots-ocr-assemble on that input's folder")
    return [("folder", child, Path(args.out) / child.name if args.out else child) for child in inputs]


def _read(kind: str, path: Path) -> PagesInput:
    pages = read_pages_json(path) if kind == "json" else read_client_folder(path)
    pages.source = pages.source or (path.stem if kind == "json" else path.name)
    return pages


def _images(pages: PagesInput, args: argparse.Namespace):
    dpi = args.dpi or pages.metadata.get("dpi")
    if args.source is None:
        return page_image_loader(pages.images, dpi) if pages.images else None
    source = str(Path(args.source).expanduser())
    if not Path(source).is_file():
        raise DocumentInputError(f"--source {source}: no such file")
    if len(pages.pages) > 1 and not is_pdf_reference(source):
        raise DocumentInputError(f"--source {source} is an image, but the document has {len(pages.pages)} pages")
    return page_image_loader({page.page: source for page in pages.pages}, dpi)


def _report(document: Document, out: Path, chunks: bool) -> str:
    names = [MARKDOWN_NAME, JSON_NAME] + ([CHUNKS_NAME] if chunks else [])
    figures = len(document.figures)
    issues = "".join(f"; page {issue.page}: {issue.kind}" for issue in document.issues)
    return (f"{out}: {', '.join(names)}, {figures} figure{'s' if figures != 1 else ''} "
            f"({len(document.pages)} pages, {len(document.blocks)} blocks{issues})")


def _assemble_one(kind: str, path: Path, out: Path, args: argparse.Namespace) -> str:
    pages = _read(kind, path)
    metadata = dict(pages.metadata)
    if args.dpi is not None:
        metadata["dpi"] = args.dpi
    document = assemble(pages.pages, options_from_args(args), source=pages.source, metadata=metadata)
    try:
        write_document(document, out, _images(pages, args), chunks=args.chunks, max_chunk_chars=args.chunk_chars)
    except MissingPageImageError as exc:
        raise DocumentInputError(f"{path}: {exc}; pass the input's image or PDF with --source FILE"
                                 + (" or give the pages an \"image\"" if kind == "json" else "")) from None
    except OSError as exc:
        raise DocumentInputError(f"cannot write the document in {out}: {exc}") from None
    return _report(document, out, args.chunks)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        jobs = _jobs(args)
    except DocumentInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    failed = 0
    for kind, path, out in jobs:
        try:
            print(_assemble_one(kind, path, out, args))
        except DocumentInputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
