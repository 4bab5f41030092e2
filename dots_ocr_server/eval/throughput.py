"""``dots-ocr-eval throughput``: drive running servers with real pages at a fixed concurrency, for a
fixed page count or a fixed time, and report what a deployment delivers.

Each target (``API=URL``: ``ocr`` for this server's ``/ocr``, ``openai`` for any OpenAI-compatible
``/v1``, e.g. ``vllm serve`` with dots.ocr or this server's own) gets the same pages, prompt and
settings, one target after the other, after a few warm-up requests that are not counted. Per
target: pages/s, output tokens/s, time to first token and page latency (p50, p95), failed pages
by HTTP status, 429 retries, the answers' token counts, ``/health``, and what the server's own
``/metrics`` counted over the measured requests (``dots_ocr:*`` or ``vllm:*`` counters, summed
over their labels), so the client's figures can be checked against the server's.

Fixed-length answers: with ``--fixed-length auto`` (the default) the first warm-up request asks
for ``ignore_eos`` (vLLM's field: decode to ``max_tokens`` whatever eos says); a server that
refuses the field (400 naming it) is driven without it, greedy, to ``--max-new-tokens``, and the
report says so and gives the actual token counts.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from dots_ocr_server.client.errors import FatalError, PageError

from .drivers import APIS, Answer, Generation
from .pages import Page
from .report import aligned_table, percentile, seconds_text

__all__ = ["Sample", "Target", "drive", "measure_target", "parse_target", "scrape_metrics", "table_lines"]

METRIC_PREFIXES = ("dots_ocr:", "vllm:")
#: Counter samples compared with the client's counts (name after the prefix).
COUNTERS = ("generation_tokens_total", "prompt_tokens_total", "request_success_total")
ROUTES = {"ocr": "/ocr", "openai": "/v1/chat/completions"}


@dataclass(frozen=True)
class Target:
    api: str
    url: str

    @property
    def label(self) -> str:
        return f"{self.api} {self.url}"


def parse_target(text: str) -> Target:
    """``API=URL``, e.g. ``openai=http://127.0.0.1:8000``."""
    api, sep, url = text.partition("=")
    if not sep or api not in APIS or not url.strip():
        raise ValueError(f"a target is API=URL with API one of {', '.join(APIS)}: {text!r}")
    return Target(api, url.strip())


@dataclass
class Sample:
    """One measured request."""

    page: str
    started: float
    latency_s: float
    answer: Answer | None = None
    status: str | None = None  # a failed page: its HTTP status, or "no status"
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# Driving
# ---------------------------------------------------------------------------------------------


