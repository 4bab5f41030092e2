"""Decode speed on a CPU with and without a second OpenMP thread team alive in the process.

Every thread that has run torch work holds an OpenMP team; libgomp counts the threads of all
teams, and when they outnumber the cores it cuts the time idle workers spin between parallel
regions (from 300,000 spins to 1,000), so more of the small regions of a decode step pay a
wake-up. This script shows the size of that effect on this machine: for each torch thread count
it times plain ``generate`` on the main thread (tiny random checkpoint, one synthetic 200-dpi
page, eos ignored), once with no other team and once after the runner has prepared and answered
one page on its pool thread (as a server's runner does). Each case runs in a fresh process.
Prints a table naming the machine, then one JSON line.

    python scripts/bench_openmp_teams.py [--threads 1,2] [--new-tokens 256] [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dots_ocr_server.eval.machine import machine_info, machine_line, print_result  # noqa: E402 - after the sys.path set-up

CASES = {"alone": "no other team", "after_a_page": "after one page on the runner's pool thread"}


def measure(case: str, threads: int, new_tokens: int, runs: int) -> list[float]:
    """Decode tok/s of ``runs`` plain generations on the main thread (run in this process)."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_pipeline as bp

    from model_runner.runner import ModelRunner
    from model_runner.tiny import build_tiny_checkpoint

    torch.set_num_threads(threads)
    folder = build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="bench-omp-")) / "DotsOCR", seed=0)
    runner = ModelRunner(folder, device="cpu", dtype="float32").load()
    page = bp.synth_page((1700, 2200))
    if case == "after_a_page":
        runner.generate(page, "prompt_ocr", temperature=0, max_new_tokens=4)
    inputs = dict(runner.processor.page_inputs(page, "prompt_ocr").tensors)
    bp.plain_generate_rate(runner.model, inputs, 8)  # warm-up
    return [bp.plain_generate_rate(runner.model, inputs, new_tokens) for _ in range(runs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--one", nargs=2, metavar=("CASE", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child process of one case
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.new_tokens, args.runs)))
        return 0

    info = machine_info()
    rows, results = [], []
    for threads in [int(t) for t in args.threads.split(",")]:
        for case in CASES:
            out = subprocess.run([sys.executable, __file__, "--one", case, str(threads), "--new-tokens",
                                  str(args.new_tokens), "--runs", str(args.runs)],
                                 capture_output=True, text=True, check=True).stdout
            rates = json.loads(out.strip().splitlines()[-1])
            median = statistics.median(rates)
            results.append({"threads": threads, "case": case, "decode_tok_s": rates, "median_tok_s": median})
            rows.append(f"{threads:>13}  {CASES[case]:<44}  {median:>10.0f}  "
                        + ", ".join(f"{r:.0f}" for r in rates))
    table = "\n".join([
        f"machine: {machine_line(info)}",
        f"plain generate on the main thread, tiny random checkpoint, 200-dpi letter page, prompt_ocr, "
        f"{args.new_tokens} new tokens, {args.runs} runs per case",
        "",
        f"{'torch threads':>13}  {'case':<44}  {'median tok/s':>10}  runs",
        *rows,
    ])
    print_result(table, {"bench": "openmp_teams", "machine": info, "new_tokens": args.new_tokens,
                         "runs": args.runs, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
