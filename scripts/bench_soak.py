"""Threads and memory of the server process across a soak of mixed requests, and after it idles.

Starts ``server.py`` on the tiny random checkpoint (CPU) and sends ``--requests`` requests from
``--clients`` client threads, cycling through four kinds: a plain answer, a stream read to its end,
a stream abandoned after its first line (the client closes the connection), and a request whose
client gives up after ``--give-up-s`` (a read timeout on a long answer). A request answered 429
is sent again after 50 ms (up to 50 times), so that generations run. The server's thread count
and RSS (``/proc/PID/status``) are read before the soak (after one warm-up request), right after
it, and after ``--idle-s`` seconds of idling. Prints a table naming the machine, then one JSON line.

    python scripts/bench_soak.py [--requests 300] [--clients 8] [--max-batch-size 1] [--idle-s 5]
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from dots_ocr_server.eval.machine import machine_info, machine_line  # noqa: E402 - after the sys.path set-up
from serverproc import page_png, process_figures, running_server_process  # noqa: E402 - tests/ helpers
from soak import one_request, soak, thread_names  # noqa: E402 - after the sys.path set-up


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
                      "before": before, "after": after, "idle": idle, "idle_threads": dict(names),
                      "outcomes": dict(outcomes)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
