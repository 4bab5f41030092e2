"""Threads and memory of the server process across a soak of mixed requests, and after it idles.

Starts ``server.py`` on the tiny random checkpoint (CPU) and sends ``--requests`` requests from
``--clients`` client threads, cycling through four kinds: a plain answer, a stream read to its end,
a stream abandoned after its first line (the client closes the connection), and a request whose
client gives up after ``--give-up-s`` (a read timeout on a long answer). A request answered 429
is sent again after 50 ms (up to 50 times), so that generations run. The server's thread count and RSS (``/proc/PID/status``) are read before the soak
(after one warm-up request), right after it, and after ``--idle-s`` seconds of idling. Prints a
table naming the machine, then one JSON line.

    python scripts/bench_soak.py [--requests 300] [--clients 8] [--max-batch-size 1] [--idle-s 5]
"""
from __future__ import annotations

import argparse
import base64
import itertools
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from dots_ocr_server.eval.machine import machine_info, machine_line  # noqa: E402
from serverproc import page_png, process_figures, running_server_process  # noqa: E402  (tests/ helpers)

KINDS = ("plain", "stream", "abandoned", "gave_up")


def one_request(url: str, kind: str, page: str, give_up_s: float, busy_retries: int = 50) -> str:
    """One request of ``kind``, sent again (after a short pause) while the server answers 429, so
    that the soak exercises generations and not only refusals; the outcome's name."""
    for _ in range(busy_retries):
        outcome = _attempt(url, kind, page, give_up_s)
        if outcome != "429":
            return outcome
        time.sleep(0.05)
    return "429"


def _attempt(url: str, kind: str, page: str, give_up_s: float) -> str:
    body = {"image": page, "image_format": "base64", "prompt_type": "prompt_ocr", "temperature": 0,
            "max_new_tokens": 24}
    try:
        if kind == "plain":
            return str(requests.post(url + "/ocr", json=body, timeout=60).status_code)
        if kind == "gave_up":
            body["max_new_tokens"] = 4000
            return str(requests.post(url + "/ocr", json=body, timeout=give_up_s).status_code)
        body["stream"] = True
        if kind == "abandoned":
            body["max_new_tokens"] = 4000
        with requests.post(url + "/ocr", json=body, stream=True, timeout=60) as response:
            if response.status_code != 200:
                return str(response.status_code)
            for _ in response.iter_lines():
                if kind == "abandoned":
                    break  # closing the response drops the connection mid-stream
            return "200"
    except requests.Timeout:
        return "gave up"
    except requests.RequestException as exc:
        return type(exc).__name__


def thread_names(pid: int) -> Counter:
    """The process's threads counted by name (``/proc/PID/task/*/comm``)."""
    names: Counter = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names[(task / "comm").read_text().strip()] += 1
        except OSError:
            pass
    return names


def soak(url: str, total: int, clients: int, give_up_s: float) -> Counter:
    page = base64.b64encode(page_png()).decode("ascii")
    kinds = itertools.cycle(KINDS)
    lock = threading.Lock()
    outcomes: Counter = Counter()
    left = [total]

    def client() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
                kind = next(kinds)
            outcome = one_request(url, kind, page, give_up_s)
            with lock:
                outcomes[f"{kind}:{outcome}"] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--give-up-s", type=float, default=0.3, help="read timeout of the 'gave_up' requests")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle time before the last reading")
    parser.add_argument("--server-arg", action="append", default=[], help="one more server.py argument")
    args = parser.parse_args(argv)

    from model_runner.tiny import build_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-soak-") as work:
        ckpt = build_tiny_checkpoint(Path(work) / "DotsOCR", seed=0)
        server_args = ["--max-batch-size", str(args.max_batch_size), *args.server_arg]
        with running_server_process(ckpt, *server_args, log_dir=Path(work)) as server:
            one_request(server.url, "plain", base64.b64encode(page_png()).decode("ascii"), args.give_up_s)
            before = process_figures(server.proc.pid)
            started = time.monotonic()
            outcomes = soak(server.url, args.requests, args.clients, args.give_up_s)
            seconds = time.monotonic() - started
            after = process_figures(server.proc.pid)
            time.sleep(args.idle_s)
            idle = process_figures(server.proc.pid)
            names = thread_names(server.proc.pid)

    print(f"machine: {machine_line()}")
    print(f"server.py (waitress), tiny random checkpoint on CPU, --max-batch-size {args.max_batch_size}; "
          f"{args.requests} requests from {args.clients} clients in {seconds:.1f} s")
    print(f"{'reading':<22} {'threads':>8} {'RSS MiB':>9}")
    for name, figures in (("before (warmed up)", before), ("right after the soak", after),
                          (f"after {args.idle_s:g} s idle", idle)):
        print(f"{name:<22} {figures['threads']:>8} {figures['rss_bytes'] / 2**20:>9.0f}")
    print("threads after idling, by name: " + ", ".join(f"{k} x{v}" for k, v in names.most_common()))
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print(json.dumps({"bench": "soak", "machine": machine_info(), "requests": args.requests,
                      "clients": args.clients, "max_batch_size": args.max_batch_size, "seconds": round(seconds, 2),
                      "before": before, "after": after, "idle": idle, "idle_threads": dict(names), "outcomes": dict(outcomes)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