def drive(send: Callable[[Page], Answer], pages: list[Page], concurrency: int, *, count: int | None = None,
          duration_s: float | None = None) -> tuple[list[Sample], float]:
    """``concurrency`` threads send pages (cycling through ``pages``) until ``count`` requests were
    started, or until ``duration_s`` has passed (requests in flight then still finish). Returns
    the samples and the wall time from the first request to the end of the last. A FatalError (the
    server is gone, the key refused) stops every thread and is raised here.

    Written with plain threads: each one keeps sending as soon as its request ends, which is what
    "a fixed concurrency" means, and the deadline check needs to sit between two requests."""
    if count is None and duration_s is None:
        raise ValueError("give a page count or a duration")
    lock = threading.Lock()
    started = [0]
    samples: list[Sample] = []
    fatal: list[BaseException] = []
    begin = time.perf_counter()
    deadline = begin + duration_s if duration_s is not None else None

    def next_page() -> Page | None:
        with lock:
            if fatal or (count is not None and started[0] >= count) or \
                    (deadline is not None and time.perf_counter() >= deadline):
                return None
            started[0] += 1
            return pages[(started[0] - 1) % len(pages)]

    def worker() -> None:
        while (page := next_page()) is not None:
            sample = Sample(page=page.label, started=time.perf_counter(), latency_s=0.0)
            try:
                sample.answer = send(page)
            except PageError as exc:
                sample.status, sample.error = str(exc.status) if exc.status else "no status", str(exc)
            except BaseException as exc:  # noqa: BLE001 - raised by the main thread
                with lock:
                    fatal.append(exc)
                return
            sample.latency_s = time.perf_counter() - sample.started
            with lock:
                samples.append(sample)

    threads = [threading.Thread(target=worker, name=f"eval-load-{n + 1}", daemon=True) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if fatal:
        raise fatal[0]
    end = max((s.started + s.latency_s for s in samples), default=time.perf_counter())
    return samples, end - begin


# ---------------------------------------------------------------------------------------------
# The server's own counts
# ---------------------------------------------------------------------------------------------


def scrape_metrics(driver) -> dict[str, Any] | None:
    """One ``/metrics`` scrape: ``{"prefix", "totals": {name: value summed over labels},
    "http": {(route, status): value}}``; None when the server has no Prometheus metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    response = driver.client.get("/metrics")
    try:
        if response.status_code != 200:
            return None
        text = response.text
    finally:
        response.close()
    totals: dict[str, float] = {}
    http: dict[tuple[str, str], float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return None
    for family in families:
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            if sample.name.endswith("http_requests_total"):  # vLLM's instrumentator says "handler"
                route = sample.labels.get("route", sample.labels.get("handler", ""))
                key = (route, sample.labels.get("status", ""))
                http[key] = http.get(key, 0.0) + sample.value
    prefix = next((p for p in METRIC_PREFIXES if any(name.startswith(p) for name in totals)), None)
    return {"prefix": prefix, "totals": totals, "http": http} if prefix else None


def _fingerprint(scrape: dict[str, Any], route: str) -> tuple:
    """The counters compared, and the route's responses (not /metrics': each scrape moves it)."""
    totals = scrape["totals"]
    return (tuple(totals.get(scrape["prefix"] + name, 0.0) for name in COUNTERS),
            tuple(sorted((k, v) for k, v in scrape["http"].items() if k[0] == route)))


def settled_metrics(driver, route: str, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """A scrape once no request is running and two scrapes in a row agree (a stream's counters
    are updated as the server closes it, just after the client read its end)."""
    deadline = time.monotonic() + timeout_s
    last = scrape_metrics(driver)
    while last is not None and time.monotonic() < deadline:
        time.sleep(0.05)
        now = scrape_metrics(driver)
        if now is None:
            return last
        running = now["totals"].get(now["prefix"] + "num_requests_running", 0.0)
        if running == 0 and _fingerprint(now, route) == _fingerprint(last, route):
            return now
        last = now
    return last


def counted(before: dict[str, Any] | None, after: dict[str, Any] | None, route: str) -> dict[str, Any] | None:
    """What the server counted between two scrapes: the counters of ``COUNTERS`` and this
    route's responses by status."""
    if not before or not after:
        return None
    prefix = after["prefix"]
    result: dict[str, Any] = {"prefix": prefix}
    for name in COUNTERS:
        key = prefix + name
        result[name.removesuffix("_total")] = after["totals"].get(key, 0.0) - before["totals"].get(key, 0.0)
    statuses = {status for (r, status) in after["http"] if r == route}
    responses = {status: after["http"][(route, status)] - before["http"].get((route, status), 0.0)
                 for status in sorted(statuses)}
    result["responses"] = {status: value for status, value in responses.items() if value}
    return result


# ---------------------------------------------------------------------------------------------
# One target
# ---------------------------------------------------------------------------------------------


def _refuses_ignore_eos(exc: Exception) -> bool:
    return "ignore_eos" in str(exc) and (isinstance(exc, FatalError) or getattr(exc, "status", None) == 400)


def warm_up(driver, pages: list[Page], gen: Generation, requests: int, fixed_length: str) -> tuple[Generation, str]:
    """The uncounted requests before the measurement; the first one finds out whether the server
    takes ``ignore_eos``. Returns the settings to measure with and the fixed-length mode used."""
    mode = "off"
    if fixed_length != "off":
        try:
            driver.send(pages[0].image(), replace(gen, ignore_eos=True))
            gen, mode = replace(gen, ignore_eos=True), "ignore_eos"
            requests -= 1
        except (FatalError, PageError) as exc:
            if fixed_length == "on" or not _refuses_ignore_eos(exc):
                raise
            mode = "not supported by the server: greedy to max_new_tokens"
    for index in range(max(0, requests)):
        driver.send(pages[index % len(pages)].image(), gen)
    return gen, mode


def _token_stats(answers: list[Answer], max_new_tokens: int) -> dict[str, Any]:
    tokens = [a.output_tokens for a in answers if isinstance(a.output_tokens, int)]
    return {"total": sum(tokens), "min": min(tokens, default=None), "max": max(tokens, default=None),
            "reported_by": len(tokens), "all_at_max_new_tokens": bool(tokens) and len(tokens) == len(answers)
            and all(t == max_new_tokens for t in tokens)}


