"""The HTTP server under the Flask app: waitress, with slow-client limits, JSON errors and a
graceful shutdown on SIGTERM.

Why waitress: gunicorn's threaded worker hands a connection to a request
thread as soon as it is readable, and that thread then blocks reading a slow request, so a few
dozen slowloris connections took every thread. waitress reads every connection in one event loop
and gives a request to a thread only once its headers and body have fully arrived, so slow or
idle connections cost a socket and a small buffer, never a thread. Its limits are used as they
are (connection count, header size, body size, idle time); two things are added here:

- a *request timeout*: a connection that has been sending one request for longer than
  ``request_timeout`` seconds is closed, however steadily it drips (waitress's own idle timeout
  only closes connections that send nothing);
- *JSON errors*: the errors waitress answers itself (malformed request, header too large, body
  too large) are ``{"error": ...}`` like every other error of the server.

Shutdown: the first SIGTERM (or SIGINT) starts draining: new ``/ocr`` requests get
503 at once, running ones may finish for ``graceful_timeout`` seconds; then the generations still
running are stopped, a stream ends with a last line ``{"error": "server shutting down", "done":
true, ...}`` and a plain request gets a 503; once every answer has been written (at most
``FINAL_WRITE_S`` more) the server exits. A second signal skips the rest of the grace time.
"""
from __future__ import annotations

import json
import logging
import resource
import signal
import time
from typing import Any, Callable

from flask import Flask
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask

from .config import ServerConfig
from .state import ServerState

log = logging.getLogger("dots_ocr_server")

#: After the grace time, how long the stopped requests have to write their last answer.
FINAL_WRITE_S = 5.0
#: How often the event loop wakes up to check the timeouts and the shutdown.
LOOP_TICK_S = 0.25
#: Messages for the limits waitress enforces, naming the flag (413: the app's own message too).
LIMIT_MESSAGES = {413: "Request body too large (limit: --max-body-mb)",
                  431: "Request line and headers too large (limit: --max-header-kb)"}


class _JsonErrorTask(ErrorTask):
    """waitress's answer to a request it could not parse, as JSON instead of plain text."""

    def execute(self) -> None:
        error = self.request.error
        message = LIMIT_MESSAGES.get(error.code) or f"{error.reason}: {error.body}"
        body = json.dumps({"error": message}, ensure_ascii=False).encode("utf-8")
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    """One client connection; remembers when the request it is reading began."""

    error_task_class = _JsonErrorTask
    request_started = 0.0

    def received(self, data: bytes) -> bool:
        if self.request is None:  # the first bytes of a new request
            self.request_started = time.time()
        return super().received(data)


class _Server(TcpWSGIServer):
    """waitress's TCP server with the request timeout added to its periodic clean-up."""

    channel_class = _Channel
    request_timeout = 60.0

    def maintenance(self, now: float) -> None:
        super().maintenance(now)
        cutoff = now - self.request_timeout
        for channel in list(self.active_channels.values()):
            # A request still being read (none complete and queued) that began too long ago.
            if channel.request is not None and not channel.requests and channel.request_started < cutoff:
                log.info("closing a connection from %s: request not received within %g s",
                         channel.addr, self.request_timeout)
                channel.will_close = True


def _raise_open_files_limit(needed: int) -> None:
    """Each connection is a file descriptor: lift the soft limit towards the hard one when the
    connection limit would not fit (the common 1024 default is close to it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def build_server(app: Flask, config: ServerConfig, socket_map: dict) -> _Server:
    """A waitress server for ``app`` (not running yet), with the limits of ``config``."""
    _raise_open_files_limit(config.connection_limit + 256)
    server = _Server(
        app,
        map=socket_map,
        host=config.host,
        port=config.port,
        # each request waiting in the /v1 queue holds a thread: add them, so that /health and /ocr
        # are still answered while the queue is full
        threads=max(2, config.threads) + max(0, config.max_queue),
        connection_limit=config.connection_limit,
        channel_timeout=max(1, round(config.idle_timeout)),
        cleanup_interval=1,
        max_request_header_size=config.max_header_kb * 1024,
        max_request_body_size=int(config.max_body_mb * 1024 * 1024),
        # Keep reading a connection while its request runs, so that a client that hangs up is
        # noticed (environ["waitress.client_disconnected"], api/http.client_gone_probe).
        channel_request_lookahead=1,
        ident="dots-ocr-server",
        clear_untrusted_proxy_headers=False,
    )
    server.request_timeout = config.request_timeout
    return server


class GracefulShutdown:
    """The shutdown sequence of the module docstring, driven from the event loop's thread."""

    def __init__(self, state: ServerState, graceful_timeout: float):
        self.state = state
        self.graceful_timeout = graceful_timeout
        self.requested_at: float | None = None

    def request(self, signum: int, _frame: Any = None) -> None:
        """Signal handler: only records the time (the loop does the rest)."""
        now = time.monotonic()
        if self.requested_at is None:
            log.warning("%s received: draining (new requests get 503; running ones have %g s to finish)",
                        signal.Signals(signum).name, self.graceful_timeout)
            self.requested_at = now
            self.state.shutting_down.set()
        else:
            log.warning("%s received again: stopping running requests now", signal.Signals(signum).name)
            self.requested_at = min(self.requested_at, now - self.graceful_timeout)

    def finished(self, server: _Server) -> bool:
        if self.requested_at is None:
            return False
        elapsed = time.monotonic() - self.requested_at
        if elapsed >= self.graceful_timeout and not self.state.stop_generation.is_set():
            log.warning("grace time over: stopping the generations still running")
            self.state.stop_generation.set()
        busy = any(channel.requests or channel.total_outbufs_len for channel in list(server.active_channels.values()))
        jobs = self.state.jobs
        busy = busy or (jobs is not None and jobs.busy)  # a job's page may finish within the grace time
        return not busy or elapsed >= self.graceful_timeout + FINAL_WRITE_S


def run(server: _Server, socket_map: dict, shutdown: GracefulShutdown,
        on_listening: Callable[[str], None] = log.info) -> None:
    """Serve until the shutdown has finished (SIGTERM/SIGINT start it), then close everything."""
    handlers = {sig: signal.signal(sig, shutdown.request) for sig in (signal.SIGTERM, signal.SIGINT)}
    on_listening(f"listening on http://{server.effective_host}:{server.effective_port} "
                 f"({server.adj.threads} request threads)")
    try:
        while not shutdown.finished(server):
            wasyncore.loop(timeout=LOOP_TICK_S, map=socket_map, use_poll=True, count=1)
    finally:
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=2)
        wasyncore.close_all(socket_map)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        log.info("server stopped")
