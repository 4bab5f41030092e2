"""A soak of mixed requests against a real server process (the four kinds of client that end a
request differently), and what the process holds afterwards: shared by tests/test_hardening.py
and scripts/bench_soak.py."""
from __future__ import annotations

import base64
import itertools
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from serverproc import page_png

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
