"""``dots-ocr-eval olmocr-bench``: olmOCR-bench against a running server, scored by the official
scorer (``python -m olmocr.bench.benchmark``, from ``pip install 'dots-ocr-server[eval]'``).

The bench folder is the benchmark's own layout: ``pdfs/**/*.pdf`` and ``*.jsonl`` test files,
whose lines name a ``pdf`` (relative to ``pdfs/``) and a ``page``. The two halves:

* predictions: every page a test names (and page 1 of a PDF that no test names) is rendered here
  at ``dpi`` (the client's renderer), sent to the server, and its Markdown written where the
  scorer looks for it, ``<folder>/<name>/<pdf without .pdf>_pg<page>_repeat<k>.md``. The Markdown
  is the project's own: ``/ocr``'s ``markdown`` (``postprocess``), or, for ``/v1`` answers, the
  same function the server runs (``layout.postprocess_response``); headers and footers are
  dropped unless asked. Pages already written are kept (``--force`` redoes them), so a stopped run
  resumes; the settings are saved next to them (``predictions.json``).
* scoring: the official scorer runs on that candidate folder in a subprocess; its summary
  (score, bootstrap confidence interval, per test type, per test file, failed tests) is read
  from its output, which is kept in ``scorer.log``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dots_ocr_server.client.batch import RunControl, run_pages
from dots_ocr_server.client.errors import PageError
from dots_ocr_server.client.inputs import InputFile, classify

from .drivers import Generation
from .pages import page_from_file

__all__ = ["BenchError", "BenchTask", "bench_tasks", "check_scorer", "page_markdown", "parse_scorer_output",
           "run_predictions", "run_scorer", "scorer_missing"]

SCORER_MODULE = "olmocr.bench.benchmark"
INSTALL_HINT = "pip install 'dots-ocr-server[eval]'   (or: pip install 'olmocr[bench]')"
#: What the scorer imports beyond olmocr itself (the [bench] extra).
_SCORER_IMPORTS = ("olmocr", "rapidfuzz", "fuzzysearch", "bs4", "pypdf", "playwright")
PREDICTIONS_NAME = "predictions.json"
SCORER_LOG = "scorer.log"


class BenchError(Exception):
    """The benchmark cannot run (no bench folder, no scorer, the scorer failed)."""


# ---------------------------------------------------------------------------------------------
# The bench folder
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchTask:
    pdf: str        # relative to pdfs/, with "/" (as the test files name it)
    page: int       # 1-based
    repeat: int     # 1-based
    target: Path    # the Markdown file the scorer reads


def _pdf_files(folder: Path) -> list[str]:
    pdfs = folder / "pdfs"
    if not pdfs.is_dir():
        raise BenchError(f"{folder} is not an olmOCR-bench folder: it has no pdfs/ folder")
    names = sorted(p.relative_to(pdfs).as_posix() for p in pdfs.rglob("*.pdf") if p.is_file())
    if not names:
        raise BenchError(f"no PDF files in {pdfs}")
    return names


def _tested_pages(folder: Path) -> dict[str, set[int]]:
    """{pdf: pages} named by the test files (``*.jsonl`` at the folder's top, as the scorer reads)."""
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise BenchError(f"no .jsonl test files in {folder}")
    pages: dict[str, set[int]] = {}
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                test = json.loads(line)
                pages.setdefault(str(test["pdf"]), set()).add(int(test["page"]))
            except (ValueError, KeyError, TypeError):
                raise BenchError(f"{path.name} line {number}: not a test with 'pdf' and 'page'") from None
    return pages


def candidate_file(folder: Path, name: str, pdf: str, page: int, repeat: int) -> Path:
    """Where the scorer reads page ``page`` of ``pdf``, repeat ``repeat``, for candidate ``name``."""
    return folder / name / f"{pdf.removesuffix('.pdf')}_pg{page}_repeat{repeat}.md"


def bench_tasks(folder: Path, name: str, repeats: int = 1) -> list[BenchTask]:
    """Every page to predict, in order: the pages the tests name, page 1 of untested PDFs."""
    tested = _tested_pages(folder)
    tasks = []
    for pdf in _pdf_files(folder):
        for page in sorted(tested.get(pdf) or {1}):
            for repeat in range(1, repeats + 1):
                tasks.append(BenchTask(pdf, page, repeat, candidate_file(folder, name, pdf, page, repeat)))
    return tasks


# ---------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------


def page_markdown(text: str, prompt_type: str, size: tuple[int, int], skip_headers_footers: bool) -> str:
    """A page's Markdown from the model's raw answer, as the server builds it for ``postprocess``.
    The boxes' pixel space does not matter here (pictures are references, never crops), so the
    answer's own size stands for both sizes."""
    from dots_ocr_server.layout import postprocess_response

    processed = postprocess_response(text, prompt_type=prompt_type, model_size=size, original_size=size,
                                     skip_headers_footers=skip_headers_footers, picture_mode="ref")
    markdown = processed.get("markdown")
    return markdown if isinstance(markdown, str) else text.strip()


def _write_text_atomic(path: Path, text: str) -> None:
    """Write next to ``path``, then rename over it: a stopped run never leaves half a file that a
    resumed run would take as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_predictions(folder: Path, name: str, driver, gen: Generation, *, dpi: int, repeats: int,
                    concurrency: int, force: bool = False, progress: bool = True,
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the candidate's Markdown for every page (see the module docstring); the summary."""
    from tqdm import tqdm

    tasks = bench_tasks(folder, name, repeats)
    todo = [task for task in tasks if force or not task.target.exists()]
    inputs: dict[str, InputFile] = {}
    inputs_lock = threading.Lock()

    def item_of(pdf: str) -> InputFile:
        with inputs_lock:  # repeats of a PDF share one look at it
            if pdf not in inputs:
                inputs[pdf] = classify(folder / "pdfs" / pdf)
            return inputs[pdf]

    def work(task: BenchTask) -> dict[str, Any]:
        item = item_of(task.pdf)
        try:
            if item.kind != "pdf":
                raise PageError(item.error or "not a PDF")
            image = page_from_file(item, task.page, dpi, keep=False).image()
            answer = driver.send(image, gen)
            markdown = answer.markdown if answer.markdown is not None else page_markdown(
                answer.text, gen.prompt_type, image.size, gen.skip_headers_footers)
            _write_text_atomic(task.target, markdown)
        except PageError as exc:
            return {"pdf": task.pdf, "page": task.page, "repeat": task.repeat, "error": str(exc)}
        return {}

    started = time.monotonic()
    failed: list[dict[str, Any]] = []
    with tqdm(total=len(todo), unit="page", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for _task, outcome in run_pages(todo, work, concurrency, RunControl()):
            if outcome:
                failed.append(outcome)
                say(f"FAILED {outcome['pdf']} page {outcome['page']}: {outcome['error']}")
            bar.update(1)
    return {"pages": len(tasks), "written": len(todo) - len(failed), "kept": len(tasks) - len(todo),
            "failed": failed, "seconds": round(time.monotonic() - started, 3)}


def save_settings(folder: Path, name: str, settings: dict[str, Any]) -> None:
    _write_text_atomic(folder / name / PREDICTIONS_NAME, json.dumps(settings, indent=2, ensure_ascii=False))


def load_settings(folder: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((folder / name / PREDICTIONS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# The official scorer
# ---------------------------------------------------------------------------------------------


def scorer_missing() -> list[str]:
    """The modules of the scorer that cannot be imported here ([] when it is installed)."""
    return [module for module in _SCORER_IMPORTS if importlib.util.find_spec(module) is None]


def check_scorer() -> None:
    """BenchError naming the extra to install when the scorer is not there."""
    missing = scorer_missing()
    if missing:
        raise BenchError(f"the olmOCR-bench scorer is not installed (missing: {', '.join(missing)}); "
                         f"install it with: {INSTALL_HINT}")


def scorer_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("olmocr")
    except PackageNotFoundError:
        return None


def scorer_command(folder: Path, name: str, bootstrap_samples: int, chromium: str | None) -> list[str]:
    """``python -m olmocr.bench.benchmark ...``; with ``chromium``, the same scorer through
    ``scorer_main``, which makes Playwright launch that browser for the math tests."""
    arguments = ["--dir", str(folder), "--candidate", name, "--bootstrap_samples", str(bootstrap_samples)]
    if chromium:
        return [sys.executable, "-m", "dots_ocr_server.eval.scorer_main", chromium, *arguments]
    return [sys.executable, "-m", SCORER_MODULE, *arguments]


def run_scorer(folder: Path, name: str, *, bootstrap_samples: int = 1000, chromium: str | None = None,
               timeout_s: float | None = None) -> dict[str, Any]:
    """The official scorer on candidate ``name``; its summary (``parse_scorer_output``), with the
    command and where its output was kept. A candidate that lacks a page's Markdown gets no score
    from it (the scorer's rule), only errors naming the page: rerun the predictions (they resume).
    ``chromium``: the browser for the math tests (default: Playwright's own download)."""
    check_scorer()
    if not (folder / name).is_dir():
        raise BenchError(f"no candidate folder {folder / name} (write it first: without --score-only)")
    command = scorer_command(folder, name, bootstrap_samples, chromium)
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = folder / name / SCORER_LOG
    log.write_text(f"$ {' '.join(command)}\n\n{done.stdout}\n--- stderr ---\n{done.stderr}", encoding="utf-8")
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        hint = ("\n  (the math tests render with Chromium: run `python -m playwright install chromium`, "
                "or pass --chromium /usr/bin/chromium)" if "playwright install" in done.stdout + done.stderr else "")
        raise BenchError(f"the scorer failed (exit {done.returncode}; its output is in {log}):\n  "
                         + "\n  ".join(tail) + hint)
    summary = parse_scorer_output(done.stdout, name)
    summary["scorer"] = {"command": command, "olmocr": scorer_version(), "log": str(log)}
    return summary


_CANDIDATE = re.compile(r"^Candidate: (?P<name>.+)$")
_AVERAGE = re.compile(r"^\s+Average Score: (?P<score>[\d.]+)% \(95% CI: \[(?P<low>[\d.]+)%, (?P<high>[\d.]+)%\]\) "
                      r"over (?P<tests>\d+) tests\.")
_SUMMARY = re.compile(r"^(?P<name>\S.*?)\s*: Average Score: (?:FAILED \(errors\)|(?P<score>[\d.]+)%)")
_TEST_TYPE = re.compile(r"^ {4}(?P<type>\S+)\s*: (?P<score>[\d.]+)% average pass rate over (?P<tests>\d+) tests")
_TEST_FILE = re.compile(r"^ {8}(?P<file>\S.*?)\s*: (?P<score>[\d.]+)% \((?P<passed>\d+)/(?P<total>\d+) tests\)")
_ERROR = re.compile(r"^\s+\[ERROR\] (?P<message>.*)$")
_FAIL = re.compile(r"^\s+\[FAIL\] Test (?P<id>.+?) on ")


def parse_scorer_output(stdout: str, name: str) -> dict[str, Any]:
    """The scorer's printed summary for candidate ``name`` as data (percentages as printed, one
    decimal). The score is the scorer's: the mean of the per-test-file pass rates."""
    result: dict[str, Any] = {"candidate": name, "score": None, "ci95": None, "tests": None,
                              "by_test_type": {}, "by_test_file": {}, "failed_tests": [], "errors": []}
    section = None  # "candidate" (its own lines) or "summary" (the final summary's)
    for line in stdout.splitlines():
        if match := _CANDIDATE.match(line):
            section = "candidate" if match["name"] == name else None
        elif line.startswith("Final Summary"):
            section = "final"
        elif section == "final" and (match := _SUMMARY.match(line)):
            section = "summary" if match["name"] == name else "final"
        elif section == "candidate":
            _candidate_line(line, result)
        elif section == "summary":
            _summary_line(line, result)
    if result["score"] is None and not result["errors"]:
        raise BenchError(f"the scorer printed no score for candidate {name!r}")
    return result


def _candidate_line(line: str, result: dict[str, Any]) -> None:
    if match := _AVERAGE.match(line):
        result["score"] = float(match["score"])
        result["ci95"] = [float(match["low"]), float(match["high"])]
        result["tests"] = int(match["tests"])
    elif match := _ERROR.match(line):
        result["errors"].append(match["message"])
    elif match := _FAIL.match(line):
        result["failed_tests"].append(match["id"])


def _summary_line(line: str, result: dict[str, Any]) -> None:
    if match := _TEST_TYPE.match(line):
        result["by_test_type"][match["type"]] = {"score": float(match["score"]), "tests": int(match["tests"])}
    elif match := _TEST_FILE.match(line):
        result["by_test_file"][match["file"]] = {"score": float(match["score"]), "passed": int(match["passed"]),
                                                 "total": int(match["total"])}


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report for people: the score, then a line per test type and per test file."""
    from .report import aligned_table

    if report.get("score") is None:
        return [f"olmOCR-bench, candidate {report['candidate']}: no score (the scorer reported errors)",
                *(f"  {error}" for error in report.get("errors", [])[:10])]
    low, high = report["ci95"]
    head = (f"olmOCR-bench, candidate {report['candidate']}: {report['score']:.1f}% "
            f"(95% CI {low:.1f}-{high:.1f}%) over {report['tests']} tests")
    lines = [head, ""]
    rows = [[kind, f"{v['score']:.1f}%", str(v["tests"])] for kind, v in sorted(report["by_test_type"].items())]
    lines += aligned_table(["test type", "pass rate", "tests"], rows, left=1)
    rows = [[file, f"{v['score']:.1f}%", f"{v['passed']}/{v['total']}"]
            for file, v in sorted(report["by_test_file"].items())]
    lines += ["", *aligned_table(["test file", "pass rate", "passed"], rows, left=1)]
    return lines
