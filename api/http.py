"""Request plumbing shared by every route group: the API key, the JSON body, the client-gone
probe, NDJSON lines."""
from __future__ import annotations

import datetime as _dt
import hmac
import json
import re
import select
import socket
import threading
import time
from typing import Any, Callable

from flask import request

from .config import ServerConfig
from .errors import RequestError

MAX_JSON_DEPTH = 64  # deeper bodies are refused before parsing (the parser would recurse)


def client_gone_probe(environ) -> Callable[[], bool] | None:
    """A cheap check, for the generation thread, that the HTTP client has closed its connection.

    Streams notice a gone client when a write fails; a non-streaming request writes nothing until
    the end, so it needs to ask the server. waitress (server.py) offers
    ``environ["waitress.client_disconnected"]`` (it keeps reading the connection while the request
    runs, api/serving.py). Under gunicorn (``gunicorn 'server:create_app()'``) the socket is in the
    environ: readable with nothing to read means the peer closed it. No WSGI-level API tells this.
    """
    disconnected = environ.get("waitress.client_disconnected")
    if callable(disconnected):
        return disconnected
    sock = environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return None
    return _socket_closed_probe(sock)


def _socket_closed_probe(sock: socket.socket) -> Callable[[], bool]:
    last = [0.0]
    gone = [False]

    def probe() -> bool:
        now = time.monotonic()
        if gone[0] or now - last[0] < 0.25:
            return gone[0]
        last[0] = now
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                gone[0] = True
        except BlockingIOError:
            pass
        except OSError:
            gone[0] = True
        return gone[0]

    return probe


def any_of(*checks: Callable[[], bool] | None) -> Callable[[], bool]:
    """One ``should_stop`` from several (None entries skipped)."""
    present = [check for check in checks if check is not None]
    return lambda: any(check() for check in present)


def now_iso() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S.%f")


def ndjson(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


# The bytes that matter to nesting: an escape pair (one token, so an escaped quote does not end a
# string), a quote, a bracket. Everything else (a multi-megabyte base64 image) is skipped in C.
_JSON_STRUCTURE = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)


def _json_depth_exceeds(data: bytes, limit: int) -> bool:
    """True when brackets nest deeper than ``limit`` (strings skipped). Checked before parsing:
    Python's json module recurses per level and a body nested thousands deep (closed or not) ends
    in RecursionError. Hand-written because no parser option bounds the depth."""
    if data.count(b"[") + data.count(b"{") <= limit:  # the common body: cannot nest that deep
        return False
    depth = 0
    in_string = False
    for match in _JSON_STRUCTURE.finditer(data):
        token = match.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:  # inside a string, or an escape pair
            continue
        elif token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:  # ] }
            depth -= 1
    return False


def json_body() -> Any:
    """The request's JSON body (None when empty); 400 for invalid or too deeply nested JSON."""
    data = request.get_data(cache=True)
    if _json_depth_exceeds(data, MAX_JSON_DEPTH):
        raise RequestError(f"Invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels")
    body = request.get_json(force=True, silent=True)
    if body is None and data:
        raise RequestError("Invalid JSON body")
    return body


def once(fn: Callable[[], None]) -> Callable[[], None]:
    done = threading.Lock()

    def wrapper() -> None:
        if done.acquire(blocking=False):
            fn()

    return wrapper


def check_api_key(config: ServerConfig) -> None:
    if not config.api_key:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
        raise RequestError("Unauthorized: send 'Authorization: Bearer <api key>'", 401)
