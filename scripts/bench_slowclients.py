"""Latency of /health and /ocr while slow clients hold connections open.

Starts ``server.py`` on the tiny random checkpoint (CPU), opens 0, 20 and 100 slow connections
(a third each: headers sent a byte at a time, an idle partial request, a stalled upload), and
times normal requests meanwhile: a ``/health`` and a short ``/ocr`` (200 or 429 both count as an
answer). Prints a table naming the machine, then one JSON line.

    python scripts/bench_slowclients.py [--threads 16] [--repeats 5] [--counts 0 20 100]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from serverproc import running_server_process  # noqa: E402 - tests/ helpers: one way to start the server
from test_hardening import PAGE, _SlowClients  # noqa: E402 - after the sys.path set-up


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def time_requests(url: str, repeats: int) -> dict[str, float | list[int]]:
    health, ocr, statuses = [], [], []
    body = {"image": PAGE, "image_format": "base64", "prompt_type": "prompt_ocr", "max_new_tokens": 2,
            "temperature": 0}
    for _ in range(repeats):
        start = time.monotonic()
        requests.get(url + "/health", timeout=30).raise_for_status()
        health.append(time.monotonic() - start)
        start = time.monotonic()
        statuses.append(requests.post(url + "/ocr", json=body, timeout=30).status_code)
        ocr.append(time.monotonic() - start)
    return {"health_median_s": statistics.median(health), "health_max_s": max(health),
            "ocr_median_s": statistics.median(ocr), "ocr_max_s": max(ocr), "ocr_statuses": sorted(set(statuses))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=16, help="the server's --threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed request pairs per row")
    parser.add_argument("--counts", type=int, nargs="+", default=[0, 20, 100], help="slow connections per row")
    args = parser.parse_args(argv)

    from model_runner.tiny import build_tiny_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-slowclients-") as work:
        ckpt = build_tiny_checkpoint(Path(work) / "DotsOCR", seed=0)
        with running_server_process(ckpt, "--threads", str(args.threads), log_dir=Path(work)) as server:
            for count in args.counts:
                slow = _SlowClients(server.port, count)
                try:
                    time.sleep(1.0)  # the slow connections are open and dripping
                    rows.append({"slow_connections": count, **time_requests(server.url, args.repeats)})
                finally:
                    slow.close()

    print(f"machine: {machine()}")
    print(f"server.py (waitress), --threads {args.threads}, tiny random checkpoint on CPU; "
          f"{args.repeats} request pairs per row")
    print(f"{'slow conns':>10} | {'/health median':>14} | {'/health max':>11} | {'/ocr median':>11} | "
          f"{'/ocr max':>8} | /ocr statuses")
    for row in rows:
        print(f"{row['slow_connections']:>10} | {row['health_median_s'] * 1000:>11.1f} ms | "
              f"{row['health_max_s'] * 1000:>8.1f} ms | {row['ocr_median_s'] * 1000:>8.1f} ms | "
              f"{row['ocr_max_s'] * 1000:>5.1f} ms | {row['ocr_statuses']}")
    print(json.dumps({"bench": "slowclients", "machine": machine(), "threads": args.threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
