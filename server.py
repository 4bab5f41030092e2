"""dots-ocr-server: the dots.ocr API document's HTTP interface (and a few more routes) on our own runner.

``create_app(config=None, runner=None)`` builds the Flask app from the route groups in ``api/``
(blueprints); ``main()`` parses the command line and serves it with waitress (a production WSGI
server: one process, an event loop for the connections and several request threads, so a request
that finds every generation slot taken is answered 429 at once; see api/serving.py). Nothing happens at import time.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

from flask import Flask

from dots_ocr_server.api.config import ServerConfig, parse_args
from dots_ocr_server.api.errors import (BUSY_MESSAGE, MODEL_NAME, NO_IMAGE_MESSAGE, NOT_LOADED_MESSAGE, RequestError,
                        register_error_handlers)
from dots_ocr_server.api.schemas import OCRRequest, validate_request
from dots_ocr_server.api.state import DEMO_NOTICE, ServerState, SlotPool, demo_checkpoint_dir

__all__ = ["create_app", "main", "serve", "ServerConfig", "parse_args", "RequestError", "OCRRequest",
           "validate_request", "SlotPool", "BUSY_MESSAGE", "MODEL_NAME", "NO_IMAGE_MESSAGE", "NOT_LOADED_MESSAGE"]

log = logging.getLogger("dots_ocr_server")


def create_app(config: ServerConfig | dict | None = None, runner=None) -> Flask:
    """Build the Flask app. With no ``runner`` one is made from ``config`` and loaded on a
    background thread (``/health`` answers at once, ``model_loaded`` false until it is ready); a
    given runner that is not loaded yet is loaded the same way."""
    if not isinstance(config, ServerConfig):
        config = ServerConfig.from_mapping(config)
    if not config.stream_interval_ms >= 0:
        raise ValueError("--stream-interval-ms must be >= 0")
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(config.max_body_mb * 1024 * 1024)
    app.json.ensure_ascii = False
    app.json.sort_keys = False

    if runner is None:
        from model_runner.runner import ModelRunner

        if config.demo:
            config = dataclasses.replace(config, model_path=str(demo_checkpoint_dir()))
        runner = ModelRunner.from_config(config)
    state = ServerState(config, runner)
    app.extensions["dots_ocr"] = state
    if config.device != "cpu":
        _check_gpu(state)
    if not runner.loaded:
        state.start_loading()

    register_error_handlers(app)
    from dots_ocr_server.api import metrics, request_log
    from dots_ocr_server.api.inspect import bp as inspect_routes
    from dots_ocr_server.api.ocr import bp as ocr_routes
    from dots_ocr_server.api.openai import bp as openai_routes
    from dots_ocr_server.api.openapi import bp as openapi_routes
    from dots_ocr_server.api.ui import bp as ui_routes

    request_log.install(app)
    if config.jobs:
        from dots_ocr_server.api.jobs import bp as job_routes
        from dots_ocr_server.jobs import JobManager

        state.jobs = JobManager(state)  # started by its first job, or by serve() for unfinished ones
        app.register_blueprint(job_routes)
    app.register_blueprint(ocr_routes)
    app.register_blueprint(openai_routes)
    app.register_blueprint(openapi_routes)
    app.register_blueprint(inspect_routes)
    app.register_blueprint(ui_routes)
    if config.metrics:
        metrics.install(app, state)
    return app


def _check_gpu(state: ServerState) -> None:
    """A GPU that torch cannot use (driver too old for torch's CUDA build): say so loudly, in
    the log and in /health (api/gpu_check.py)."""
    from dots_ocr_server.api.gpu_check import gpu_warning

    state.gpu_warning = gpu_warning()
    if state.gpu_warning:
        banner = "!" * 100
        log.warning("\n%s\nGPU NOT USED: %s\n%s", banner, state.gpu_warning, banner)


MISSING_WEIGHTS = """\
No dots.ocr checkpoint at {path} (config.json is missing).
Fix it one of these ways:
  * download the weights into that folder (see README, "Real weights"), e.g.
      python scripts/download_weights.py ./weights/DotsOCR
  * point the server at a downloaded folder:  python server.py --model-path /path/to/DotsOCR
  * try the server without weights:           python server.py --demo   (tiny random model, no real OCR)"""


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    from dots_ocr_server.api.request_log import configure_logging

    configure_logging(config.log_format)
    if not config.demo and not (Path(config.model_path) / "config.json").is_file():
        print(MISSING_WEIGHTS.format(path=config.model_path), file=sys.stderr)
        return 2
    if config.demo:
        banner = "*" * len(DEMO_NOTICE)
        log.warning("\n%s\n%s\n%s", banner, DEMO_NOTICE, banner)
    serve(config)
    return 0


def batching_torch_threads(cores: int) -> int:
    """torch's intra-op threads for a CPU server that batches (``--max-batch-size`` > 1) when
    ``--torch-threads`` is not given: half the cores, so that the request threads (prompt
    preparation, token-to-text, JSON, HTTP) and the decoding loop keep the other half. On 2 cores,
    torch's default (one thread per core) made the batching gain erratic run to run (1.13x, 1.24x,
    2.26x for 4 pages together over one by one) while 1 thread gave 1.9x-2.1x every time
    (scripts/bench_throughput.py, docs/BENCHMARKS.md)."""
    return max(1, cores // 2)


def apply_process_settings(config: ServerConfig) -> None:
    """What the configuration sets for the whole process (not per app): torch's CPU threads, as
    asked (``--torch-threads``), or chosen for batching on a CPU (``batching_torch_threads``)."""
    import torch

    from dots_ocr_server.eval.machine import usable_cores

    threads, why = config.torch_threads, "--torch-threads"
    if threads is not None and threads < 1:
        raise ValueError("--torch-threads must be at least 1")
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if threads is None and on_cpu and config.max_batch_size > 1:
        cores = usable_cores()
        threads = batching_torch_threads(cores)
        why = (f"chosen for batching on a CPU: half of the {cores} cores, the rest left to the request threads; "
               "--torch-threads N sets it")
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("torch uses %d intra-op CPU thread%s (%s)", threads, "" if threads == 1 else "s", why)


def serve(config: ServerConfig, runner=None) -> None:
    """Serve with waitress (api/serving.py): one process (the model lives there), an event loop
    that reads every connection, and ``threads`` request threads that only see complete requests;
    SIGTERM drains gracefully. ``runner``: as in ``create_app`` (benchmarks pass their own)."""
    from dots_ocr_server.api.serving import GracefulShutdown, build_server, run

    apply_process_settings(config)
    app = create_app(config, runner=runner)
    state = app.extensions["dots_ocr"]
    if state.jobs is not None:
        state.jobs.resume_if_any()  # jobs a stop or a crash left unfinished go on
    socket_map: dict = {}
    server = build_server(app, config, socket_map)
    run(server, socket_map, GracefulShutdown(app.extensions["dots_ocr"], config.graceful_timeout))


if __name__ == "__main__":
    sys.exit(main())
