"""Inputs of a batch job: INPUT arguments -> source files -> pages, and one page's image.

* :func:`expand_inputs`: files (any extension: recognised later by their bytes), folders (searched
  recursively for the client's supported extensions, hidden entries left out) and globs, each
  either a local path or a URI that fsspec understands (``s3://``, ``gs://``, ``memory://``...).
  A URI whose filesystem package is missing (s3fs, gcsfs, ...) is reported with the package to
  install.
* :func:`scan_source`: one file -> its SHA-256, kind (image / pdf) and page count, or an error.
  Runs on Ray workers (the scan stage), so the driver never reads the corpus.
* :func:`plan_pages`: scanned files -> the pages still to do, the error rows of files that cannot
  be used, and how many pages were skipped because their key is already written.
* :func:`page_key`: ``<sha256>:<page>:<prompt type>`` (plus a hash of the question for
  ``prompt_general``), the resume key.
* :func:`page_policy`: the image policy a page of the corpus is loaded with (by the page
  service, as the server loads a request's page).
"""
from __future__ import annotations

import functools
import hashlib
import io
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

__all__ = [
    "InputError", "Expansion", "expand_inputs", "open_filesystem", "read_source", "scan_source",
    "page_key", "Plan", "plan_pages", "page_policy",
]

#: Characters that make an INPUT a glob pattern (fsspec's glob syntax).
_GLOB_CHARS = "*?["
#: Hints for the filesystem packages fsspec asks for, by URI scheme (fsspec's own ImportError
#: names the package; this adds the install command).
_FS_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                "abfss": "adlfs", "hdfs": "pyarrow", "http": "aiohttp", "https": "aiohttp"}


class InputError(Exception):
    """An INPUT that cannot be listed or read; the message names it."""


@functools.lru_cache(maxsize=1)
def page_policy():
    from image_utils import ImagePolicy

    # ImagePolicy's defaults (the project's one pixel cap, as the server and the client use it),
    # except the page-count cap: a corpus PDF may be long, and each page is rendered on its own
    # (bounded by the render timeout and the model's pixel cap).
    return ImagePolicy(max_pdf_pages=sys.maxsize)


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------


def _scheme(text: str) -> str:
    return text.split("://", 1)[0].lower() if "://" in text else ""


