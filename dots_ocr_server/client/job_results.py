"""A finished job's result (``GET /jobs/<id>/result?format=zip``) written into the client's usual
output folder, ``OUT/<input>/``, so a ``--jobs`` run leaves the same files as a page-by-page run:

- the document files of the ZIP, ``document.md``, ``document.json`` (the server's: the document
  plus the job's fields, and per page its status, attempts, answer and statistics),
  ``figures/`` (cropped by the server) and, with ``--chunks``, ``chunks.jsonl``, written first
  and only when every page of the job is done (an input with a failed page gets no new document, as without ``--jobs``);
- per page done, ``page_NNNN/`` as :func:`.outputs.write_page_outputs` writes it, from the page's
  entry in ``document.json``: ``response.json`` (the answer, its statistics, ``prompt_type``, for
  a PDF ``page``/``page_count``, for the layout prompt types ``layout`` and ``markdown``, for
  scene spotting ``spots`` and for image-to-SVG ``svg``, with ``job``: the job id and the page's
  attempts), ``layout.json`` or ``spots.json`` or ``page.svg``, ``page.md`` and ``page.png``;
- a page that failed (or was cancelled) gets no ``response.json``: it is not done, and the
  summary lists it with the server's reason.

``page.png`` needs the page image, which the result does not carry: it is made here as without
``--jobs`` (an image decoded, a PDF page rendered at ``--dpi`` with the server's loader), and
resized to the page size the server reports if the two differ, so the layout's pixels fit it.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from dots_ocr_server.document.writer import CHUNKS_NAME, FIGURES_DIR, JSON_NAME, MARKDOWN_NAME, write_bytes_atomic
from dots_ocr_server.document.writer import _remove_stale as remove_stale_document_files
from model_runner.prompts import LAYOUT_PROMPT_TYPES, SCENE_SPOTTING_PROMPT_TYPE

from .batch import RunControl
from .errors import PageError
from .inputs import InputFile, label, page_image
from .outputs import MARKER_NAME, PageRecord, page_dir, write_page_outputs

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["JobResult", "WrittenResult", "read_result", "write_result"]

_FIGURE_FILE = re.compile(rf"^{FIGURES_DIR}/page-\d+-fig-\d+\.png$")


@dataclass
class JobResult:
    """The ZIP's content: ``document`` (document.json parsed) and the files to write, by name."""

    document: dict[str, Any]
    files: dict[str, bytes]

    @property
    def pages(self) -> list[dict[str, Any]]:
        return [page for page in self.document.get("pages") or () if isinstance(page, dict)]

    @property
    def complete(self) -> bool:
        """Every page of the job is done."""
        return bool(self.pages) and all(page.get("status") == "done" for page in self.pages)


@dataclass
class WrittenResult:
    """What :func:`write_result` did: a record per page of the job, and the document's fate
    (``document_error`` when writing it failed)."""

    records: list[PageRecord]
    document_written: bool = False
    document_error: Optional[str] = None


def read_result(data: bytes) -> JobResult:
    """The ZIP's ``document.json``, ``document.md``, figures and ``chunks.jsonl`` (when asked for;
    any other entry is left out).
    PageError for a ZIP that cannot be read or has no ``document.json``."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [name for name in archive.namelist()
                     if name in (MARKDOWN_NAME, JSON_NAME, CHUNKS_NAME) or _FIGURE_FILE.match(name)]
            files = {name: archive.read(name) for name in names}
    except (zipfile.BadZipFile, OSError) as exc:
        raise PageError(f"the job's result is not a readable ZIP ({exc})") from None
    if JSON_NAME not in files:
        raise PageError(f"the job's result has no {JSON_NAME}")
    try:
        document = json.loads(files[JSON_NAME])
    except ValueError:
        raise PageError(f"the job's {JSON_NAME} is not JSON") from None
    if not isinstance(document, dict):
        raise PageError(f"the job's {JSON_NAME} is not a JSON object")
    return JobResult(document=document, files=files)


def _write_document(folder: Path, result: JobResult) -> None:
    """The document files, figures first and ``document.json`` last, each atomically; figures and
    ``chunks.jsonl`` of an earlier document that this one does not have are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    order = sorted(result.files, key=lambda name: (name == JSON_NAME, name == MARKDOWN_NAME, name))
    for name in order:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, result.files[name])
    remove_stale_document_files(folder, {name for name in result.files if _FIGURE_FILE.match(name)},
                                chunks=CHUNKS_NAME in result.files)


