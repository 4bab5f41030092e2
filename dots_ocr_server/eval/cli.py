"""``dots-ocr-eval``: measure a deployment over HTTP (also ``python -m dots_ocr_server.eval``).

  olmocr-bench BENCH_DIR   olmOCR-bench: predictions from a server, scored by the official scorer
  compare INPUT...         the same pages from two setups (servers or saved answers): do they agree?
  throughput INPUT...      pages/s, tokens/s, TTFT and latency of one or more servers

Exit codes: 0 done; 1 done, but pages failed (or, with ``compare --expect-identical``, answers
differ); 2 could not run (bad arguments, server unreachable, API key refused, no scorer).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
from pathlib import Path
from typing import Any

from dots_ocr_server.client.cli import batch_prompt_types
from dots_ocr_server.client.errors import FatalError, PageError
from dots_ocr_server.client.http_client import API_KEY_ENV
from image_utils.policy import DEFAULT_PDF_DPI, MAX_PDF_DPI, MIN_PDF_DPI
from model_runner.defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from model_runner.prompts import LAYOUT_PROMPT_TYPES, QUESTION_PROMPT_TYPES

from . import compare, olmocr_bench, throughput
from .drivers import APIS, Generation, make_driver
from .machine import machine_info, machine_line, print_result
from .pages import collect_pages
from .report import write_json

__all__ = ["build_parser", "main"]

DEFAULT_SERVER = "http://127.0.0.1:5000"
EXIT_OK, EXIT_FAILED, EXIT_FATAL = 0, 1, 2


def _ranged(kind, low=None, high=None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be within [{low}, {high}]: {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _target(text: str) -> throughput.Target:
    try:
        return throughput.parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_connection(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--api-key", metavar="KEY", default=os.environ.get(API_KEY_ENV) or None,
        help=f"the servers' API key (default: ${API_KEY_ENV})")
    add("--model", metavar="NAME", default=None,
        help="model name sent to an OpenAI-compatible server (default: the first of its GET /v1/models)")
    add("--timeout", metavar="SECONDS", type=_ranged(float, 1), default=600.0,
        help="seconds to wait for one page's answer (default 600)")
    add("--max-retries", metavar="N", type=_ranged(int, 0), default=8,
        help="retries of a page while a server is busy (HTTP 429) (default 8)")
    add("--no-progress", action="store_true", help="no progress bar")


def _add_generation(parser: argparse.ArgumentParser, *, prompt_types, prompt_type: str, temperature: float,
                    max_new_tokens: int) -> None:
    add = parser.add_argument
    add("--prompt-type", default=prompt_type, choices=prompt_types, help=f"what to ask (default {prompt_type})")
    add("--prompt", "--question", dest="question", metavar="QUESTION", default=None,
        help="the question, for --prompt-type prompt_general")
    add("--temperature", metavar="T", type=_ranged(float, 0, 2), default=temperature,
        help=f"sampling temperature, 0 = greedy (default {temperature:g})")
    add("--top-p", metavar="P", type=_ranged(float, 1e-6, 1), default=DEFAULT_TOP_P,
        help=f"nucleus sampling (default {DEFAULT_TOP_P:g})")
    add("--max-new-tokens", metavar="N", type=_ranged(int, 1), default=max_new_tokens,
        help=f"longest answer per page in tokens (default {max_new_tokens})")
    add("--dpi", metavar="DPI", type=_ranged(int, MIN_PDF_DPI, MAX_PDF_DPI), default=DEFAULT_PDF_DPI,
        help=f"PDF rendering resolution (default {DEFAULT_PDF_DPI}, as the server's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dots-ocr-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser("olmocr-bench", help="olmOCR-bench predictions and the official score",
                                description=olmocr_bench.__doc__.split("\n\n")[0])
    bench.add_argument("folder", metavar="BENCH_DIR", help="the bench folder (pdfs/ and the *.jsonl test files)")
    bench.add_argument("--server", metavar="URL", default=DEFAULT_SERVER, help=f"default {DEFAULT_SERVER}")
    bench.add_argument("--api", choices=APIS, default="ocr", help="POST /ocr (default) or /v1/chat/completions")
    bench.add_argument("--name", default="dots_ocr_server",
                       help="the candidate's folder under BENCH_DIR (default dots_ocr_server)")
    _add_generation(bench, prompt_types=LAYOUT_PROMPT_TYPES + ("prompt_ocr",), prompt_type="prompt_layout_all_en",
                    temperature=DEFAULT_TEMPERATURE, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    bench.add_argument("--keep-headers-footers", action="store_true",
                       help="keep Page-header and Page-footer cells in the Markdown (dropped by default)")
    bench.add_argument("--repeats", type=_ranged(int, 1, 20), default=1,
                       help="answers per page (the scorer averages them; default 1)")
    bench.add_argument("--concurrency", metavar="K", type=_ranged(int, 1, 256), default=None,
                       help="pages in flight (default: the server's max_batch_size, else 1)")
    bench.add_argument("--force", action="store_true", help="redo pages whose Markdown is already written")
    halves = bench.add_mutually_exclusive_group()
    halves.add_argument("--predictions-only", action="store_true", help="write the Markdown, do not score")
    halves.add_argument("--score-only", action="store_true", help="score the candidate folder written earlier")
    bench.add_argument("--bootstrap-samples", type=_ranged(int, 10), default=1000,
                       help="the scorer's bootstrap samples for the confidence interval (default 1000)")
    bench.add_argument("--chromium", metavar="PATH", default=os.environ.get("DOTS_OCR_CHROMIUM") or None,
                       help="the browser the scorer's math tests render with (default: $DOTS_OCR_CHROMIUM, else "
                            "Playwright's own download); offline, e.g. Debian's /usr/bin/chromium")
    bench.add_argument("--label", default=None, help="free text saved in the report (e.g. 'bf16, fast path')")
    bench.add_argument("--json-out", metavar="FILE", default=None,
                       help="the report (default BENCH_DIR/NAME/report.json)")
    _add_connection(bench)

    comp = commands.add_parser("compare", help="the same pages from two setups: identical? how far apart?",
                               description=compare.__doc__.split("\n\n")[0])
    comp.add_argument("inputs", nargs="+", metavar="INPUT", help="image or PDF files and folders")
    for side in ("a", "b"):
        group = comp.add_mutually_exclusive_group(required=True)
        group.add_argument(f"--{side}", metavar="URL", help=f"side {side.upper()}: a running server")
        group.add_argument(f"--{side}-answers", metavar="DIR",
                           help=f"side {side.upper()}: answers saved earlier (dots-ocr-client's folder layout)")
        comp.add_argument(f"--{side}-api", choices=APIS, default="ocr", help=f"side {side.upper()}'s API (default ocr)")
        comp.add_argument(f"--save-{side}", metavar="DIR", default=None,
                          help=f"also save side {side.upper()}'s answers there (to compare against later)")
    _add_generation(comp, prompt_types=batch_prompt_types(), prompt_type="prompt_layout_all_en", temperature=0.0,
                    max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    comp.add_argument("--concurrency", metavar="K", type=_ranged(int, 1, 256), default=1,
                      help="pages in flight (default 1)")
    comp.add_argument("--iou-match", type=_ranged(float, 0.01, 1), default=compare.DEFAULT_IOU_MATCH,
                      help=f"least IoU for two layout cells to match (default {compare.DEFAULT_IOU_MATCH})")
    comp.add_argument("--expect-identical", action="store_true", help="exit 1 unless every page is identical")
    comp.add_argument("--json-out", metavar="FILE", default=None,
                      help="also write the report there as JSON ('-': standard output, after the table)")
    _add_connection(comp)

    load = commands.add_parser("throughput", help="pages/s, tokens/s, TTFT and latency of running servers",
                               description=throughput.__doc__.split("\n\n")[0])
    load.add_argument("inputs", nargs="+", metavar="INPUT", help="image or PDF files and folders (the pages sent)")
    load.add_argument("--target", metavar="API=URL", type=_target, action="append", default=None,
                      help="a server to drive (repeatable: measured one after the other), e.g. "
                           "ocr=http://127.0.0.1:5000 or openai=http://127.0.0.1:8000")
    load.add_argument("--server", metavar="URL", default=None, help="one server (with --api), instead of --target")
    load.add_argument("--api", choices=APIS, default="ocr", help="the API of --server (default ocr)")
    load.add_argument("--concurrency", metavar="K", type=_ranged(int, 1, 1024), default=None,
                      help="requests in flight (default: each server's max_batch_size, else 1)")
    amount = load.add_mutually_exclusive_group()
    amount.add_argument("--pages", dest="count", metavar="N", type=_ranged(int, 1), default=None,
                        help="requests per target (default 32)")
    amount.add_argument("--duration", dest="duration_s", metavar="SECONDS", type=_ranged(float, 0.1), default=None,
                        help="send for this long per target (requests in flight then finish)")
    load.add_argument("--warmup", metavar="N", type=_ranged(int, 0), default=2,
                      help="uncounted requests per target first (default 2)")
    load.add_argument("--fixed-length", choices=("auto", "on", "off"), default="auto",
                      help="ask for ignore_eos: auto (when the server takes it), on (or fail), off")
    load.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                      help="streamed requests (client-side TTFT; default); --no-stream: plain")
    _add_generation(load, prompt_types=batch_prompt_types(), prompt_type="prompt_layout_all_en", temperature=0.0,
                    max_new_tokens=512)
    load.add_argument("--json-out", metavar="FILE", default=None, help="also write the JSON line there")
    _add_connection(load)
    return parser


def _generation(args: argparse.Namespace, **extra: Any) -> Generation:
    return Generation(prompt_type=args.prompt_type, question=args.question, temperature=args.temperature,
                      top_p=args.top_p, max_new_tokens=args.max_new_tokens, **extra)


def _check_question(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.prompt_type in QUESTION_PROMPT_TYPES and not (args.question or "").strip():
        parser.error(f"--prompt QUESTION is required with --prompt-type {args.prompt_type}")
    if args.question is not None and args.prompt_type not in QUESTION_PROMPT_TYPES:
        parser.error(f"--prompt is only used with --prompt-type {', '.join(QUESTION_PROMPT_TYPES)}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _driver(args: argparse.Namespace, api: str, url: str):
    return make_driver(api, url, api_key=args.api_key, timeout=args.timeout, max_retries=args.max_retries,
                       model=args.model, notify=_say)


# ---------------------------------------------------------------------------------------------
# olmocr-bench
# ---------------------------------------------------------------------------------------------


def run_olmocr_bench(args: argparse.Namespace) -> int:
    folder = Path(args.folder).expanduser()
    report_path = Path(args.json_out) if args.json_out else folder / args.name / "report.json"
    if not args.predictions_only:
        olmocr_bench.check_scorer()  # before hours of predictions, not after
    report: dict[str, Any] = {"benchmark": "olmOCR-bench", "folder": str(folder), "candidate": args.name}
    failed = 0
    if not args.score_only:
        gen = _generation(args, markdown=True, skip_headers_footers=not args.keep_headers_footers)
        driver = _driver(args, args.api, args.server)
        try:
            health = driver.health()
            concurrency = args.concurrency or driver.client.max_batch_size()
            settings = {**driver.describe(), "health": health, "label": args.label, "dpi": args.dpi,
                        "repeats": args.repeats, "concurrency": concurrency, **gen.settings(),
                        "started_at": _dt.datetime.now().isoformat(timespec="seconds")}
            predictions = olmocr_bench.run_predictions(folder, args.name, driver, gen, dpi=args.dpi,
                                                       repeats=args.repeats, concurrency=concurrency,
                                                       force=args.force, progress=not args.no_progress, say=_say)
        finally:
            driver.close()
        olmocr_bench.save_settings(folder, args.name, {**settings, "predictions": predictions})
        report["predictions"] = predictions
        failed = len(predictions["failed"])
        _say(f"predictions: {predictions['written']} written, {predictions['kept']} kept from an earlier run, "
             f"{failed} failed, of {predictions['pages']} in {folder / args.name}")
    report["settings"] = olmocr_bench.load_settings(folder, args.name)
    if not args.predictions_only:
        summary = olmocr_bench.run_scorer(folder, args.name, bootstrap_samples=args.bootstrap_samples,
                                          chromium=args.chromium)
        report.update(summary)
        print("\n".join(olmocr_bench.summary_lines(report)))
        failed += len(summary["errors"])
    report["machine"] = machine_info()
    write_json(report_path, report)
    _say(f"report: {report_path}")
    return EXIT_FAILED if failed else EXIT_OK


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


def _side(args: argparse.Namespace, side: str):
    answers = getattr(args, f"{side}_answers")
    if answers:
        return compare.SavedSide(Path(answers).expanduser())
    save = getattr(args, f"save_{side}")
    return compare.ServerSide(_driver(args, getattr(args, f"{side}_api"), getattr(args, side)),
                              Path(save).expanduser() if save else None)


def run_compare(args: argparse.Namespace) -> int:
    pages, errors = collect_pages(args.inputs, args.dpi, warn=_say)
    for error in errors:
        _say(f"FAILED {error}")
    if not pages:
        _say("error: no pages to compare")
        return EXIT_FATAL
    gen = _generation(args, tokens=True)
    side_a, side_b = _side(args, "a"), _side(args, "b")
    try:
        described = side_a.describe(), side_b.describe()
        rows = compare.run_compare(pages, side_a, side_b, gen, concurrency=args.concurrency,
                                   iou_match=args.iou_match, progress=not args.no_progress)
    finally:
        side_a.close()
        side_b.close()
    report = {"a": described[0], "b": described[1], "settings": {**gen.settings(), "dpi": args.dpi,
                                                                 "iou_match": args.iou_match},
              "pages": rows, "totals": compare.summarize(rows), "input_errors": errors}
    print("\n".join(compare.table_lines(report)))
    write_json(args.json_out, report)
    totals = report["totals"]
    if totals["failed"] or errors:
        return EXIT_FAILED
    if args.expect_identical and totals["identical"] != totals["compared"]:
        return EXIT_FAILED
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# throughput
# ---------------------------------------------------------------------------------------------


def run_throughput(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.target and args.server:
        parser.error("give --target (one or more) or --server, not both")
    targets = args.target or [throughput.Target(args.api, args.server or DEFAULT_SERVER)]
    count = args.count if args.count is not None or args.duration_s is not None else 32
    pages, errors = collect_pages(args.inputs, args.dpi, warn=_say)
    if errors or not pages:
        for error in errors:
            _say(f"FAILED {error}")
        _say("error: every input must be a usable image or PDF" if pages else "error: no pages to send")
        return EXIT_FATAL
    gen = _generation(args, stream=args.stream)
    rows = []
    for target in targets:
        driver = _driver(args, target.api, target.url)
        try:
            _say(f"measuring {target.label} ...")
            row = throughput.measure_target(driver, pages, gen, concurrency=args.concurrency, count=count,
                                            duration_s=args.duration_s, warmup=args.warmup,
                                            fixed_length=args.fixed_length)
        finally:
            driver.close()
        rows.append({"target": target.label, **row})
    info = machine_info()
    label = ", ".join(p.label for p in pages[:4]) + (f" and {len(pages) - 4} more" if len(pages) > 4 else "")
    result = {"machine": info, "machine_line": machine_line(info), "pages": {"count": len(pages), "label": label},
              "settings": {**gen.settings(), "dpi": args.dpi, "count": count, "duration_s": args.duration_s,
                           "warmup": args.warmup, "fixed_length": args.fixed_length}, "targets": rows}
    print_result("\n".join(throughput.table_lines(result)), result, args.json_out)
    return EXIT_FAILED if any(row["errors"] for row in rows) else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "question"):
        _check_question(parser, args)
    try:
        if args.command == "olmocr-bench":
            return run_olmocr_bench(args)
        if args.command == "compare":
            return run_compare(args)
        return run_throughput(args, parser)
    except (FatalError, olmocr_bench.BenchError) as exc:
        _say(f"error: {exc}")
        return EXIT_FATAL
    except PageError as exc:  # a side that cannot answer at all (e.g. no folder of saved answers)
        _say(f"error: {exc}")
        return EXIT_FATAL
    except KeyboardInterrupt:
        _say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
