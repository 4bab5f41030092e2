"""Report helpers shared by the subcommands and ``scripts/bench_throughput.py``: percentiles,
durations for people, right-aligned text tables, and JSON reports written to a file.
(``machine.print_result`` prints a benchmark's table and its JSON line.)"""
from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["aligned_table", "mean", "percentile", "seconds_text", "write_json"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0..100) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def seconds_text(value: float | None) -> str:
    """``812 ms`` below a second, ``2.41 s`` above, ``-`` for None."""
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def aligned_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 0) -> list[str]:
    """Lines of a table: a header, a rule, the rows; the first ``left`` columns left-aligned, the
    others right-aligned."""
    widths = [max(len(str(row[i])) for row in [*rows, header]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]


def write_json(path: str | Path | None, report: dict[str, Any]) -> None:
    """``report`` as indented JSON in ``path`` (``-``: standard output; nothing when None); the
    folder is made."""
    if not path:
        return
    text = json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n"
    if str(path) == "-":
        print(text, end="", flush=True)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
