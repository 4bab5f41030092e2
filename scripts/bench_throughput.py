#!/usr/bin/env python
"""Throughput of the real server at several batch sizes: M pages sent concurrently, a table + one JSON line.

Starts one server process (the server's own app, ``server.create_app``, on its own HTTP server, waitress)
server) with ``--max-batch-size`` = the largest batch size asked for, then for each batch size N
sends the same M pages (``/ocr``, ``stream: true``) from N client threads, so that N requests are
in flight and the server decodes them in one batch. Per batch size:

  pages/s          M / wall time of the level
  tok/s            generated tokens of all pages (the done lines' ``eval_count``) / wall time
  latency p50/p95  per request, from sending it to its done line
  TTFT p50         per request, from sending it to its first streamed line (first text)
  max gap          the longest silence between two lines of one running stream (other pages'
                   prefills land between decode steps: a join stalls the others by at most one
                   page's prefill); also the median gap (one decode step, roughly)
  peak RSS         the server process's peak resident memory during the level (VmHWM, reset
                   before each level); on CUDA also ``torch.cuda.max_memory_allocated``

Fixed-length answers: a random model may stop early or loop, so every request asks for
``"ignore_eos": true`` (neither eos nor the repetition guard ends the answer) with greedy
decoding (temperature 0), and every page yields exactly ``--new-tokens`` tokens; the JSON says
whether they all did (``all_fixed_length``).

The same server serves every level, so compile and warm-up happen once; a level of N in flight
keeps at most N rows in the batch (N = 1 runs one request at a time, as the default server does).

Examples:
  python scripts/bench_throughput.py --demo                     # CPU, tiny random checkpoint
  python scripts/bench_throughput.py --random-full-size --device cuda --dtype bfloat16 \\
      --new-tokens 1000 --page-size 1700x2200 --pages 32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for folder in (REPO, REPO / "scripts"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from dots_ocr_server.eval.machine import print_result  # noqa: E402 - after the path set-up
from dots_ocr_server.eval.report import aligned_table, percentile, seconds_text  # noqa: E402 - after the sys.path set-up

DEFAULT_IMAGE = REPO / "samples" / "demo_image2.png"
KEYS = ("batch_size", "pages", "wall_s", "pages_per_s", "tok_per_s", "latency_p50_s", "latency_p95_s",
        "ttft_p50_s", "max_gap_s", "gap_p50_s", "prefill_p50_s", "peak_rss_gib", "new_tokens_total",
        "all_fixed_length")


# ---------------------------------------------------------------------------------------------
# The server process (--serve)
# ---------------------------------------------------------------------------------------------


def _peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def add_memory_routes(app) -> None:
    """GET /_bench/memory: the process's peak RSS (and CUDA peak); POST /_bench/reset: restart both."""
    import torch
    from flask import jsonify

    @app.get("/_bench/memory")
    def bench_memory():
        body = {"peak_rss_bytes": _peak_rss_bytes()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            body["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        return jsonify(body)

    @app.post("/_bench/reset")
    def bench_reset():
        try:  # "5" resets the peak RSS (VmHWM) of this process (Linux)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        return jsonify({"reset": True})


def serve(argv: list[str]) -> int:
    """Server flags (as server.py's) plus --random-full-size (the released sizes, random weights)."""
    import dataclasses
    import logging

    import server

    random_full_size = "--random-full-size" in argv
    config = server.parse_args([a for a in argv if a != "--random-full-size"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server.apply_process_settings(config)
    from model_runner.runner import ModelRunner

    if random_full_size:
        from bench_pipeline import build_random_full_size
        from model_runner.processing import load_processor
        from model_runner.loading import resolve_attention, resolve_device, resolve_dtype

        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        llm_attn, vision_attn = resolve_attention(config.attn_implementation, device)
        model, folder = build_random_full_size(device, dtype, llm_attn, vision_attn,
                                               Path(tempfile.mkdtemp(prefix="bench-throughput-")))
        runner = ModelRunner.from_model(model, load_processor(folder), model_path=folder, compile=config.compile,
                                         max_batch_size=config.max_batch_size,
                                         max_new_tokens_limit=config.max_new_tokens_limit,
                                         repetition_window=config.repetition_window)
    else:
        if config.demo:  # built by the app's loader, as server.py --demo does
            folder = Path(tempfile.mkdtemp(prefix="bench-throughput-")) / "DotsOCR-tiny-random"
            config = dataclasses.replace(config, model_path=str(folder))
        runner = ModelRunner.from_config(config)
    app = server.create_app(config, runner=runner)
    add_memory_routes(app)
    # server.py's own HTTP server (waitress, no fork: a CUDA model built before a fork would be
    # unusable in the child), on this app with its benchmark-only memory routes
    from dots_ocr_server.api.serving import GracefulShutdown, build_server, run

    socket_map: dict = {}
    http = build_server(app, config, socket_map)
    run(http, socket_map, GracefulShutdown(app.extensions["dots_ocr"], config.graceful_timeout))
    return 0


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = args.port or free_port()
    source = (["--demo"] if args.demo else ["--random-full-size"] if args.random_full_size
              else ["--model-path", args.model_path])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", *source, "--port", str(port),
           "--device", args.device, "--dtype", args.dtype, "--max-batch-size", str(max(args.batch_sizes)),
           "--repetition-window", "0", "--max-new-tokens-limit", str(max(args.new_tokens, 1)),
           "--threads", str(max(args.batch_sizes) + 4), *args.server_arg]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_loaded(proc: subprocess.Popen, url: str, deadline_s: float, log_path: Path) -> dict:
    import requests

    deadline = time.monotonic() + deadline_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            health = requests.get(url + "/health", timeout=5).json()
            if health.get("model_loaded"):
                return health
            if health.get("load_error"):
                raise RuntimeError(f"the server could not load its model: {health['load_error']}")
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not load its model in time:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def one_request(session, url: str, body: bytes, stream: bool = True) -> dict:
    """POST one page; the times of its lines (streamed) or of its answer (plain), and the done
    line (the plain answer's body has the same statistics). A plain answer's ``first`` is the
    server's time to first token (``total_duration - eval_duration``) after sending."""
    while True:
        sent = time.perf_counter()
        with session.post(url + "/ocr", data=body, headers={"Content-Type": "application/json"}, stream=stream,
                          timeout=3600) as response:
            if response.status_code == 429:  # only if a previous level's request is still leaving
                time.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            response.raise_for_status()
            if not stream:
                done = response.json()
                first = sent + (done["total_duration"] - done["eval_duration"]) / 1e9
                return {"sent": sent, "times": [first, time.perf_counter()], "done": done, "streamed": False}
            times, done = [], None
            for raw in response.iter_lines():
                if not raw:
                    continue
                times.append(time.perf_counter())
                line = json.loads(raw)
                if line.get("done"):
                    done = line
        if done is None or "error" in done:
            raise RuntimeError(f"a page failed: {done}")
        return {"sent": sent, "times": times, "done": done, "streamed": True}


def run_level(url: str, body: bytes, pages: int, batch_size: int, new_tokens: int, stream: bool = True) -> dict:
    import requests

    requests.post(url + "/_bench/reset", timeout=30)
    todo = list(range(pages))
    lock = threading.Lock()
    results: list[dict] = []
    errors: list[BaseException] = []

    def client():
        session = requests.Session()
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            try:
                result = one_request(session, url, body, stream)
            except BaseException as exc:  # noqa: BLE001 - reported after the level
                errors.append(exc)
                return
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(batch_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"batch size {batch_size}: {len(errors)} page(s) failed; first: {errors[0]}")
    memory = requests.get(url + "/_bench/memory", timeout=30).json()
    tokens = [r["done"].get("eval_count", 0) for r in results]
    gaps = [b - a for r in results if r["streamed"] for a, b in zip(r["times"], r["times"][1:])]
    level = {
        "batch_size": batch_size, "pages": len(results), "wall_s": wall, "pages_per_s": len(results) / wall,
        "tok_per_s": sum(tokens) / wall,
        "latency_p50_s": percentile([r["times"][-1] - r["sent"] for r in results], 50),
        "latency_p95_s": percentile([r["times"][-1] - r["sent"] for r in results], 95),
        "ttft_p50_s": percentile([r["times"][0] - r["sent"] for r in results], 50),
        "max_gap_s": max(gaps) if gaps else None, "gap_p50_s": percentile(gaps, 50),
        "prefill_p50_s": percentile([r["done"].get("prompt_eval_duration", 0) / 1e9 for r in results], 50),
        "peak_rss_gib": (memory.get("peak_rss_bytes") or 0) / 2**30, "new_tokens_total": sum(tokens),
        "all_fixed_length": all(t == new_tokens for t in tokens),
    }
    if "cuda_peak_bytes" in memory:
        level["peak_gpu_gib"] = memory["cuda_peak_bytes"] / 2**30
    return level


def bench_page(args):
    """The page every request sends (dots-ocr-eval's page: its bytes, MIME type and size)."""
    from dots_ocr_server.eval.pages import page_from_bytes

    if args.page_size:
        from bench_pipeline import png_bytes, synth_page

        return page_from_bytes(png_bytes(synth_page(args.page_size, 0)),
                               f"synthetic page {args.page_size[0]}x{args.page_size[1]}")
    path = Path(args.image)
    return page_from_bytes(path.read_bytes(), str(path.relative_to(REPO) if path.is_relative_to(REPO) else path))


def machine(health: dict) -> dict:
    import torch

    from dots_ocr_server.eval.machine import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "device": health.get("device"), "dtype": health.get("dtype"),
            "fast_path": health.get("fast_path"), "demo": health.get("demo")}


def request_body(args, page) -> bytes:
    """The /ocr body of every request: dots-ocr-eval's /ocr request for the page, greedy."""
    from dots_ocr_server.eval.drivers import Generation, ocr_payload

    gen = Generation(prompt_type=args.prompt_type, temperature=0.0, max_new_tokens=args.new_tokens,
                     stream=args.stream, ignore_eos=True)
    return json.dumps(ocr_payload(page.image(), gen)).encode()


def run(args) -> dict:
    import requests

    page = bench_page(args)
    image_label = page.label
    body = request_body(args, page)
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    log_path = work / "server.log"
    proc, url = start_server(args, log_path)
    try:
        health = wait_loaded(proc, url, args.load_deadline_s, log_path)
        for _ in range(2):  # warm the whole request path once, outside the measurements
            one_request(requests.Session(), url, body, args.stream)
        levels = [run_level(url, body, args.pages, size, args.new_tokens, args.stream) for size in args.batch_sizes]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    by_size = {level["batch_size"]: level for level in levels}
    ratio = (by_size[4]["tok_per_s"] / by_size[1]["tok_per_s"]) if 1 in by_size and 4 in by_size else None
    model = ("tiny random (demo)" if args.demo else "full-size random weights" if args.random_full_size
             else args.model_path)
    return {"machine": machine(health), "model": model, "image": image_label, "pages": args.pages,
            "new_tokens": args.new_tokens, "stream": args.stream, "batch_sizes": args.batch_sizes,
            "server_max_batch_size":
            health.get("max_batch_size"), "levels": levels, "ratio_b4_b1": ratio}


def report(result: dict) -> str:
    m = result["machine"]
    head = [f"machine: {m['cpu']} ({m['cores']} cores)  |  torch {m['torch']}  |  device {m['device']} "
            f"({m['dtype']}, fast path {m['fast_path']})  |  python {m['python']}",
            f"model: {result['model']}  |  page: {result['image']}  |  {result['pages']} pages per batch size, "
            f"{result['new_tokens']} new tokens each (eos ignored, greedy), "
            f"{'streamed (NDJSON)' if result['stream'] else 'plain JSON (TTFT: the server statistics)'}"
            f"  |  server max batch "
            f"{result['server_max_batch_size']}", ""]
    gpu = any("peak_gpu_gib" in level for level in result["levels"])
    header = ["batch", "pages/s", "tok/s", "lat p50", "lat p95", "TTFT p50", "max gap", "gap p50", "prefill p50",
              "peak RSS"] + (["peak GPU"] if gpu else []) + ["fixed len"]
    rows = []
    for lv in result["levels"]:
        row = [str(lv["batch_size"]), f"{lv['pages_per_s']:.2f}", f"{lv['tok_per_s']:.0f}",
               *(seconds_text(lv[key]) for key in ("latency_p50_s", "latency_p95_s", "ttft_p50_s", "max_gap_s",
                                                    "gap_p50_s", "prefill_p50_s")),
               f"{lv['peak_rss_gib']:.2f} GiB"]
        if gpu:
            row.append(f"{lv.get('peak_gpu_gib', 0):.2f} GiB")
        rows.append(row + ["yes" if lv["all_fixed_length"] else "NO"])
    lines = head + aligned_table(header, rows)
    ratio = result["ratio_b4_b1"]
    mode = "streamed" if result["stream"] else "plain"
    lines += ["", f"aggregate tok/s, batch 4 / batch 1: {ratio:.2f}x, {mode} requests (the aim: >= 2x on CPU, "
                  f"tiny checkpoint; docs/BENCHMARKS.md has both modes)"
              if ratio is not None else "aggregate tok/s, batch 4 / batch 1: - (needs batch sizes 1 and 4)"]
    return "\n".join(line.rstrip() for line in lines)


def parse_size(text: str) -> tuple[int, int]:
    from bench_pipeline import parse_size as parse

    return parse(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--demo", action="store_true", help="the tiny random checkpoint (default)")
    source.add_argument("--model-path", help="a checkpoint folder")
    source.add_argument("--random-full-size", action="store_true",
                        help="the released sizes with random weights, built in the server process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--pages", type=int, default=32, help="pages sent at each batch size")
    parser.add_argument("--batch-sizes", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens per page (fixed: eos ignored)")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="page image (default samples/demo_image2.png)")
    parser.add_argument("--page-size", type=parse_size, default=None,
                        help="send a synthetic page of WxH instead of --image (e.g. 1700x2200: letter at 200 dpi)")
    parser.add_argument("--prompt-type", default="prompt_ocr")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="streamed NDJSON requests (client-side TTFT and line gaps); --no-stream: plain JSON, "
                             "as the batch client sends pages (TTFT from the server's statistics)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra server.py flag (repeatable), e.g. --server-arg=--compile")
    parser.add_argument("--load-deadline-s", type=float, default=1800)
    parser.add_argument("--json-out", help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    if not (args.model_path or args.random_full_size):
        args.demo = True
    if min(args.batch_sizes) < 1 or args.pages < 1 or args.new_tokens < 1:
        parser.error("batch sizes, --pages and --new-tokens must be positive")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve(argv[1:])
    args = parse_args(argv)
    result = run(args)
    print_result(report(result), result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
