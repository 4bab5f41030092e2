"""``dots-ocr-client``: run a folder of images and PDFs through dots-ocr-server.

Every page becomes one ``POST /ocr`` request with one image (a PDF page is rendered here and sent
as a PNG), ``--concurrency`` pages in flight at a time (default: the server's ``max_batch_size``).
Results land in ``OUT/<input name>/page_NNNN/`` (see :mod:`ocr_client.outputs`); a page whose
``response.json`` exists is skipped on the next run (``--force`` redoes it). With a layout prompt
type, each input whose pages are all done also gets its document in ``OUT/<input name>/``
(``document.md``, ``document.json``, ``figures/``; see :mod:`.documents`).

With ``--jobs``, every input is uploaded whole as one document job (``POST /jobs``),
``--concurrency`` jobs followed at a time, and its result downloaded into the same folders
(see :mod:`.jobs`); a stopped run re-attaches to its jobs when it is run again.

The run ends with a summary (also ``OUT/summary.json``). Exit codes: 0 all pages done,
1 some page failed (with ``--jobs`` also: the server refused a document), 2 the run could not go
on (server unreachable, API key refused, bad arguments, nothing to do, ``--jobs`` against a server
without jobs), 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from image_utils.policy import DEFAULT_PDF_DPI, MAX_PDF_DPI, MIN_PDF_DPI
from model_runner.prompts import (
    GROUNDING_PROMPT_TYPE,
    LAYOUT_PROMPT_TYPES,
    PROMPT_TYPES,
    QUESTION_PROMPT_TYPES,
)

from .batch import PageTask, Progress, RequestOptions, RunControl, process_page, run_pages
from .documents import InputDocuments
from .errors import FatalError
from .http_client import API_KEY_ENV, OCRClient
from .inputs import InputFile, assign_names, collect_inputs, label
from .jobs import JobOptions, run_jobs
from .outputs import PageRecord, build_summary, is_done, page_dir, print_summary, write_summary

__all__ = ["main", "build_parser", "batch_prompt_types"]

DEFAULT_SERVER = "http://127.0.0.1:5000"
DEFAULT_OUT = "./ocr_output"
MIN_DPI, MAX_DPI = MIN_PDF_DPI, MAX_PDF_DPI
MAX_CONCURRENCY = 256

EXIT_OK, EXIT_FAILED, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 2, 130
JOBS_UNUSED_FLAGS = ("stream", "skip_headers_footers", "no_rescaled_retry")
JOBS_UNUSED_HINTS = {
    "skip_headers_footers": " (page.md is the page of the document: headers and footers are left out unless "
                            "--keep-headers)",
    "no_rescaled_retry": " (the server retries a page as its --job-page-retries says)",
}


def batch_prompt_types() -> tuple[str, ...]:
    """The prompt types a batch client can ask for: all but those that need a per-page input
    (a grounding box)."""
    return tuple(p for p in PROMPT_TYPES if p != GROUNDING_PROMPT_TYPE)


def _ranged(kind, low=None, high=None, low_open=False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and value > high):
            bound = f"{'>' if low_open else '>='} {low}" if low is not None else ""
            bound += (" and " if bound and high is not None else "") + (f"<= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}: {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dots-ocr-client",
        description="Send images and PDFs (files or folders) to a dots-ocr-server and save, per page, "
                    "response.json, layout.json, page.md and page.png under OUT/<input>/page_NNNN/.",
        epilog="Exit codes: 0 all pages done, 1 some page failed, 2 could not run "
               "(server unreachable, API key refused, bad arguments, nothing to do), 130 interrupted.",
    )
    add = parser.add_argument
    add("inputs", nargs="+", metavar="INPUT",
        help="image or PDF files (recognised by content) and folders (searched recursively)")
    add("--server", metavar="URL", default=DEFAULT_SERVER, help=f"server URL (default {DEFAULT_SERVER})")
    add("--out", metavar="DIR", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    add("--prompt-type", default="prompt_layout_all_en", choices=batch_prompt_types(),
        help="what to ask the model (default prompt_layout_all_en)")
    add("--prompt", "--question", dest="prompt", metavar="QUESTION", default=None,
        help="the question asked of every page, for --prompt-type prompt_general (required there)")
    add("--concurrency", metavar="K", type=_ranged(int, 1, MAX_CONCURRENCY), default=None,
        help="pages in flight at once (default: the server's max_batch_size from /health, else 1)")
    add("--stream", action="store_true", help="use streaming responses (NDJSON)")
    add("--dpi", metavar="DPI", type=_ranged(int, MIN_DPI, MAX_DPI), default=DEFAULT_PDF_DPI,
        help=f"PDF rendering resolution, {MIN_DPI}..{MAX_DPI} (default {DEFAULT_PDF_DPI})")
    add("--force", action="store_true", help="redo pages that are already done")
    add("--max-retries", metavar="N", type=_ranged(int, 0), default=8,
        help="retries of a page while the server is busy (HTTP 429) (default 8)")
    add("--retry-wait", metavar="SECONDS", type=_ranged(float, 0), default=1.0,
        help="first wait before a retry in seconds, doubled each time; at least the server's "
             "Retry-After (default 1.0)")
    add("--max-retry-wait", metavar="SECONDS", type=_ranged(float, 0), default=30.0,
        help="longest wait between two retries in seconds (default 30)")
    add("--timeout", metavar="SECONDS", type=_ranged(float, 0, low_open=True), default=600.0,
        help="seconds to wait for the server's answer to one page (default 600)")
    add("--api-key", metavar="KEY", default=os.environ.get(API_KEY_ENV) or None,
        help=f"the server's API key (default: ${API_KEY_ENV})")
    add("--temperature", metavar="T", type=_ranged(float, 0), default=None,
        help="sampling temperature (default: the server's for the prompt type: 0.1, 0.9 for prompt_image_to_svg)")
    add("--top-p", metavar="P", type=_ranged(float, 0, 1, low_open=True), default=None,
        help="nucleus sampling (default: the server's, 1.0)")
    add("--max-new-tokens", metavar="N", type=_ranged(int, 1), default=None,
        help="longest answer per page in tokens (default: the server's, 12000)")
    add("--skip-headers-footers", action="store_true",
        help="leave page headers and footers out of page.md (layout prompt types)")
    add("--logprobs", action="store_true",
        help="ask for every token's log-probability and save them per page in logprobs.json")
    add("--top-logprobs", metavar="K", type=_ranged(int, 1, 5), default=None,
        help="with --logprobs: also the K most likely tokens at each step, 1..5")
    add("--keep-headers", action="store_true",
        help="keep page headers and footers in document.md (layout prompt types)")
    add("--chunks", action="store_true",
        help="also write chunks.jsonl per input: heading-aware chunks for retrieval (layout prompt types)")
    add("--no-rescaled-retry", action="store_true",
        help="do not ask again, at 0.95 of the image size, for a page whose answer looped (repetition guard) "
             "or held no layout JSON (layout prompt types)")
    add("--no-progress", action="store_true", help="no progress bar")
    jobs = parser.add_argument_group("document jobs")
    jobs.add_argument("--jobs", action="store_true",
                      help="upload each input whole as one document job on the server (POST /jobs), follow it, and "
                           "download its result into the same folders; a stopped run re-attaches to its jobs")
    jobs.add_argument("--pages", metavar="SPEC", default=None,
                      help="with --jobs: only these pages of each input, e.g. 1-3,7 (default: every page)")
    return parser


def _plan(items: list[InputFile], out: Path, force: bool) -> tuple[list[Optional[PageRecord]], list[PageTask]]:
    """One record slot per page, in input order: filled now for unusable inputs and done pages
    (skipped), left None for the pages to do, which become tasks."""
    records: list[Optional[PageRecord]] = []
    tasks: list[PageTask] = []
    for item in items:
        if item.kind == "invalid":
            records.append(PageRecord(input=item.label, page=None, status="failed", error=item.error))
            continue
        for page in range(1, item.page_count + 1):
            directory = page_dir(out, item.name, page)
            if is_done(directory) and not force:
                records.append(PageRecord(input=item.label, page=page, status="skipped", dir=label(directory)))
            else:
                tasks.append(PageTask(index=len(records), item=item, page=page, directory=directory))
                records.append(None)
    return records, tasks


def _options(args: argparse.Namespace) -> RequestOptions:
    return RequestOptions(prompt_type=args.prompt_type, dpi=args.dpi, temperature=args.temperature,
                          top_p=args.top_p, max_new_tokens=args.max_new_tokens, stream=bool(args.stream),
                          skip_headers_footers=bool(args.skip_headers_footers), question=args.prompt,
                          logprobs=bool(args.logprobs or args.top_logprobs), top_logprobs=args.top_logprobs,
                          rescaled_retry=not args.no_rescaled_retry)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The combinations argparse cannot check (parser.error exits with 2)."""
    if args.prompt_type in QUESTION_PROMPT_TYPES and not (args.prompt or "").strip():
        parser.error(f"--prompt QUESTION is required with --prompt-type {args.prompt_type}")
    if args.prompt is not None and args.prompt_type not in QUESTION_PROMPT_TYPES:
        parser.error(f"--prompt is only used with --prompt-type {', '.join(QUESTION_PROMPT_TYPES)}")
    if args.pages is not None and not args.jobs:
        parser.error("--pages is only used with --jobs")
    if args.jobs and (args.logprobs or args.top_logprobs):
        parser.error("--logprobs and --top-logprobs are not available with --jobs (a job's result has no "
                     "log-probabilities); run without --jobs")


