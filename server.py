"""dots-ocr-server: the HTTP API of ../shared/spec/API.md on our own dots.ocr runner.

``create_app(config=None, runner=None)`` builds the Flask app from the route groups in ``api/``
(blueprints); ``main()`` parses the command line and serves it with gunicorn (a production WSGI
server: one process, several threads, so a request that finds every generation slot taken is
answered 429 at once). Nothing happens at import time.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from flask import Flask

from api.config import ServerConfig, parse_args
from api.errors import (BUSY_MESSAGE, MODEL_NAME, NO_IMAGE_MESSAGE, NOT_LOADED_MESSAGE, RequestError,
                        register_error_handlers)
from api.schemas import OCRRequest, validate_request
from api.state import DEMO_NOTICE, ServerState, SlotPool

__all__ = ["create_app", "main", "serve", "ServerConfig", "parse_args", "RequestError", "OCRRequest",
           "validate_request", "SlotPool", "BUSY_MESSAGE", "MODEL_NAME", "NO_IMAGE_MESSAGE", "NOT_LOADED_MESSAGE"]

log = logging.getLogger("dots_ocr_server")


def create_app(config: ServerConfig | dict | None = None, runner=None) -> Flask:
    """Build the Flask app. With no ``runner`` one is made from ``config`` and loaded on a
    background thread (``/health`` answers at once, ``model_loaded`` false until it is ready); a
    given runner that is not loaded yet is loaded the same way."""
    if not isinstance(config, ServerConfig):
        config = ServerConfig.from_mapping(config)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(config.max_body_mb * 1024 * 1024)
    app.json.ensure_ascii = False
    app.json.sort_keys = False

    if runner is None:
        from model_runner.runner import ModelRunner

        if config.demo:
            demo_dir = Path(tempfile.mkdtemp(prefix="dots-ocr-demo-"))
            atexit.register(shutil.rmtree, demo_dir, ignore_errors=True)
            config = dataclasses.replace(config, model_path=str(demo_dir / "DotsOCR-tiny-random"))
        runner = ModelRunner.from_config(config)
    state = ServerState(config, runner)
    app.extensions["dots_ocr"] = state
    if not runner.loaded:
        state.start_loading()

    register_error_handlers(app)
    from api.inspect import bp as inspect_routes
    from api.ocr import bp as ocr_routes
    from api.ui import bp as ui_routes

    app.register_blueprint(ocr_routes)
    app.register_blueprint(inspect_routes)
    app.register_blueprint(ui_routes)
    return app


MISSING_WEIGHTS = """\
No dots.ocr checkpoint at {path} (config.json is missing).
Fix it one of these ways:
  * download the weights into that folder (see README, "Real weights"), e.g.
      python scripts/download_weights.py ./weights/DotsOCR
  * point the server at a downloaded folder:  python server.py --model-path /path/to/DotsOCR
  * try the server without weights:           python server.py --demo   (tiny random model, no real OCR)"""


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not config.demo and not (Path(config.model_path) / "config.json").is_file():
        print(MISSING_WEIGHTS.format(path=config.model_path), file=sys.stderr)
        return 2
    if config.demo:
        banner = "*" * len(DEMO_NOTICE)
        log.warning("\n%s\n%s\n%s", banner, DEMO_NOTICE, banner)
    serve(config)
    return 0


def serve(config: ServerConfig) -> None:
    """Serve with gunicorn: one worker process (the model lives there), ``threads`` threads."""
    from gunicorn.app.base import BaseApplication

    class _Gunicorn(BaseApplication):
        def load_config(self):
            settings = {
                "bind": f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}",
                "workers": 1,
                "worker_class": "gthread",
                "threads": max(2, config.threads),
                "timeout": 300,
                "graceful_timeout": 10,
                "keepalive": 5,
                "accesslog": "-",
                "errorlog": "-",
                "loglevel": "info",
            }
            # gunicorn >= 25.1 opens a control socket at one fixed path per user; two servers
            # on one machine would fight over it, and nothing here uses it.
            if "control_socket_disable" in self.cfg.settings:
                settings["control_socket_disable"] = True
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self):
            return create_app(config)

    _Gunicorn().run()


if __name__ == "__main__":
    sys.exit(main())
