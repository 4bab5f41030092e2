"""Application state: the runner, its background loading, and the generation slots."""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

from image_utils import ImagePolicy

from .config import ServerConfig
from .errors import NOT_LOADED_MESSAGE

log = logging.getLogger("dots_ocr_server")

DEMO_NOTICE = ("DEMO MODE: serving a tiny checkpoint with RANDOM weights; its output is meaningless. "
               "Download the real weights and start without --demo for real OCR.")


class QueueFull(Exception):
    """``SlotPool.acquire_queued`` found the waiting line at its bound."""


class SlotPool:
    """``size`` generation slots, with the non-blocking part of ``threading.Lock``'s interface:
    at size 1 it is the single processing lock of API.md; at N > 1 up to N requests hold a slot
    (and generate together in the runner's batch). A plain counter under a lock: a
    ``BoundedSemaphore`` cannot say how many are taken.

    ``acquire_queued`` (the OpenAI routes) waits for a slot in a bounded first-in-first-out line
    instead. Strict FIFO needs tickets: a ``Condition`` alone wakes waiters in no fixed order.
    While anyone waits in the line, ``acquire()`` fails, so a non-queued request cannot take a
    freed slot ahead of the line."""

    def __init__(self, size: int = 1):
        if size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.size = size
        self._taken = 0
        self._mutex = threading.Lock()
        self._freed = threading.Condition(self._mutex)
        self._line: deque[object] = deque()  # tickets of the waiting requests, oldest first

    def acquire(self, blocking: bool = False) -> bool:
        if blocking:
            raise ValueError("SlotPool only acquires without blocking")
        with self._mutex:
            if self._taken >= self.size or self._line:
                return False
            self._taken += 1
            return True

    def acquire_queued(self, max_queue: int, should_stop: Callable[[], bool] | None = None,
                       poll_s: float = 0.1) -> bool:
        """Take a slot, waiting behind the earlier waiters when none is free. Returns True with a
        slot taken; False when ``should_stop()`` (polled every ``poll_s``, outside the lock) said to
        give up, and then the request has left the line. Raises ``QueueFull`` when ``max_queue``
        requests already wait."""
        ticket = object()
        with self._mutex:
            if not self._line and self._taken < self.size:
                self._taken += 1
                return True
            if len(self._line) >= max_queue:
                raise QueueFull(f"{len(self._line)} requests are already waiting")
            self._line.append(ticket)
        try:
            while True:
                with self._mutex:
                    if self._line[0] is ticket and self._taken < self.size:
                        self._line.popleft()
                        self._taken += 1
                        self._freed.notify_all()  # the next in line may find a slot too
                        return True
                    self._freed.wait(poll_s)
                if should_stop is not None and should_stop():
                    return False
        finally:
            with self._mutex:
                if ticket in self._line:
                    self._line.remove(ticket)
                    self._freed.notify_all()  # the one behind may now be first

    def release(self) -> None:
        with self._mutex:
            if self._taken <= 0:
                raise RuntimeError("release of a slot that was not taken")
            self._taken -= 1
            self._freed.notify_all()

    @property
    def running(self) -> int:
        return self._taken

    @property
    def queued(self) -> int:
        """Requests waiting in ``acquire_queued``'s line."""
        return len(self._line)

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