def open_filesystem(uri: str):
    """``(fsspec filesystem, path)`` for a local path or a URI; InputError when the URI's
    filesystem package is missing or the scheme is unknown."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError as exc:
        package = _FS_PACKAGES.get(_scheme(uri))
        hint = f" (pip install {package})" if package else ""
        raise InputError(f"{uri}: reading {_scheme(uri)}:// URIs needs a filesystem package that is not "
                         f"installed{hint}: {exc}") from None
    except ValueError as exc:
        raise InputError(f"{uri}: {exc}") from None


def _source_name(fs, path: str, as_uri: bool) -> str:
    """How a file is named in the output: its absolute path when local, else its full URI."""
    return fs.unstrip_protocol(path) if as_uri else path


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/") if part)


def _walk(fs, folder: str) -> list[str]:
    """Files with a supported extension under ``folder``, recursively, sorted; hidden files and
    folders (``.git``, ``._x.png``...) left out, as the HTTP client does."""
    from dots_ocr_server.client.inputs import INPUT_SUFFIXES

    found = []
    root = folder.rstrip("/")
    for path in fs.find(root):
        relative = path[len(root):].lstrip("/")
        if not _is_hidden(relative) and path.lower().endswith(INPUT_SUFFIXES):
            found.append(path)
    return sorted(found)


@dataclass
class Expansion:
    """The source files found (in INPUT order, without duplicates) and the INPUTs that gave
    nothing usable, each with a message."""

    sources: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _expand_one(spec: str) -> list[str]:
    as_uri = "://" in spec
    fs, path = open_filesystem(spec)
    if any(ch in path for ch in _GLOB_CHARS):
        matches = sorted(fs.glob(path))
        files = []
        for match in matches:
            files.extend(_walk(fs, match) if fs.isdir(match) else [match])
        if not files:
            raise InputError(f"{spec}: the pattern matches no file")
    elif fs.isdir(path):
        files = _walk(fs, path)
        if not files:
            raise InputError(f"{spec}: no images or PDFs in this folder")
    elif fs.exists(path):
        files = [path]
    else:
        raise InputError(f"{spec}: no such file or folder")
    return [_source_name(fs, f, as_uri) for f in files]


def expand_inputs(specs: Iterable[str]) -> Expansion:
    """Files, folders and globs (local or URIs) -> source files; see the module docstring."""
    result = Expansion()
    seen: set[str] = set()
    for spec in specs:
        try:
            files = _expand_one(spec)
        except InputError as exc:
            result.problems.append(str(exc))
            continue
        except OSError as exc:  # e.g. permissions, or a remote store refusing the listing
            result.problems.append(f"{spec}: cannot list it ({exc})")
            continue
        for source in files:
            if source not in seen:
                seen.add(source)
                result.sources.append(source)
    return result


# ---------------------------------------------------------------------------------------------
# Scanning one file
# ---------------------------------------------------------------------------------------------


def read_source(source: str) -> bytes:
    """The bytes of a source file (path or URI). InputError / OSError when unreadable."""
    fs, path = open_filesystem(source)
    with fs.open(path, "rb") as handle:
        return handle.read()


def _looks_like_image(data: bytes) -> bool:
    """True when Pillow recognises one of the server's image formats from the header alone."""
    from PIL import Image, UnidentifiedImageError

    from image_utils.decode import ALLOWED_FORMATS

    try:
        with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)):
            return True
    except Image.DecompressionBombError:
        return True  # an image; the decoder reports its size as the page's error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def scan_source(source: str) -> dict[str, Any]:
    """``{source, sha256, kind, page_count, error}`` for one file. ``kind`` is "pdf" or "image"
    (by content, not extension); ``error`` is set (and ``page_count`` None) when the file cannot
    be read, is not an image or PDF, or is a PDF that does not open."""
    from image_utils import ImageInputError, is_pdf_bytes, pdf_page_count

    row: dict[str, Any] = {"source": source, "sha256": None, "kind": None, "page_count": None, "error": None}
    try:
        data = read_source(source)
    except (InputError, OSError) as exc:
        row["error"] = f"cannot read the file: {exc}"
        return row
    row["sha256"] = hashlib.sha256(data).hexdigest()
    if is_pdf_bytes(data):
        row["kind"] = "pdf"
        try:
            row["page_count"] = pdf_page_count(data)
        except ImageInputError as exc:
            row["error"] = exc.message
        return row
    if not _looks_like_image(data):
        row["error"] = "not an image or PDF (supported: PNG, JPEG, WebP, BMP, TIFF, GIF, PDF)"
        return row
    row["kind"], row["page_count"] = "image", 1
    return row


# ---------------------------------------------------------------------------------------------
# Pages and keys
# ---------------------------------------------------------------------------------------------


def page_key(sha256: Optional[str], page: int, prompt_type: str, question: Optional[str] = None,
             source: Optional[str] = None) -> str:
    """The resume key of one page: content hash, page number, prompt type (and, for a question,
    a hash of it). A file that could not be read has no content hash: its path stands in."""
    content = sha256 or "path-" + hashlib.sha256((source or "").encode("utf-8")).hexdigest()
    key = f"{content}:{page}:{prompt_type}"
    if question is not None:
        key += ":q-" + hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]
    return key


@dataclass
class Plan:
    """What a run will do: ``pages`` for the model (dicts: key, source, sha256, kind, page,
    page_count), ``failed`` rows of files that cannot be used (no model needed), and
    ``skipped``, the number of pages whose key is already written."""

    pages: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


def plan_pages(scanned: Iterable[dict[str, Any]], prompt_type: str, done: set[str] | frozenset[str],
               question: Optional[str] = None) -> Plan:
    """Scanned files -> one entry per page, minus the pages whose key is in ``done``."""
    plan = Plan()
    for item in scanned:
        if item["error"] is not None:
            key = page_key(item["sha256"], 1, prompt_type, question, source=item["source"])
            if key in done:
                plan.skipped += 1
            else:
                plan.failed.append({"key": key, "source": item["source"], "sha256": item["sha256"], "page": 1,
                                    "page_count": item["page_count"], "error": item["error"]})
            continue
        for page in range(1, item["page_count"] + 1):
            key = page_key(item["sha256"], page, prompt_type, question)
            if key in done:
                plan.skipped += 1
                continue
            plan.pages.append({"key": key, "source": item["source"], "sha256": item["sha256"],
                               "kind": item["kind"], "page": page, "page_count": item["page_count"]})
    return plan
