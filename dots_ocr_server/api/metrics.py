"""``GET /metrics``: Prometheus text format through ``prometheus_client`` (issue 12).

Metric names follow vLLM's (``vllm:time_to_first_token_seconds`` -> ``dots_ocr:time_to_first_token_seconds``,
...) so dashboards carry over. Each app has its own ``CollectorRegistry`` (never the process-wide
default), so several apps in one process (the tests) do not clash. ``/metrics`` is open like
``/health`` (no API key); ``--no-metrics`` leaves the route and the bookkeeping out.

What moves when:

* every response: ``dots_ocr:http_requests_total{route, method, status}`` (route = the URL rule,
  ``unmatched`` for a 404), and ``dots_ocr:request_busy_rejections_total`` for each 429 of /ocr;
* every /ocr generation when it ends (also a cancelled or failed one): the histograms, the token
  counters, and ``dots_ocr:request_success_total{finished_reason, prompt_type}`` (``stop``,
  ``length``, ``repetition``, ``cancelled``) or ``dots_ocr:request_generation_errors_total``;
* read at scrape time: running and waiting requests, ``model_loaded``, the model load time, and GPU
  memory in use and at peak (on a CUDA device only).
"""
from __future__ import annotations

import time
from typing import Any, Callable

from flask import Blueprint, Flask, Response, current_app, request

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

# Ollama's done_reason names (api/ocr.py) for the runner's finish reasons.
_FINISHED = {"eos": "stop", "length": "length", "repetition": "repetition", "cancelled": "cancelled"}


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
        # The engine's queue of prepared pages waiting to join the decoding batch (behind other
        # pages' prefill); batching.py keeps it private and has no counter of its own.
        engine = getattr(runner, "_engine", None)
        yield GaugeMetricFamily("dots_ocr:num_requests_waiting",
                                "Prepared requests waiting to join the decoding batch.",
                                value=len(getattr(engine, "_pending", ()) or ()))
        yield GaugeMetricFamily("dots_ocr:model_loaded", "1 when the model is loaded and /ocr can run.",
                                value=1 if state.model_loaded else 0)
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
        self.success = Counter("dots_ocr:request_success", "Finished generations by done_reason and prompt type.",
                               ["finished_reason", "prompt_type"], registry=registry)
        self.errors = Counter("dots_ocr:request_generation_errors", "Generations that failed with an error.",
                              ["prompt_type"], registry=registry)
        self.prompt_tokens = Counter("dots_ocr:prompt_tokens", "Prompt tokens (image tokens included).",
                                     registry=registry)
        self.generation_tokens = Counter("dots_ocr:generation_tokens", "Generated tokens.", registry=registry)
        self.e2e = histogram("dots_ocr:e2e_request_latency_seconds",
                             "From the request's arrival to the end of its answer.", _LATENCY_BUCKETS)
        self.ttft = histogram("dots_ocr:time_to_first_token_seconds",
                              "From the request's arrival to its first generated token.", _STAGE_BUCKETS)
        self.load = histogram("dots_ocr:request_image_load_time_seconds",
                              "Reading, decoding or rendering the image.", _STAGE_BUCKETS)
        self.queue = histogram("dots_ocr:request_queue_time_seconds",
                               "Waiting to join the decoding batch.", _STAGE_BUCKETS)
        self.vision = histogram("dots_ocr:request_vision_time_seconds", "The vision tower.", _STAGE_BUCKETS)
        self.prefill = histogram("dots_ocr:request_prefill_time_seconds", "The LLM prefill.", _STAGE_BUCKETS)
        self.decode = histogram("dots_ocr:request_decode_time_seconds",
                                "From the first generated token to the last.", _LATENCY_BUCKETS)
        self.tpot = histogram("dots_ocr:time_per_output_token_seconds",
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

    def observe_job(self, job, finished_at: float) -> None:
        """One /ocr generation that has ended (``api.ocr._Job``; its stats are final)."""
        stats, prompt_type = job.stats, job.req.prompt_type
        reason = _FINISHED.get(stats.finish_reason)
        if reason is None:
            self.errors.labels(prompt_type=prompt_type).inc()
        else:
            self.success.labels(finished_reason=reason, prompt_type=prompt_type).inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.new_tokens)
        self.e2e.observe(finished_at - job.started)
        self.load.observe(job.load_s)
        if stats.ttft_s is not None:
            self.ttft.observe(job.load_s + stats.ttft_s)
        self.queue.observe(stats.queue_s)
        self.vision.observe(stats.vision_s)
        self.prefill.observe(stats.prefill_s)
        self.decode.observe(stats.decode_s)
        if stats.new_tokens > 1:
            self.tpot.observe(stats.decode_s / (stats.new_tokens - 1))

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def install(app: Flask, state) -> ServerMetrics:
    """Create the app's metrics, count every response, and serve ``GET /metrics``."""
    metrics = app.extensions[EXTENSION] = ServerMetrics(state)

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


def job_observer() -> Callable[[Any], None]:
    """What /ocr calls once when a generation has ended (captured while the request context is
    there, since a stream ends after it): the metrics, if on, and the request's access line."""
    metrics: ServerMetrics | None = current_app.extensions.get(EXTENSION)
    scope = request_log.current_scope()

    def finished(job) -> None:
        now = time.perf_counter()
        if metrics is not None:
            metrics.observe_job(job, now)
        if scope is not None:
            scope.note_job(job.statistics())

    return finished
