"""Application state: the runner, its background loading, and the generation slots."""
from __future__ import annotations

import logging
import threading

from image_utils import ImagePolicy

from .config import ServerConfig
from .errors import NOT_LOADED_MESSAGE

log = logging.getLogger("dots_ocr_server")

DEMO_NOTICE = ("DEMO MODE: serving a tiny checkpoint with RANDOM weights; its output is meaningless. "
               "Download the real weights and start without --demo for real OCR.")


class SlotPool:
    """``size`` generation slots, with the non-blocking part of ``threading.Lock``'s interface:
    at size 1 it is the single processing lock of API.md; at N > 1 up to N requests hold a slot
    (and generate together in the runner's batch). A plain counter under a lock: a
    ``BoundedSemaphore`` cannot say how many are taken."""

    def __init__(self, size: int = 1):
        if size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.size = size
        self._taken = 0
        self._mutex = threading.Lock()

    def acquire(self, blocking: bool = False) -> bool:
        if blocking:
            raise ValueError("SlotPool only acquires without blocking")
        with self._mutex:
            if self._taken >= self.size:
                return False
            self._taken += 1
            return True

    def release(self) -> None:
        with self._mutex:
            if self._taken <= 0:
                raise RuntimeError("release of a slot that was not taken")
            self._taken -= 1

    @property
    def running(self) -> int:
        return self._taken

    def locked(self) -> bool:
        """True when no slot is free (a full pool, like a held lock)."""
        return self._taken >= self.size


class ServerState:
    def __init__(self, config: ServerConfig, runner):
        self.config = config
        self.runner = runner
        self.lock = SlotPool(config.max_batch_size)
        self.policy = ImagePolicy(image_root=config.image_root, allow_private_urls=config.allow_private_urls,
                                  max_image_pixels=config.max_image_pixels, max_pdf_pages=config.max_pdf_pages)
        self.load_error: str | None = None
        self.loader: threading.Thread | None = None

    @property
    def model_loaded(self) -> bool:
        return self.runner is not None and self.runner.loaded

    def start_loading(self) -> None:
        self.loader = threading.Thread(target=self._load, name="dots-ocr-load", daemon=True)
        self.loader.start()

    def _load(self) -> None:
        try:
            if self.config.demo:
                from model_runner.tiny import build_tiny_checkpoint

                build_tiny_checkpoint(self.runner.model_path, seed=0)
                log.warning(DEMO_NOTICE)
            self.runner.load()
        except Exception as exc:  # noqa: BLE001 - reported in /health and the log, the server keeps serving
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed; /ocr answers 500 '%s'", NOT_LOADED_MESSAGE)