def summarize(samples: list[Sample], wall_s: float, max_new_tokens: int) -> dict[str, Any]:
    """The figures of one measured run."""
    ok = [s for s in samples if s.answer is not None]
    answers = [s.answer for s in ok]
    ttfts = [a.ttft_s for a in answers if a.ttft_s is not None]
    latencies = [s.latency_s for s in ok]
    tokens = _token_stats(answers, max_new_tokens)
    errors: dict[str, int] = {}
    for sample in samples:
        if sample.status is not None:
            errors[sample.status] = errors.get(sample.status, 0) + 1
    return {
        "requests": len(samples), "pages": len(ok), "errors": errors,
        "first_error": next((s.error for s in samples if s.error), None),
        "wall_s": wall_s, "pages_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "output_tok_per_s": tokens["total"] / wall_s if wall_s > 0 else None,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
        "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
        "output_tokens": tokens,
        "prompt_tokens_total": sum(a.prompt_tokens for a in answers if isinstance(a.prompt_tokens, int)),
        "finish_reasons": _count(a.finish_reason for a in answers),
    }


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return counts


def measure_target(driver, pages: list[Page], gen: Generation, *, concurrency: int | None, count: int | None,
                   duration_s: float | None, warmup: int, fixed_length: str) -> dict[str, Any]:
    """Warm-up, scrape, drive, scrape: one target's row of the report."""
    health = driver.health()
    batch = health.get("max_batch_size")
    concurrency = concurrency or (batch if isinstance(batch, int) and batch >= 1 else 1)
    gen, mode = warm_up(driver, pages, gen, warmup, fixed_length)
    route = ROUTES[driver.api]
    before = settled_metrics(driver, route)
    retries_before = driver.client.retries
    samples, wall = drive(lambda page: driver.send(page.image(), gen), pages, concurrency, count=count,
                          duration_s=duration_s)
    after = settled_metrics(driver, route)
    return {**driver.describe(), "health": health, "concurrency": concurrency, "fixed_length": mode,
            **summarize(samples, wall, gen.max_new_tokens), "busy_retries": driver.client.retries - retries_before,
            "server_counted": counted(before, after, route)}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _rate(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _health_text(row: dict[str, Any]) -> str:
    health = row.get("health") or {}
    bits = [f"{key} {health[key]}" for key in ("device", "dtype", "fast_path", "max_batch_size", "demo")
            if key in health]
    if row.get("model"):
        bits.append(f"model {row['model']}")
    return ", ".join(bits) or "no /health details"


def table_lines(result: dict[str, Any]) -> list[str]:
    """The terminal report: the run's settings, a row per target, each target's server."""
    settings = result["settings"]
    head = [result["machine_line"],
            f"pages: {result['pages']['count']} ({result['pages']['label']}), prompt {settings['prompt_type']}, "
            f"max_new_tokens {settings['max_new_tokens']}, temperature {settings['temperature']}, "
            f"{'streamed' if settings['stream'] else 'plain'} requests, "
            + (f"{settings['count']} requests per target" if settings.get("count") is not None
               else f"{settings['duration_s']:g} s per target"), ""]
    header = ["target", "conc", "pages", "errors", "pages/s", "out tok/s", "TTFT p50", "TTFT p95", "lat p50",
              "lat p95", "tokens/page", "fixed length", "server counted"]
    rows = []
    for row in result["targets"]:
        tokens = row["output_tokens"]
        span = "-" if tokens["min"] is None else (f"{tokens['min']}" if tokens["min"] == tokens["max"]
                                                   else f"{tokens['min']}-{tokens['max']}")
        server = row.get("server_counted")
        rows.append([row["target"], str(row["concurrency"]), str(row["pages"]),
                     ", ".join(f"{k}: {v}" for k, v in row["errors"].items()) or "0",
                     _rate(row["pages_per_s"], 2), _rate(row["output_tok_per_s"], 0),
                     seconds_text(row["ttft_p50_s"]), seconds_text(row["ttft_p95_s"]),
                     seconds_text(row["latency_p50_s"]), seconds_text(row["latency_p95_s"]), span,
                     "yes" if tokens["all_at_max_new_tokens"] else "no",
                     f"{server['generation_tokens']:.0f} tok" if server else "-"])
    lines = head + aligned_table(header, rows, left=1) + [""]
    lines += [f"{row['target']}: {row['fixed_length'] if row['fixed_length'] != 'off' else 'fixed length off'}; "
              f"{_health_text(row)}" for row in result["targets"]]
    return lines