def page_answer(entry: dict[str, Any], *, item: InputFile, prompt_type: str, model: Optional[str],
                job_id: str) -> dict[str, Any]:
    """``response.json`` of a job's page: the shape of ``/ocr``'s answer (see the module docstring)."""
    answer: dict[str, Any] = {"model": model, "response": entry.get("answer") or "", "prompt_type": prompt_type}
    if item.kind == "pdf":
        answer["page"], answer["page_count"] = entry["page"], item.page_count
    statistics = entry.get("statistics")
    answer.update(statistics if isinstance(statistics, dict) else {})
    if prompt_type in LAYOUT_PROMPT_TYPES:
        answer["layout"] = entry.get("cells") if isinstance(entry.get("cells"), list) else []
    if prompt_type in LAYOUT_PROMPT_TYPES or prompt_type == SCENE_SPOTTING_PROMPT_TYPE:
        answer["markdown"] = entry.get("markdown") if isinstance(entry.get("markdown"), str) else ""
    # what the server made of the answer, as /ocr gives it: the quadrilaterals, the SVG document
    answer.update({key: entry[key] for key in ("spots", "svg", "repaired") if key in entry})
    answer["job"] = {"job_id": job_id, "attempts": entry.get("attempts")}
    return answer


def page_picture(item: InputFile, entry: dict[str, Any], dpi: int) -> "Image.Image":
    """The page as the server saw it (see the module docstring)."""
    from PIL import Image

    image = page_image(item, entry["page"], dpi)
    size = (entry.get("width"), entry.get("height"))
    if all(isinstance(side, int) and side > 0 for side in size) and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _failure(entry: dict[str, Any], job: dict[str, Any]) -> str:
    status = entry.get("status")
    if entry.get("error"):
        return f"{entry['error']} (job {job.get('job_id')}, {entry.get('attempts')} attempt(s))"
    if status == "cancelled" or job.get("status") == "cancelled":
        return f"cancelled on the server (job {job.get('job_id')})"
    return f"not done on the server (page {status}, job {job.get('job_id')})"


def write_result(result: JobResult, item: InputFile, out: Path, *, prompt_type: str, dpi: int,
                 control: RunControl) -> Optional[WrittenResult]:
    """Write ``result`` for ``item`` into ``OUT/<input>/`` (see the module docstring); None when
    the run was stopped before every page was written (the rest is written when it is run again)."""
    folder = out / item.name
    written = WrittenResult(records=[])
    if result.complete:
        try:
            _write_document(folder, result)
            written.document_written = True
        except OSError as exc:
            written.document_error = f"cannot write it in {label(folder)}: {exc}"
    model = (result.document.get("metadata") or {}).get("model")
    job_id = str(result.document.get("job_id"))
    for entry in result.pages:
        directory = page_dir(out, item.name, entry["page"])
        record = PageRecord(input=item.label, page=entry["page"], status="ok", dir=label(directory))
        if entry.get("status") != "done":
            (directory / MARKER_NAME).unlink(missing_ok=True)
            record.status, record.error = "failed", _failure(entry, result.document)
            written.records.append(record)
            continue
        statistics = entry.get("statistics") or {}
        if isinstance(statistics.get("total_duration"), (int, float)):
            record.seconds = round(statistics["total_duration"] / 1e9, 3)
        try:
            answer = page_answer(entry, item=item, prompt_type=prompt_type, model=model, job_id=job_id)
            picture = page_picture(item, entry, dpi)
            if not control.begin_writing():
                return None
            try:
                write_page_outputs(directory, answer, prompt_type, picture)
            finally:
                control.end_writing()
        except PageError as exc:
            record.status, record.error = "failed", str(exc)
        except OSError as exc:
            record.status, record.error = "failed", f"cannot write the results in {record.dir}: {exc}"
        written.records.append(record)
    return written