def _warn_unused(args: argparse.Namespace, say) -> None:
    for flag in ("skip_headers_footers", "keep_headers", "chunks", "no_rescaled_retry", "stream"):
        if not getattr(args, flag):
            continue
        option = "--" + flag.replace("_", "-")
        if args.jobs and flag in JOBS_UNUSED_FLAGS:
            say(f"warning: {option} has no effect with --jobs{JOBS_UNUSED_HINTS.get(flag, '')}")
        elif flag != "stream" and args.prompt_type not in LAYOUT_PROMPT_TYPES:
            say(f"warning: {option} has no effect with {args.prompt_type}")


@dataclasses.dataclass
class RunOutcome:
    """What a run (pages or jobs) leaves for the summary and the exit code."""

    records: list[PageRecord]          # the pages (or inputs) that finished, in input order
    documents: Optional[dict]          # {"written", "failed"}, or None where no document is made
    concurrency: Optional[int]
    fatal: Optional[str] = None
    interrupted: bool = False
    jobs: Optional[list[dict]] = None  # --jobs: {"input", "job_id", "status", "reattached"} per input


def _run_pages(args: argparse.Namespace, client: OCRClient, items: list[InputFile], out: Path, say) -> RunOutcome:
    """The run without --jobs: one /ocr request per page."""
    from tqdm import tqdm

    records, tasks = _plan(items, out, args.force)
    documents = InputDocuments(items, [task.item for task in tasks], out, prompt_type=args.prompt_type,
                               dpi=args.dpi, keep_headers=args.keep_headers, chunks=args.chunks, say=say)
    outcome = RunOutcome(records=[], documents=None, concurrency=None)
    bar = tqdm(total=len(records), unit="page", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    progress = Progress(bar)
    progress.advance(len(records) - len(tasks))
    control = RunControl()
    try:
        if tasks:
            # /health before any page starts (so --force deletes nothing while the server is
            # down) and before any page's clock starts (waiting for the model is not page time).
            server_batch = client.max_batch_size()
            outcome.concurrency = args.concurrency or server_batch
            work = functools.partial(process_page, client, _options(args), progress=progress, control=control)
            for task, record in run_pages(tasks, work, outcome.concurrency, control):
                records[task.index] = record
                if record.status == "failed":
                    say(f"FAILED {task.item.label} page {task.page}: {record.error}")
                progress.advance(description=f"{task.item.label} p{task.page}/{task.item.page_count}")
                documents.page_done(task.item, record)
        documents.finish()
    except FatalError as exc:
        outcome.fatal = str(exc)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        control.stop()
        bar.close()
    outcome.records = [record for record in records if record is not None]
    outcome.documents = documents.summary()
    return outcome


def _run_jobs(args: argparse.Namespace, client: OCRClient, items: list[InputFile], out: Path, say) -> RunOutcome:
    """The run with --jobs: one document job per input (see :mod:`.jobs`)."""
    options = JobOptions(prompt_type=args.prompt_type, dpi=args.dpi, temperature=args.temperature,
                         top_p=args.top_p, max_new_tokens=args.max_new_tokens, prompt=args.prompt,
                         pages=args.pages, keep_headers=args.keep_headers, chunks=args.chunks)
    run = run_jobs(client, items, out, options, concurrency=args.concurrency, force=args.force,
                   progress=not args.no_progress, say=say)
    return RunOutcome(records=run.records, documents=run.documents(), concurrency=run.concurrency,
                      fatal=run.fatal, interrupted=run.interrupted, jobs=run.jobs)


def main(argv: Optional[list[str]] = None) -> int:
    """The command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)

    from tqdm import tqdm

    def say(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    _warn_unused(args, say)
    items = collect_inputs(args.inputs, warn=say)
    assign_names(items)
    if not items:
        say("error: no images or PDFs to process")
        return EXIT_FATAL
    for item in items:
        if item.kind == "invalid":
            say(f"FAILED {item.error}")
    out = Path(args.out).expanduser()
    client = OCRClient(args.server, api_key=args.api_key, timeout=args.timeout,
                       max_retries=args.max_retries, retry_wait=args.retry_wait,
                       max_retry_wait=args.max_retry_wait, notify=say)
    started = time.monotonic()
    started_at = _dt.datetime.now().isoformat(timespec="seconds")
    try:
        outcome = (_run_jobs if args.jobs else _run_pages)(args, client, items, out, say)
    finally:
        client.close()
    return _finish(outcome, client, args.prompt_type, out, started, started_at)


def _finish(outcome: RunOutcome, client: OCRClient, prompt_type: str, out: Path, started: float,
            started_at: str) -> int:
    """The summary (printed and in OUT/summary.json) and the exit code."""
    finished, fatal = outcome.records, outcome.fatal
    if fatal and not any(r.status != "skipped" and r.page is not None for r in finished):
        # Not one request got through: leave OUT as it was.
        print(f"error: {fatal}", file=sys.stderr)
        return EXIT_FATAL
    summary = build_summary(finished, server=client.server, prompt_type=prompt_type, out=out,
                            concurrency=outcome.concurrency, started=started, started_at=started_at,
                            retries=client.retries, fatal=fatal or ("interrupted" if outcome.interrupted else None),
                            documents=outcome.documents, jobs=outcome.jobs)
    try:
        write_summary(out, summary)
    except OSError as exc:
        print(f"error: cannot write the summary in {out}: {exc}", file=sys.stderr)
    print_summary(summary, out, sys.stdout)
    if fatal:
        print(f"error: {fatal}", file=sys.stderr)
        return EXIT_FATAL
    if outcome.interrupted:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    documents_failed = bool(outcome.documents and outcome.documents["failed"])
    return EXIT_FAILED if summary["failed"] or documents_failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
