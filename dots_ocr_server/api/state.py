"""Application state: the runner, its background loading, the page service over it, and the
generation slots."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections import deque
from pathlib import Path
from typing import Callable

from image_utils import ImagePolicy

from ..pages import PageService
from .config import ServerConfig
from .errors import NOT_LOADED_MESSAGE, SHUTDOWN_MESSAGE, RequestError
from .http import any_of, client_gone_probe, once

log = logging.getLogger("dots_ocr_server")

DEMO_NOTICE = ("DEMO MODE: serving a tiny checkpoint with RANDOM weights; its output is meaningless. "
               "Download the real weights and start without --demo for real OCR.")


class QueueFull(Exception):
    """``SlotPool.acquire_queued`` found the waiting line at its bound."""


class SlotPool:
    """``size`` generation slots, with the non-blocking part of ``threading.Lock``'s interface:
    at size 1 it is the single processing lock of the dots.ocr API document; at N > 1 up to N requests hold a slot
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

    def acquire_waiting(self, should_stop: Callable[[], bool] | None = None, poll_s: float = 0.1) -> bool:
        """Take a slot as soon as one is free and nobody waits in ``acquire_queued``'s line (a
        document job's page: it yields to the interactive requests waiting there). Returns True
        with a slot taken; False when ``should_stop()`` (polled every ``poll_s``) said to give up."""
        while True:
            with self._mutex:
                if self._taken < self.size and not self._line:
                    self._taken += 1
                    return True
                self._freed.wait(poll_s)
            if should_stop is not None and should_stop():
                return False

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
                                  max_image_pixels=config.max_image_pixels, max_pdf_pages=config.max_pdf_pages,
                                  pdf_render_timeout=config.pdf_render_timeout)
        self.load_error: str | None = None
        self.loader: threading.Thread | None = None
        # Shutdown (api/serving.py): new /ocr requests are refused once ``shutting_down`` is set;
        # running generations stop once ``stop_generation`` is set (the grace time is over).
        self.shutting_down = threading.Event()
        self.stop_generation = threading.Event()
        self.gpu_warning: str | None = None  # a GPU torch cannot use (api/gpu_check.py)
        # every route's page goes through it; /metrics installs itself as its observer
        self.pages = PageService(runner, self.policy)
        self.jobs = None  # the document jobs (dots_ocr_server.jobs.JobManager), unless --no-jobs

    @property
    def model_loaded(self) -> bool:
        return self.runner is not None and self.runner.loaded

    def refuse_when_shutting_down(self) -> None:
        """503 ``server shutting down`` for a new request once a shutdown has begun (/v1's error
        handler gives it OpenAI's shape)."""
        if self.shutting_down.is_set():
            raise RequestError(SHUTDOWN_MESSAGE, 503)

    def generation_should_stop(self, environ) -> Callable[[], bool]:
        """A request's ``should_stop``: its client hung up, or the shutdown's grace time is over."""
        return any_of(client_gone_probe(environ), self.stop_generation.is_set)

    def wake_interval_s(self, stream: bool) -> float:
        """How often the request's thread collects decoded tokens (the generation request's
        ``wake_interval_s``): a stream every ``--stream-interval-ms``, a whole answer rarely."""
        from model_runner.generation import BATCHED_WAKE_INTERVAL_S

        return self.config.stream_interval_ms / 1000 if stream else BATCHED_WAKE_INTERVAL_S

    def require_free_slot(self) -> None:
        """What ``take_slot`` would refuse, checked without taking one (before a page is loaded,
        so that a busy server answers 429 at once, without reading the page first)."""
        if not self.model_loaded:
            raise RequestError(NOT_LOADED_MESSAGE, 500)
        if self.lock.locked() or self.lock.queued:
            raise RequestError.busy()

    def take_slot(self) -> Callable[[], None]:
        """A generation slot at once, as the interface document's routes take it: 500 while the
        model is not loaded, 429 (with ``Retry-After``) when every slot is busy. Returns the
        release function (safe to call more than once; the slot is freed on the first call)."""
        if not self.model_loaded:
            raise RequestError(NOT_LOADED_MESSAGE, 500)
        if not self.lock.acquire(blocking=False):
            raise RequestError.busy()
        return once(self.lock.release)

    def start_loading(self) -> None:
        self.loader = threading.Thread(target=self._load, name="dots-ocr-load", daemon=True)
        self.loader.start()

    def _load(self) -> None:
        try:
            if self.config.demo:
                ensure_demo_checkpoint(Path(self.runner.model_path))
                log.warning(DEMO_NOTICE)
                log.warning("demo mode: a request that sets no max_new_tokens generates at most %d tokens "
                            "(/health: default_max_new_tokens; --default-max-new-tokens changes it)",
                            self.config.max_new_tokens_default)
            self.runner.load()
        except Exception as exc:  # reported in /health and the log, the server keeps serving
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed; /ocr answers 500 '%s'", NOT_LOADED_MESSAGE)



def demo_checkpoint_dir() -> Path:
    """Where ``--demo`` keeps its tiny checkpoint: a cache folder that later starts reuse (issue
    15.5: a temporary folder was left behind when the server was killed), named after a hash of
    the builder's source so that a changed builder builds anew."""
    import model_runner.tiny as tiny

    digest = hashlib.sha256(Path(tiny.__file__).read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dots-ocr-server" / f"demo-{digest}" / "DotsOCR-tiny-random"


def ensure_demo_checkpoint(path: Path) -> Path:
    """Build the demo checkpoint at ``path`` unless it is there. It is built in a sibling folder
    named after this process and renamed into place when complete, so ``path`` existing means a
    whole checkpoint, and servers starting together cannot see each other's half-written files."""
    if path.is_dir():
        log.info("demo checkpoint reused from %s", path)
        return path
    from model_runner.tiny import build_tiny_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(path.parent)
    building = path.parent / f".building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    try:
        build_tiny_checkpoint(building, seed=0)
        try:
            building.rename(path)
        except OSError:  # another server put it there first: theirs is the same checkpoint
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    log.info("demo checkpoint built in %s", path)
    return path


def _remove_abandoned_builds(folder: Path) -> None:
    """Half-built checkpoints of processes that no longer run (killed while building)."""
    for leftover in folder.glob(".building-*"):
        try:
            os.kill(int(leftover.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except (ValueError, PermissionError):
            pass
