"""Request plumbing shared by every route group: the API key, the JSON body (one reader for every
route), the client-gone probe, NDJSON lines."""
from __future__ import annotations

import datetime as _dt
import hmac
import json
import re
import threading
from typing import Any, Callable, Iterable

from flask import Response, request

from image_utils import clip_for_message

from .config import ServerConfig
from .errors import RequestError

MAX_JSON_DEPTH = 64  # deeper bodies are refused before parsing (the parser would recurse)


def client_gone_probe(environ) -> Callable[[], bool] | None:
    """A cheap check, for the generation thread, that the HTTP client has closed its connection.

    Streams notice a gone client when a write fails; a non-streaming request writes nothing until
    the end, so it needs to ask the server: waitress (api/serving.py) keeps reading the connection
    while the request runs and offers ``environ["waitress.client_disconnected"]``. No WSGI-level
    API tells this, so under another WSGI server (a test client) there is no probe (None)."""
    disconnected = environ.get("waitress.client_disconnected")
    return disconnected if callable(disconnected) else None


def any_of(*checks: Callable[[], bool] | None) -> Callable[[], bool]:
    """One ``should_stop`` from several (None entries skipped)."""
    present = [check for check in checks if check is not None]
    return lambda: any(check() for check in present)


def now_iso() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S.%f")


def ndjson(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


# What matters to nesting: an escape pair (one token, so an escaped quote does not end a string),
# a quote, a bracket. Everything else (a multi-megabyte base64 image) is skipped in C.
_JSON_STRUCTURE = re.compile(r'\\.|["\[\]{}]', re.DOTALL)
# A UTF-16 code unit of a surrogate pair on its own: not a character, and no encoder takes it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def streaming_response(body: Iterable[bytes], mimetype: str, *on_close: Callable[[], None]) -> Response:
    """A streamed reply (NDJSON or server-sent events) that no cache or proxy holds back; each of
    ``on_close`` runs when the WSGI server closes the body, also when the client is gone before the
    body was iterated."""
    response = Response(body, mimetype=mimetype)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each line on at once
    for close in on_close:
        response.call_on_close(close)
    return response


def _json_depth_exceeds(text: str, limit: int) -> bool:
    """True when brackets nest deeper than ``limit`` (strings skipped). Checked on the decoded
    text, before parsing: Python's json module recurses per level and a body nested thousands deep
    (closed or not) ends in RecursionError. Hand-written because no parser option bounds the depth."""
    if text.count("[") + text.count("{") <= limit:  # the common body: cannot nest that deep
        return False
    depth = 0
    in_string = False
    for match in _JSON_STRUCTURE.finditer(text):
        token = match.group()
        if token == '"':
            in_string = not in_string
        elif in_string or len(token) == 2:  # inside a string, or an escape pair
            continue
        elif token in ("[", "{"):
            depth += 1
            if depth > limit:
                return True
        else:  # ] }
            depth -= 1
    return False


def decode_json_text(data: bytes) -> str:
    """The body as text, in whichever encoding JSON allows (UTF-8, UTF-16 or UTF-32, little or
    big endian, with or without a byte order mark), told apart exactly as ``json.loads`` tells
    them apart for bytes. Surrogates pass through here, to be refused by name later."""
    try:
        return data.decode(json.detect_encoding(data), "surrogatepass")
    except UnicodeDecodeError:
        raise RequestError("Invalid JSON body: the bytes are not UTF-8, UTF-16 or UTF-32 text") from None


def first_lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path (``messages[0].content``, ``prompt``, a key's own name) of the first string in a
    parsed JSON value that holds a lone surrogate (``"\\ud800"`` unpaired), or None. JSON's escapes
    can spell one; no tokenizer, file system or encoder accepts it."""
    if isinstance(value, str):
        return path or "body" if not value.isascii() and _LONE_SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if not key.isascii() and _LONE_SURROGATE.search(key):
                return (path + "." if path else "") + "<a field name>"
            found = first_lone_surrogate(item, where)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = first_lone_surrogate(item, f"{path}[{index}]")
            if found:
                return found
    return None


def parse_json(data: bytes) -> Any:
    """``data`` parsed as JSON (None when empty): one reader for every route that takes JSON. 400
    for bytes that are not JSON text, nesting deeper than ``MAX_JSON_DEPTH`` (in any encoding:
    the depth is counted on the decoded text), invalid JSON, and a lone surrogate in any string."""
    if not data:
        return None
    text = decode_json_text(data)
    if _json_depth_exceeds(text, MAX_JSON_DEPTH):
        raise RequestError(f"Invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(text)
    except RecursionError:  # a second line of defence behind the depth count
        raise RequestError(f"Invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        raise RequestError("Invalid JSON body") from None
    if body is None:  # a bare `null`: no body to read (as Flask's get_json reports it)
        raise RequestError("Invalid JSON body")
    where = first_lone_surrogate(body)
    if where is not None:
        raise RequestError(f"Invalid '{clip_for_message(where)}': contains a lone UTF-16 surrogate "
                           "(a \\ud800-\\udfff escape without its pair), which is not text")
    return body


def json_body() -> Any:
    """The request's JSON body (None when empty), read by :func:`parse_json`."""
    return parse_json(request.get_data(cache=True))


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
