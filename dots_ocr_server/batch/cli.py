"""``dots-ocr-batch``: OCR images and PDFs (files, folders, globs; local or s3:// / gs:// ...) on Ray
and write one row per page to Parquet or JSONL shards under ``--out``.

The same command runs on one machine (a local Ray is started) and on a cluster (``RAY_ADDRESS``,
or ``ray job submit -- dots-ocr-batch ...``). Exit codes: 0 every page ok, 1 some page failed,
2 nothing could run (bad arguments, no inputs, no model, Ray missing or the pipeline failed),
130 interrupted. See docs/SCALING.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from image_utils.policy import DEFAULT_PDF_DPI, MAX_PDF_DPI, MIN_PDF_DPI
from model_runner.defaults import DEFAULT_MAX_NEW_TOKENS
from model_runner.prompts import BBOX_PROMPT_TYPES, PROMPT_TYPES, QUESTION_PROMPT_TYPES

from ..document import AssembleOptions
from .actor import JobSettings
from .documents import DOCUMENTS_FOLDER, write_documents
from .inputs import expand_inputs, plan_pages
from .outputs import FORMATS, ShardWriter, Summary, drop_superseded, read_written, shard_files

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILED", "EXIT_FATAL"]

EXIT_OK, EXIT_FAILED, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_MODEL_PATH = "./weights/DotsOCR"  # the server's default
#: Pages generated at once per actor when --batch-size is not given: a GPU has room for a batch
#: (the server's --max-batch-size work); a CPU actor gains little beyond two.
DEFAULT_BATCH = {"cuda": 8, "cpu": 2}

MISSING_MODEL = """\
No dots.ocr checkpoint at {path} (config.json is missing).
Download the weights (python scripts/download_weights.py ./weights/DotsOCR), pass --model-path DIR
(a folder every Ray node can read), or try the job with --demo (tiny random model, no real OCR)."""


def _ranged(kind, low, high=None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            bound = f">= {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}: {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def batch_prompt_types() -> tuple[str, ...]:
    """All prompt types but those that need a box per page."""
    return tuple(p for p in PROMPT_TYPES if p not in BBOX_PROMPT_TYPES)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dots-ocr-batch",
        description="OCR images and PDFs on Ray (a local Ray, or the cluster at RAY_ADDRESS) and write one "
                    "row per page as Parquet or JSONL shards under --out. Rerunning skips pages already "
                    "written.",
        epilog="Exit codes: 0 every page ok, 1 some page failed, 2 nothing could run, 130 interrupted. "
               "See docs/SCALING.md.")
    add = parser.add_argument
    add("inputs", nargs="+", metavar="INPUT",
        help="files, folders (searched recursively) and globs of images and PDFs; local paths or URIs "
             "(s3://, gs://, ... with the fsspec filesystem package installed)")
    add("--out", metavar="DIR", required=True, help="output folder or URI for the shards")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model-path", metavar="DIR", default=None,
                       help=f"checkpoint folder, readable on every node (default {DEFAULT_MODEL_PATH})")
    model.add_argument("--demo", action="store_true",
                       help="each actor builds the tiny RANDOM checkpoint (tests, demos; no real OCR)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="cuda: one GPU per actor; cpu: CPU actors; auto: cuda when Ray sees GPUs (default)")
    add("--actors", metavar="N", type=_ranged(int, 1), default=None,
        help="actors, each holding one model (default: the GPUs Ray sees with cuda, 1 with cpu)")
    add("--batch-size", metavar="N", type=_ranged(int, 1, 256), default=None,
        help="pages one actor generates at once (the runner's max batch size; default "
             f"{DEFAULT_BATCH['cuda']} on cuda, {DEFAULT_BATCH['cpu']} on cpu)")
    add("--cpus-per-actor", metavar="N", type=_ranged(int, 1), default=1,
        help="CPUs reserved by (and torch threads of) each CPU actor (default 1)")
    add("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
        help="auto: bfloat16 on cuda, float32 on cpu")
    add("--prompt-type", choices=batch_prompt_types(), default="prompt_layout_all_en",
        help="what to ask the model (default prompt_layout_all_en)")
    add("--prompt", "--question", dest="question", metavar="TEXT", default=None,
        help="the question, with --prompt-type prompt_general (the /ocr field `prompt`)")
    add("--dpi", metavar="D", type=_ranged(float, MIN_PDF_DPI, MAX_PDF_DPI), default=float(DEFAULT_PDF_DPI),
        help=f"PDF rendering resolution (default {DEFAULT_PDF_DPI}, lowered only for pages too large for the model)")
    add("--max-new-tokens", metavar="N", type=_ranged(int, 1, 131072), default=DEFAULT_MAX_NEW_TOKENS,
        help=f"most tokens generated per page (default {DEFAULT_MAX_NEW_TOKENS})")
    add("--temperature", metavar="T", type=_ranged(float, 0), default=None,
        help="sampling temperature (default: the prompt type's, as the server)")
    add("--seed", metavar="N", type=_ranged(int, 0, 2**64 - 1), default=None,
        help="sampling seed for every page (reproducible runs)")
    add("--postprocess", action="store_true",
        help="also write layout (JSON, original pixels), markdown and repaired, as the server's postprocess; "
             "with a layout prompt type, each input whose pages are all done gets its document in "
             "OUT/_documents/<name>/ (document.md, document.json, figures/)")
    add("--keep-headers", action="store_true",
        help="keep page headers and footers in the documents' Markdown (they are always in document.json)")
    add("--logprobs", action="store_true",
        help="also write the tokens, their logprobs and min/mean token probability")
    add("--format", choices=FORMATS, default="parquet", help="shard format (default parquet)")
    add("--rows-per-shard", metavar="N", type=_ranged(int, 1), default=256,
        help="rows per shard (default 256; a shard is also written after 60 s without one)")
    redo = parser.add_mutually_exclusive_group()
    redo.add_argument("--force", action="store_true", help="redo every page, even those already written")
    redo.add_argument("--retry-failed", action="store_true", help="redo the pages written with an error")
    return parser


def _check_question(parser: argparse.ArgumentParser, args) -> None:
    if args.prompt_type in QUESTION_PROMPT_TYPES and not (args.question or "").strip():
        parser.error(f"--prompt-type {args.prompt_type} needs --prompt (the question)")
    if args.question is not None and args.prompt_type not in QUESTION_PROMPT_TYPES:
        parser.error(f"--prompt goes with --prompt-type {', '.join(QUESTION_PROMPT_TYPES)}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _resolve_device(gpus: int, requested: str) -> str:
    if requested == "cuda" and gpus == 0:
        raise _Fatal("--device cuda, but Ray sees no GPU in the cluster (use --device cpu)")
    if requested == "auto":
        return "cuda" if gpus else "cpu"
    return requested


def _default_actors(gpus: int, device: str) -> int:
    return max(1, gpus) if device == "cuda" else 1


class _Fatal(Exception):
    """The run cannot go on; the message is for the user (exit code 2)."""


def _model_path(args) -> Optional[str]:
    """The checkpoint folder for the actors: made absolute when they run on this machine (a
    cluster's nodes resolve it themselves)."""
    if args.demo:
        return None
    path = args.model_path or DEFAULT_MODEL_PATH
    return path if os.environ.get("RAY_ADDRESS") else os.path.abspath(path)


def _settings(args, device: str) -> JobSettings:
    return JobSettings(
        prompt_type=args.prompt_type, model_path=_model_path(args),
        demo=args.demo, device=device, dtype=args.dtype,
        batch_size=args.batch_size or DEFAULT_BATCH[device], cpus_per_actor=args.cpus_per_actor,
        dpi=args.dpi, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
        question=args.question, postprocess=args.postprocess, logprobs=args.logprobs)


def _check_model(args) -> None:
    """A missing checkpoint is caught before Ray starts when the actors run on this machine
    (with RAY_ADDRESS the path is the nodes' and only they can check it)."""
    if args.demo or os.environ.get("RAY_ADDRESS"):
        return
    path = Path(args.model_path or DEFAULT_MODEL_PATH)
    if not (path / "config.json").is_file():
        raise _Fatal(MISSING_MODEL.format(path=path))


def run(args, engine=None) -> int:
    """The job for parsed arguments; returns the exit code. ``engine``: the Ray side
    (:class:`batch_job.pipeline.RayEngine` by default)."""
    from .pipeline import RayEngine

    started_at = time.perf_counter()
    expansion = expand_inputs(args.inputs)
    for problem in expansion.problems:
        _say(f"warning: {problem}")
    if not expansion.sources:
        raise _Fatal("no input files to process")
    _check_model(args)
    engine = engine if engine is not None else RayEngine()
    engine.start()
    try:
        gpus = engine.gpus()
        device = _resolve_device(gpus, args.device)
        actors = args.actors or _default_actors(gpus, device)
        settings = _settings(args, device)

        # read even with --force: the rows redone replace these (drop_superseded below)
        written = read_written(args.out)
        done = set() if args.force else {key for key, ok in written.items() if ok or not args.retry_failed}
        writer = ShardWriter(args.out, args.format, postprocess=args.postprocess, logprobs=args.logprobs,
                             rows_per_shard=args.rows_per_shard)
        older = shard_files(writer.fs, writer.root)

        _say(f"scanning {len(expansion.sources)} file(s)")
        plan = plan_pages(engine.scan(expansion.sources), args.prompt_type, done, args.question)
        _say(f"[{time.perf_counter() - started_at:.1f} s] {len(plan.pages)} page(s) to do, {plan.skipped} already "
             f"written, {len(plan.failed)} file(s) unusable; {actors} {device} actor(s), "
             f"{settings.batch_size} page(s) per batch")
        writer.add({**row, "prompt_type": args.prompt_type} for row in plan.failed)

        ocr_started = time.perf_counter()
        try:
            for rows in engine.ocr(plan.pages, settings, actors):
                writer.add(rows)
        finally:
            writer.flush()
        ocr_seconds = time.perf_counter() - ocr_started

        superseded = writer.keys & set(written)
        if superseded:
            drop_superseded(args.out, superseded, older)
        documents = write_documents(args.out, settings, AssembleOptions(keep_headers=args.keep_headers))
        if documents:
            _say(f"{len(documents)} document(s) in {args.out.rstrip('/')}/{DOCUMENTS_FOLDER}/")
        summary = Summary(pages_ok=writer.ok, pages_failed=writer.failed, pages_skipped=plan.skipped,
                          seconds=ocr_seconds, total_seconds=time.perf_counter() - started_at, out=args.out,
                          shards=len(writer.shards), actors=actors, device=device)
        summary.write()
        print(summary.text(), flush=True)
        return EXIT_OK if writer.failed == 0 else EXIT_FAILED
    finally:
        engine.stop()


def main(argv: Optional[list[str]] = None, engine=None) -> int:
    from .pipeline import RayMissing

    parser = build_parser()
    args = parser.parse_args(argv)
    _check_question(parser, args)
    try:
        return run(args, engine)
    except (_Fatal, RayMissing) as exc:
        _say(f"error: {exc}")
        return EXIT_FATAL
    except KeyboardInterrupt:
        _say("interrupted; the pages written so far are kept (rerun to resume)")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - Ray's errors (actors that cannot start, a lost node...)
        _say(f"error: the job stopped: {type(exc).__name__}: {exc}\n"
             "the pages written so far are kept; rerun the same command to resume")
        return EXIT_FATAL
