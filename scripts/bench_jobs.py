"""Pages per second of one document through a job against the same pages through one /ocr call
each, on the same server in the same run.

Starts ``server.py`` on the tiny random checkpoint (CPU) with ``--max-batch-size B``, builds a
``--pages``-page PDF (text-like bars on every page), then:

  ocr calls  the PDF's pages as ``--pages`` ``POST /ocr`` calls (``"page": n``: the server renders
             each page, as a job does), ``B`` in flight at a time, each answered in full;
  job        the PDF uploaded once to ``POST /jobs``, followed to its end on the events stream.

Both run greedy with the same prompt type, dpi and ``max_new_tokens``, so the answers (and their
token counts, shown) are the same. Prints a table naming the machine, then one JSON line.

    python scripts/bench_jobs.py [--pages 20] [--max-batch-size 1] [--max-new-tokens 64] [--dpi 72]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from dots_ocr_server.eval.machine import machine_info, machine_line, print_result  # noqa: E402 - after the sys.path set-up
from serverproc import running_server_process  # noqa: E402 - after the sys.path set-up


def text_like_pdf(pages: int) -> bytes:
    """A PDF of ``pages`` letter pages, each with a different pattern of dark bars."""
    from PIL import Image, ImageDraw

    images = []
    for index in range(pages):
        image = Image.new("RGB", (612, 792), "white")
        draw = ImageDraw.Draw(image)
        for row in range(10 + index % 5):
            width = 520 - (row * 37 + index * 11) % 200
            draw.rectangle([40, 60 + row * 48, 40 + width, 76 + row * 48], fill=(30, 30, 30))
        images.append(image)
    buffer = io.BytesIO()
    images[0].save(buffer, format="PDF", save_all=True, append_images=images[1:], resolution=72)
    return buffer.getvalue()


def ocr_calls(url: str, pdf_b64: str, pages: int, options: dict, in_flight: int) -> tuple[float, int]:
    """(seconds, tokens) of the pages as /ocr calls, ``in_flight`` at a time."""
    todo, lock, tokens = list(range(1, pages + 1)), threading.Lock(), [0]

    def worker() -> None:
        session = requests.Session()
        while True:
            with lock:
                if not todo:
                    return
                page = todo.pop(0)
            while True:
                response = session.post(f"{url}/ocr", json={"image": pdf_b64, "image_format": "base64",
                                                            "page": page, **options}, timeout=600)
                if response.status_code != 429:
                    break
                time.sleep(0.02)
            response.raise_for_status()
            with lock:
                tokens[0] += response.json()["eval_count"]

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(in_flight)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, tokens[0]


def one_job(url: str, pdf: bytes, options: dict) -> tuple[float, int, dict]:
    """(seconds, tokens, final status) of the PDF as one job, from the upload to its last event."""
    started = time.perf_counter()
    submitted = requests.post(f"{url}/jobs", files={"file": ("bench.pdf", pdf, "application/pdf")},
                              data={k: str(v) for k, v in options.items()}, timeout=120)
    submitted.raise_for_status()
    job = submitted.json()
    with requests.get(url + job["links"]["events"], stream=True, timeout=600) as events:
        for line in events.iter_lines():
            if line and json.loads(line)["event"] == "end":
                break
    seconds = time.perf_counter() - started
    result = requests.get(url + job["links"]["result"], timeout=120).json()
    tokens = sum(page["statistics"]["eval_count"] for page in result["pages"] if "statistics" in page)
    return seconds, tokens, requests.get(url + job["links"]["self"], timeout=30).json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dpi", type=int, default=72)
    parser.add_argument("--prompt-type", default="prompt_ocr")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)

    from model_runner.tiny import build_tiny_checkpoint

    options = {"prompt_type": args.prompt_type, "temperature": 0, "max_new_tokens": args.max_new_tokens,
               "dpi": args.dpi}
    pdf = text_like_pdf(args.pages)
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as work:
        ckpt = build_tiny_checkpoint(Path(work) / "DotsOCR", seed=0)
        with running_server_process(ckpt, "--max-batch-size", str(args.max_batch_size), "--data-dir",
                                    str(Path(work) / "data"), log_dir=Path(work)) as server:
            health = server.health()
            ocr_calls(server.url, base64.b64encode(pdf).decode(), 2, options, 1)  # warm both paths once
            calls_s, calls_tokens = ocr_calls(server.url, base64.b64encode(pdf).decode(), args.pages, options,
                                              args.max_batch_size)
            job_s, job_tokens, status = one_job(server.url, pdf, options)
    rows = [("ocr calls", calls_s, calls_tokens, args.pages), ("job", job_s, job_tokens, status["pages_done"])]
    table = [f"machine: {machine_line()}",
             f"server.py, tiny random checkpoint on CPU, --max-batch-size {args.max_batch_size} (jobs use "
             f"{max(1, args.max_batch_size - 1)} slot(s)); a {args.pages}-page PDF at {args.dpi} dpi, "
             f"{args.prompt_type}, greedy, max_new_tokens {args.max_new_tokens}", "",
             f"{'path':<10} {'pages':>6} {'seconds':>8} {'pages/s':>8} {'tokens':>7}"]
    for name, seconds, tokens, pages in rows:
        table.append(f"{name:<10} {pages:>6} {seconds:>8.2f} {pages / seconds:>8.2f} {tokens:>7}")
    table.append(f"\njob / ocr calls: {calls_s / job_s:.2f}x the pages per second")
    print_result("\n".join(table), {
        "bench": "jobs", "machine": machine_info(), "pages": args.pages, "max_batch_size": args.max_batch_size,
        "max_new_tokens": args.max_new_tokens, "dpi": args.dpi, "prompt_type": args.prompt_type,
        "ocr_calls": {"seconds": round(calls_s, 3), "pages_per_s": round(args.pages / calls_s, 3),
                      "tokens": calls_tokens},
        "job": {"seconds": round(job_s, 3), "pages_per_s": round(status["pages_done"] / job_s, 3),
                "tokens": job_tokens, "pages_done": status["pages_done"], "pages_failed": status["pages_failed"]},
        "health": {k: health.get(k) for k in ("device", "dtype", "max_batch_size", "demo")}}, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
