"""``GET /metrics``: Prometheus text format through ``prometheus_client``.

Metric names follow vLLM's (``vllm:time_to_first_token_seconds`` -> ``dots_ocr:time_to_first_token_seconds``,
...) so dashboards carry over. Each app has its own ``CollectorRegistry`` (never the process-wide
default), so several apps in one process (the tests) do not clash. ``/metrics`` is open like
``/health`` (no API key); ``--no-metrics`` leaves the route and the bookkeeping out.

What moves when:

* every response: ``dots_ocr:http_requests_total{route, method, status}`` (route = the URL rule,
  ``unmatched`` for a 404; a method outside HTTP's own set is ``other``: no label takes a value a
  client made up), and ``dots_ocr:request_busy_rejections_total`` for each 429 of /ocr;
* every generation when it ends, from any route (``/ocr``, ``/v1/chat/completions``, ``/inspect``,
  the document jobs), also a cancelled or failed one: the histograms, the token counters and
  ``dots_ocr:request_success_total{finished_reason, prompt_type, route}`` (``stop``, ``length``,
  ``repetition``, ``cancelled``) or ``dots_ocr:request_generation_errors_total{prompt_type, route}``;
  each with the route as a label (``prompt_type`` is ``chat`` for a /v1 chat). The ServerMetrics
  is the page service's observer, so no route can forget to count;
* read at scrape time: running requests, prepared pages waiting to join the batch, /v1 requests
  waiting in the queue for a slot, ``model_loaded``, the model load time, and GPU memory in use
  and at peak (on a CUDA device only).
"""
from __future__ import annotations

import time
from typing import Callable

from flask import Blueprint, Flask, Response, current_app, request

from ..pages import PageRun, done_reason
from . import request_log

bp = Blueprint("metrics", __name__)

EXTENSION = "dots_ocr_metrics"

# Buckets in seconds. A page takes from well under a second (a small page on a GPU) to minutes (a
# dense page on a CPU), so the latency buckets reach 10 minutes; vLLM's TTFT/TPOT buckets are
# kept at the small end.
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

# The methods counted by name; any other method a client invents is counted as "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# The prompt_type label of a generation that has none (a /v1 chat).
CHAT_PROMPT_TYPE = "chat"


