"""Outputs: per-page files (``OUT/<input>/page_NNNN/``), the done marker that makes a run
resumable, and the run's summary (``OUT/summary.json`` and the printed one).

- ``layout.json``   the layout cells (bbox in page pixels), layout prompt types only
- ``page.md``       the server's Markdown (layout prompt types) or the raw answer text
- ``page.png``      the page with the layout drawn on it (the plain page for other prompt types)
- ``logprobs.json`` with ``--logprobs``: the answer's tokens, each with its log-probability (and
                    the top alternatives with ``--top-logprobs``), taken out of response.json
- ``response.json`` the server's JSON, written last and atomically: it marks the page as done
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from dots_ocr_server.document.writer import write_bytes_atomic as _write_atomic
from model_runner.prompts import LAYOUT_PROMPT_TYPES, SCENE_SPOTTING_PROMPT_TYPE, SVG_PROMPT_TYPE

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "MARKER_NAME", "PAGE_IMAGE_NAME", "SUMMARY_NAME", "PageRecord", "build_summary", "is_done", "page_dir",
    "print_summary", "write_page_outputs", "write_summary",
]

MARKER_NAME = "response.json"
PAGE_IMAGE_NAME = "page.png"  # the uploaded page (with its layout drawn): its size is the layout's pixels
LOGPROBS_NAME = "logprobs.json"  # with --logprobs: the answer's tokens and their log-probabilities
SUMMARY_NAME = "summary.json"


def page_dir(out: Path, name: str, page: int) -> Path:
    return out / name / f"page_{page:04d}"


def is_done(directory: Path) -> bool:
    """A page is done once its response.json exists (it is written last)."""
    return (directory / MARKER_NAME).exists()


def _save_png_atomic(path: Path, image: "Image.Image") -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def write_page_outputs(directory: Path, result: dict[str, Any], prompt_type: str, image: "Image.Image") -> None:
    """The page's files, then response.json (last, atomically: the done marker):

    * layout types: layout.json (cells in original pixels), page.md, page.png with the layout drawn;
    * prompt_scene_spotting: spots.json (quadrilaterals in original pixels), page.md (the texts),
      page.png with the quadrilaterals drawn;
    * prompt_image_to_svg: page.svg (the repaired SVG document), page.md (the raw answer), page.png;
    * other types: page.md (the answer) and page.png (the page);
    * with ``--logprobs``: logprobs.json (the answer's tokens with their log-probabilities, kept out
      of response.json).
    Files a forced rerun with another prompt type would leave stale are removed."""
    from dots_ocr_server.layout import draw_layout, draw_spots

    directory.mkdir(parents=True, exist_ok=True)
    text = result.get("response") if isinstance(result.get("response"), str) else ""
    server_markdown = result.get("markdown") if isinstance(result.get("markdown"), str) else None
    written: set[str] = set()
    picture = image
    markdown = text
    if prompt_type in LAYOUT_PROMPT_TYPES:
        cells = result.get("layout") if isinstance(result.get("layout"), list) else []
        _write_atomic(directory / "layout.json", _json_bytes(cells))
        written.add("layout.json")
        markdown = server_markdown if server_markdown is not None else text
        picture = draw_layout(image, cells) if cells else image
    elif prompt_type == SCENE_SPOTTING_PROMPT_TYPE:
        spots = result.get("spots") if isinstance(result.get("spots"), list) else []
        _write_atomic(directory / "spots.json", _json_bytes(spots))
        written.add("spots.json")
        markdown = server_markdown if server_markdown is not None else text
        picture = draw_spots(image, spots) if spots else image
    elif prompt_type == SVG_PROMPT_TYPE and isinstance(result.get("svg"), str):
        _write_atomic(directory / "page.svg", result["svg"].encode("utf-8"))
        written.add("page.svg")
    for name in STRUCTURED_FILES - written:
        (directory / name).unlink(missing_ok=True)
    _write_atomic(directory / "page.md", markdown.encode("utf-8") if markdown.endswith("\n")
                  else (markdown + "\n").encode("utf-8"))
    _save_png_atomic(directory / PAGE_IMAGE_NAME, picture)
    if "logprobs" in result:
        result = dict(result)
        _write_atomic(directory / LOGPROBS_NAME, _json_bytes(result.pop("logprobs")))
    else:
        (directory / LOGPROBS_NAME).unlink(missing_ok=True)  # stale, from an earlier run with --logprobs
    _write_atomic(directory / MARKER_NAME, _json_bytes(result))


STRUCTURED_FILES = frozenset({"layout.json", "spots.json", "page.svg"})


@dataclass
class PageRecord:
    input: str
    page: Optional[int]
    status: str                  # "ok" | "failed" | "skipped"
    dir: Optional[str] = None
    seconds: Optional[float] = None
    repaired: Optional[bool] = None
    retried: Optional[bool] = None  # asked again at a smaller scale (see batch._retry_rescaled)
    error: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def build_summary(records: list[PageRecord], *, server: str, prompt_type: str, out: Path, concurrency: Optional[int],
                  started: float, started_at: str, retries: int, fatal: Optional[str],
                  documents: Optional[dict[str, Any]] = None,
                  jobs: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    """The run's summary; ``started`` is a ``time.monotonic()`` reading, ``fatal`` why it stopped
    early (None when it ran to the end), ``documents`` what became of the inputs' documents
    (``{"written", "failed": [{"input", "error"}]}``, layout prompt types only, every prompt type
    with ``--jobs``), ``jobs`` (``--jobs``) the job of each input that ran:
    ``{"input", "job_id", "status", "reattached"}``."""
    ok = [r for r in records if r.status == "ok"]
    work = sum(r.seconds or 0.0 for r in ok)
    elapsed = time.monotonic() - started
    summary: dict[str, Any] = {
        "server": server,
        "prompt_type": prompt_type,
        "out": str(out),
        "started_at": started_at,
        "finished": fatal is None,
        "concurrency": concurrency,
        "pages": len(records),
        "ok": len(ok),
        "failed": sum(r.status == "failed" for r in records),
        "skipped": sum(r.status == "skipped" for r in records),
        "repaired": sum(bool(r.repaired) for r in ok),
        "rescaled_retries": sum(bool(r.retried) for r in ok),
        "busy_retries": retries,
        "seconds_total": round(elapsed, 3),
        "seconds_per_page": round(work / len(ok), 3) if ok else None,
        "pages_per_second": round(len(ok) / elapsed, 3) if ok and elapsed > 0 else None,
        "failures": [{"input": r.input, "page": r.page, "error": r.error} for r in records if r.status == "failed"],
        "page_results": [r.as_dict() for r in records],
    }
    if documents is not None:
        summary["documents"] = documents
    if jobs is not None:
        summary["jobs"] = jobs
    if fatal:
        summary["error"] = fatal
    return summary


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / SUMMARY_NAME, _json_bytes(summary))
    return out / SUMMARY_NAME


def print_summary(summary: dict[str, Any], out: Path, stream) -> None:
    per_page = summary["seconds_per_page"]
    rate = f", {per_page:.2f} s/page" if per_page is not None else ""
    if summary["pages_per_second"] is not None and (summary["concurrency"] or 1) > 1:
        rate += f", {summary['pages_per_second']:.2f} pages/s with {summary['concurrency']} in flight"
    retried = f", {summary['rescaled_retries']} asked again at a smaller scale" if summary["rescaled_retries"] else ""
    print(f"pages: {summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped, "
          f"{summary['repaired']} repaired{retried} (of {summary['pages']}) in {summary['seconds_total']:.1f} s{rate}",
          file=stream)
    for failure in summary["failures"]:
        where = failure["input"] + (f" page {failure['page']}" if failure["page"] is not None else "")
        error = failure["error"] or ""
        print(f"  FAILED {where}: {error.removeprefix(failure['input'] + ': ')}", file=stream)
    documents = summary.get("documents")
    if documents is not None:
        failed = f", {len(documents['failed'])} failed" if documents["failed"] else ""
        print(f"documents: {documents['written']} written (document.md, document.json, figures/){failed}", file=stream)
        for failure in documents["failed"]:
            print(f"  FAILED document of {failure['input']}: {failure['error']}", file=stream)
    jobs = summary.get("jobs")
    if jobs is not None:
        reattached = sum(bool(job["reattached"]) for job in jobs)
        print(f"jobs: {len(jobs) - reattached} submitted, {reattached} re-attached", file=stream)
    print(f"results in {out} (summary: {out / SUMMARY_NAME})", file=stream)
