"""What every benchmark prints beside its figures: the machine, and the result as a table then
one JSON line. Standard library only (a client-side install has no torch; ``torch_info`` says so)."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["cpu_name", "machine_info", "machine_line", "print_result"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (its affinity), which a container may set below the count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, load at the start, Python, and torch with its GPU when torch is there."""
    info: dict[str, Any] = {"host": platform.node(), "cpu": cpu_name(), "cores": usable_cores(),
                            "python": platform.python_version()}
    try:
        info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        info["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import torch
    except ImportError:
        return info
    info["torch"] = torch.__version__
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    """``machine_info`` as one line for the head of a table."""
    info = info or machine_info()
    parts = [f"{info['cpu']}, {info['cores']} cores"]
    if "ram_gib" in info:
        parts.append(f"{info['ram_gib']} GiB")
    parts.append(f"GPU: {info.get('gpu') or 'none'}")
    if "torch" in info:
        parts.append(f"torch {info['torch']}")
    parts.append(f"Python {info['python']}")
    if "load_avg_1m_at_start" in info:
        parts.append(f"load {info['load_avg_1m_at_start']} at start")
    return f"{info['host']}: " + ", ".join(parts)


def print_result(table: str, result: dict[str, Any], json_out: str | None = None) -> None:
    """A benchmark's output: the table, then its figures as one JSON line (also written to
    ``json_out`` when given)."""
    print(table)
    line = json.dumps(result, default=str, sort_keys=False)
    if json_out:
        Path(json_out).write_text(line + "\n")
    print(line, flush=True)
