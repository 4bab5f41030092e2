#!/usr/bin/env python
"""Pages per second of the Ray batch job (dots-ocr-batch) with 1 and 2 actors on this machine.

    python scripts/bench_batch.py [--pages 40] [--configs 1x1,2x1] [--new-tokens 32] [--batch-size 2]
    python scripts/bench_batch.py --device cuda --model-path DIR --configs 1x1   # on a GPU machine

A config ``AxC`` is A actors of C CPUs each (CPU), or A GPU actors (cuda; C ignored). Every config
runs the same job on a local Ray (one ``ray.init`` for all): ``--pages`` synthetic pages (distinct
600 x 800 PNGs, so none is skipped as a duplicate), the tiny random checkpoint unless
``--model-path`` is given, a fresh output folder each time. The job is the command line's own
(``batch_job.cli.run``), with the engine wrapped to time when each batch of rows arrives.

Figures per config: ``stage_s`` = the OCR stage from submitting the pages to the last row (actor
start-up and model loading included), ``steady_pages_s`` = pages after the first batch / time from
the first batch to the last (the rate once actors are up). Prints a table naming the machine, then
one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def machine() -> dict:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        info["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
        info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError, AttributeError):
        pass
    import ray
    import torch

    info.update(torch=torch.__version__, ray=ray.__version__,
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return info


def make_pages(folder: Path, count: int) -> None:
    """``count`` distinct synthetic text pages (dark bars of varying length on white)."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for index in range(count):
        image = Image.new("RGB", (600, 800), "white")
        draw = ImageDraw.Draw(image)
        for row in range(18):
            top = 40 + row * 40
            draw.rectangle([40, top, 40 + rng.randint(200, 520), top + 14], fill=(20, 20, 20))
        image.save(folder / f"page_{index:03d}.png")


class TimedEngine:
    """The RayEngine, noting when the OCR stage starts and when each batch of rows arrives."""

    def __init__(self, engine):
        self.engine = engine
        self.start_time = None
        self.arrivals: list[tuple[float, int]] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def ocr(self, pages, settings, actors):
        self.start_time = time.perf_counter()
        for rows in self.engine.ocr(pages, settings, actors):
            self.arrivals.append((time.perf_counter(), len(rows)))
            yield rows


def run_config(folder: Path, out: Path, actors: int, cpus: int, args) -> dict:
    from dots_ocr_server.batch import cli
    from dots_ocr_server.batch.pipeline import RayEngine

    engine = TimedEngine(RayEngine())
    argv = [str(folder), "--out", str(out), "--actors", str(actors), "--cpus-per-actor", str(cpus),
            "--device", args.device, "--max-new-tokens", str(args.new_tokens), "--batch-size", str(args.batch_size),
            "--seed", "0"]
    argv += ["--model-path", args.model_path] if args.model_path else ["--demo"]
    code = cli.main(argv, engine=engine)
    if code != cli.EXIT_OK:
        raise SystemExit(f"the job failed (exit {code})")
    first_time, first_rows = engine.arrivals[0]
    end = engine.arrivals[-1][0]
    pages = sum(n for _, n in engine.arrivals)
    return {"actors": actors, "cpus_per_actor": cpus if args.device == "cpu" else None, "pages": pages,
            "stage_s": round(end - engine.start_time, 2),
            "stage_pages_s": round(pages / (end - engine.start_time), 3),
            "first_batch_s": round(first_time - engine.start_time, 2),
            "steady_pages_s": round((pages - first_rows) / (end - first_time), 3) if end > first_time else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=40)
    parser.add_argument("--configs", default="1x1,2x1", help="comma-separated ACTORSxCPUS (default 1x1,2x1)")
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens per page (default 32)")
    parser.add_argument("--batch-size", type=int, default=2, help="pages per actor batch (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model-path", default=None, help="a checkpoint (default: the tiny random one)")
    args = parser.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]

    import ray

    from dots_ocr_server.batch.pipeline import local_runtime_env

    info = machine()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=local_runtime_env(),
             logging_level="warning")
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
            folder = Path(tmp) / "pages"
            folder.mkdir()
            make_pages(folder, args.pages)
            for index, (actors, cpus) in enumerate(configs):
                results.append(run_config(folder, Path(tmp) / f"out-{index}", actors, cpus, args))
    finally:
        ray.shutdown()

    base = results[0]["steady_pages_s"] or 0
    print(f"\nMachine: {info['cpu']}, {info['cores']} cores, {info.get('ram_gib')} GiB RAM, "
          f"load average {info.get('load_avg_1m_at_start')} at start; GPU: {info['gpu']}; "
          f"torch {info['torch']}, ray {info['ray']}, Python {info['python']}")
    model = "tiny random checkpoint" if not args.model_path else args.model_path
    print(f"Job: {args.pages} pages (600 x 800 PNG), {model}, {args.device}, max {args.new_tokens} new tokens, "
          f"{args.batch_size} pages per actor batch\n")
    print("| actors | CPUs/actor | OCR stage (s) | pages/s, whole stage | first batch (s) | pages/s, steady "
          "| vs first |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['steady_pages_s'] / base:.2f}x" if base and r["steady_pages_s"] else "-"
        print(f"| {r['actors']} | {r['cpus_per_actor'] or '-'} | {r['stage_s']} | {r['stage_pages_s']} | "
              f"{r['first_batch_s']} | {r['steady_pages_s']} | {ratio} |")
    print(json.dumps({"bench": "batch_job", "machine": info, "pages": args.pages, "new_tokens": args.new_tokens,
                      "batch_size": args.batch_size, "device": args.device, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