class _StateCollector:
    """The gauges read from the server's state at scrape time (nothing to keep in step)."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        state, runner = self.state, self.state.runner
        yield GaugeMetricFamily("dots_ocr:num_requests_running",
                                "Requests holding a generation slot (image load, prefill or decoding).",
                                value=state.lock.running)
        waiting = runner.engine.waiting if state.model_loaded else 0
        yield GaugeMetricFamily("dots_ocr:num_requests_waiting",
                                "Prepared requests waiting to join the decoding batch.", value=waiting)
        yield GaugeMetricFamily("dots_ocr:num_requests_queued",
                                "/v1 requests waiting in the queue for a generation slot (--max-queue).",
                                value=state.lock.queued)
        yield GaugeMetricFamily("dots_ocr:model_loaded", "1 when the model is loaded and /ocr can run.",
                                value=1 if state.model_loaded else 0)
        yield from self._job_gauges()
        seconds = getattr(runner, "load_seconds", None)
        if state.model_loaded and seconds is not None:
            yield GaugeMetricFamily("dots_ocr:model_load_time_seconds",
                                    "Seconds the model took to load (and warm up).", value=seconds)
        device = getattr(runner, "device", None) if state.model_loaded else None
        if device is not None and device.type == "cuda":
            import torch

            yield GaugeMetricFamily("dots_ocr:gpu_memory_used_bytes", "GPU memory allocated by torch.",
                                    value=torch.cuda.memory_allocated(device))
            yield GaugeMetricFamily("dots_ocr:gpu_memory_peak_bytes", "Peak GPU memory allocated by torch.",
                                    value=torch.cuda.max_memory_allocated(device))


    def _job_gauges(self):
        """The document jobs, from their database (so the figures survive a restart)."""
        from prometheus_client.core import GaugeMetricFamily

        from ..jobs.store import JOB_STATUSES, PAGE_STATUSES

        jobs = self.state.jobs
        if jobs is None:
            return
        by_job, by_page = jobs.store.counts() if jobs.exists() else ({}, {})
        family = GaugeMetricFamily("dots_ocr:jobs", "Document jobs by status.", labels=["status"])
        for status in JOB_STATUSES:
            family.add_metric([status], by_job.get(status, 0))
        yield family
        family = GaugeMetricFamily("dots_ocr:job_pages", "Pages of the document jobs by status (done, failed, "
                                   "queued: the jobs' queue, ...).", labels=["status"])
        for status in PAGE_STATUSES:
            family.add_metric([status], by_page.get(status, 0))
        yield family
        yield GaugeMetricFamily("dots_ocr:job_queue_pages", "Pages of the document jobs waiting to run.",
                                value=by_page.get("queued", 0))


class ServerMetrics:
    """The app's registry and its metrics."""

    def __init__(self, state):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = registry = CollectorRegistry()

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=registry)

        self.http_requests = Counter("dots_ocr:http_requests", "HTTP responses by route, method and status.",
                                     ["route", "method", "status"], registry=registry)
        self.busy = Counter("dots_ocr:request_busy_rejections",
                            "/ocr requests answered 429 because every generation slot was taken.", registry=registry)
        self.success = Counter("dots_ocr:request_success",
                               "Finished generations by done_reason, prompt type and route.",
                               ["finished_reason", "prompt_type", "route"], registry=registry)
        self.errors = Counter("dots_ocr:request_generation_errors", "Generations that failed with an error.",
                              ["prompt_type", "route"], registry=registry)
        self.prompt_tokens = Counter("dots_ocr:prompt_tokens", "Prompt tokens (image tokens included).",
                                     ["route"], registry=registry)
        self.generation_tokens = Counter("dots_ocr:generation_tokens", "Generated tokens.", ["route"],
                                         registry=registry)

        def per_route(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, ["route"], buckets=buckets, registry=registry)

        self.e2e = per_route("dots_ocr:e2e_request_latency_seconds",
                             "From the request's arrival to the end of its answer.", _LATENCY_BUCKETS)
        self.ttft = per_route("dots_ocr:time_to_first_token_seconds",
                              "From the request's arrival to its first generated token.", _STAGE_BUCKETS)
        self.load = per_route("dots_ocr:request_image_load_time_seconds",
                              "Reading, decoding or rendering the image.", _STAGE_BUCKETS)
        self.queue = per_route("dots_ocr:request_queue_time_seconds",
                               "Waiting to join the decoding batch.", _STAGE_BUCKETS)
        self.vision = per_route("dots_ocr:request_vision_time_seconds", "The vision tower.", _STAGE_BUCKETS)
        self.prefill = per_route("dots_ocr:request_prefill_time_seconds", "The LLM prefill.", _STAGE_BUCKETS)
        self.decode = per_route("dots_ocr:request_decode_time_seconds",
                                "From the first generated token to the last.", _LATENCY_BUCKETS)
        self.tpot = per_route("dots_ocr:time_per_output_token_seconds",
                              "Mean time per output token after the first, one observation per request.",
                              _TPOT_BUCKETS)
        registry.register(_StateCollector(state))

    def count_response(self, route: str, method: str, status: int) -> None:
        """One response. Every label comes from a fixed set, so no client can grow the scrape: the
        route is the URL rule that matched (``unmatched`` otherwise), a method outside HTTP's own
        set is ``other``, and the status is the server's own."""
        method = method if method in HTTP_METHODS else "other"
        self.http_requests.labels(route=route, method=method, status=str(status)).inc()
        if route == "/ocr" and status == 429:
            self.busy.inc()

    def page_finished(self, run: PageRun) -> None:
        """One generation that has ended, from any route (the page service's observer)."""
        stats, route = run.stats, run.request.route
        prompt_type = run.request.prompt_type or CHAT_PROMPT_TYPE
        reason = done_reason(stats.finish_reason)
        if stats.finish_reason not in ("eos", "length", "repetition", "cancelled"):
            self.errors.labels(prompt_type=prompt_type, route=route).inc()
        else:
            self.success.labels(finished_reason=reason, prompt_type=prompt_type, route=route).inc()
        self.prompt_tokens.labels(route=route).inc(stats.prompt_tokens)
        self.generation_tokens.labels(route=route).inc(stats.new_tokens)
        self.e2e.labels(route=route).observe(time.perf_counter() - run.started)
        self.load.labels(route=route).observe(run.load_s)
        if stats.ttft_s is not None:
            self.ttft.labels(route=route).observe(run.load_s + stats.ttft_s)
        self.queue.labels(route=route).observe(stats.queue_s)
        self.vision.labels(route=route).observe(stats.vision_s)
        self.prefill.labels(route=route).observe(stats.prefill_s)
        self.decode.labels(route=route).observe(stats.decode_s)
        if stats.new_tokens > 1:
            self.tpot.labels(route=route).observe(stats.decode_s / (stats.new_tokens - 1))

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def install(app: Flask, state) -> ServerMetrics:
    """Create the app's metrics, count every response and every generation (as the page
    service's observer), and serve ``GET /metrics``."""
    metrics = app.extensions[EXTENSION] = ServerMetrics(state)
    state.pages.observer = metrics

    @app.after_request
    def count(response):
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.count_response(rule, request.method, response.status_code)
        return response

    app.register_blueprint(bp)
    return metrics


@bp.get("/metrics")
def metrics_route():
    body, content_type = current_app.extensions[EXTENSION].exposition()
    return Response(body, content_type=content_type)


def access_note() -> Callable[[PageRun], None] | None:
    """A run's ``on_finish`` hook, taken while the request context is there (a stream ends after
    it): it notes the generation's statistics on the request's access line."""
    scope = request_log.current_scope()
    if scope is None:
        return None
    return lambda run: scope.note_job(run.statistics())
