"""HTTP: the client of ``/health`` and ``/ocr``: retries of 429 (backoff that honours the server's
Retry-After), clear errors for the rest, streamed answers joined into the plain answer's shape.
The document jobs' routes (``/jobs``) are called through :meth:`OCRClient.post` and
:meth:`OCRClient.get` by :mod:`.jobs_api`.

One :class:`OCRClient` is shared by the worker threads: each thread gets its own
``requests.Session`` (a session's connection pool is not meant to be shared between threads).
"""
from __future__ import annotations

import email.utils
import json
import threading
import time
from typing import Any, Callable, Optional

from .errors import FatalError, PageError

__all__ = ["API_KEY_ENV", "START_HINT", "OCRClient", "backoff_delay", "error_message", "normalize_server",
           "parse_retry_after"]

API_KEY_ENV = "DOTS_OCR_API_KEY"
START_HINT = "python server.py --model-path ./weights/DotsOCR   (or, without weights: python server.py --demo)"


def backoff_delay(attempt: int, base: float, cap: float, retry_after: Optional[float] = None) -> float:
    """Seconds to wait before retry number ``attempt + 1``: ``base * 2**attempt`` (at least the
    server's Retry-After when it sent one), never more than ``cap``."""
    delay = base * (2.0 ** min(attempt, 60))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return max(0.0, min(delay, cap))


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """A Retry-After header in seconds: delay-seconds (``"2"``) or an HTTP date; None if absent
    or unreadable."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:  # not an HTTP date (those are always in GMT)
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_message(response) -> str:
    """The server's error message in ``response`` (its JSON ``error``, else the start of its text)."""
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("error"):
            error = body["error"]
            if isinstance(error, dict) and isinstance(error.get("message"), str):  # OpenAI's shape (/v1)
                return error["message"]
            return str(error)
    except ValueError:
        pass
    text = (response.text or "").strip()
    return text[:300] if text else (response.reason or "no details")


def normalize_server(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


class OCRClient:
    """A thin, thread-safe client of ``/health`` and ``/ocr``.

    ``ocr()`` retries 429 (server busy) with exponential backoff up to ``max_retries`` times;
    other HTTP errors and timeouts raise PageError with the server's message; an unreachable
    server, a refused API key or a server without this client's request fields raise FatalError.
    """

    def __init__(self, server: str, *, api_key: Optional[str] = None, timeout: float = 600.0,
                 max_retries: int = 8, retry_wait: float = 1.0, max_retry_wait: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep, notify: Callable[[str], None] = print):
        self.server = normalize_server(server)
        self.api_key = api_key
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.retry_wait = float(retry_wait)
        self.max_retry_wait = float(max_retry_wait)
        self.sleep = sleep
        self.notify = notify
        self._retries = 0  # 429 retries over the whole run, all threads
        self._lock = threading.Lock()
        self._ready_lock = threading.Lock()  # one thread polls /health; the others wait for it
        self._local = threading.local()
        self._sessions: list = []
        self._health: Optional[dict[str, Any]] = None

    @property
    def retries(self) -> int:
        with self._lock:
            return self._retries

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            session.headers["User-Agent"] = "dots-ocr-client"
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def unreachable(self, detail: str = "") -> FatalError:
        message = (f"cannot reach the server at {self.server} — is it running? "
                   f"(start it with: {START_HINT})")
        return FatalError(message + (f"\n  detail: {detail}" if detail else ""))

    def _request(self, method: str, path: str, **kwargs):
        import requests

        timeout = (min(10.0, self.timeout), self.timeout)
        for attempt in (0, 1):
            try:
                return self._session().request(method, self.server + path, timeout=timeout, **kwargs)
            except requests.exceptions.ConnectionError as exc:
                # One quick second try covers a kept-alive connection the server just closed.
                if attempt == 1:
                    raise self.unreachable(type(exc).__name__) from None
                self.sleep(0.2)
            except requests.exceptions.Timeout:
                raise PageError(f"no answer from the server within {self.timeout:g} s (--timeout)") from None
            except requests.exceptions.RequestException as exc:
                raise PageError(f"request failed: {exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _get_health(self) -> Optional[dict[str, Any]]:
        try:
            response = self._request("GET", "/health")
        except PageError as exc:
            raise FatalError(f"the server at {self.server} does not answer /health: {exc}") from None
        try:
            body = response.json() if response.status_code == 200 else None
        except ValueError:
            body = None
        finally:
            response.close()
        return body if isinstance(body, dict) else None

    def ensure_ready(self) -> dict[str, Any]:
        """``/health`` once, before the first page: wait (up to the timeout) while the server is
        still loading its model. Returns its body ({} from a server whose /health is not JSON)."""
        with self._ready_lock:
            if self._health is None:
                self._health = self._wait_until_loaded()
            return self._health

    def _wait_until_loaded(self) -> dict[str, Any]:
        start = time.monotonic()
        said_waiting = False
        while True:
            body = self._get_health()
            if body is None or body.get("model_loaded", True) is not False:
                if body and body.get("demo") and body.get("warning"):
                    self.notify(f"warning: {body['warning']}")
                break
            if body.get("load_error"):
                raise FatalError(f"the server could not load its model: {body['load_error']}")
            if time.monotonic() - start > self.timeout:
                raise FatalError(f"the server's model is still not loaded after {self.timeout:g} s")
            if not said_waiting:
                self.notify("the server is still loading its model; waiting ...")
                said_waiting = True
            self.sleep(0.5)
        return body or {}

    def max_batch_size(self) -> int:
        """How many requests the server generates together (``/health``'s ``max_batch_size``;
        1 for a server that does not say)."""
        value = self.ensure_ready().get("max_batch_size")
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1

    def ocr(self, payload: dict[str, Any], on_text: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
        """POST /ocr; the result is the server's JSON (for ``stream`` the pieces joined into the
        same shape, plus the extra fields of the stream's last line)."""
        stream = bool(payload.get("stream"))
        response = self.post("/ocr", payload, stream=stream)
        try:
            return _read_stream(response, on_text) if stream else _read_json(response)
        finally:
            response.close()

    def get(self, path: str, *, params: Optional[dict[str, Any]] = None, stream: bool = False):
        """GET ``path`` (e.g. ``/metrics``) with the query ``params``; the response, whatever its
        status (the caller closes it)."""
        return self._request("GET", path, params=params, stream=stream)

    def key_refused(self, message: str) -> FatalError:
        """The error for a 401: the server refused the API key (or wanted one)."""
        return FatalError(f"the server refused the request (HTTP 401: {message}); "
                          f"pass its key with --api-key or the {API_KEY_ENV} environment variable")

    def post(self, path: str, payload: dict[str, Any], *, stream: bool = False,
             files: Optional[dict[str, Any]] = None):
        """POST ``payload`` as JSON to ``path`` (with ``files``: a multipart upload, ``payload``
        its form fields) with the 429 retries and errors of :meth:`ocr`; the 2xx response (the
        caller reads and closes it). PageError carries the HTTP status."""
        self.ensure_ready()
        body = {"json": payload} if files is None else {"data": payload, "files": files}
        attempt = 0
        while True:
            response = self._request("POST", path, stream=stream, **body)
            status = response.status_code
            if 200 <= status < 300:
                return response
            message = error_message(response)
            response.close()
            if status == 429:
                if attempt >= self.max_retries:
                    raise PageError(f"server still busy after {self.max_retries} retries (HTTP 429: {message})",
                                    status=429)
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                self.sleep(backoff_delay(attempt, self.retry_wait, self.max_retry_wait, retry_after))
                attempt += 1
                with self._lock:
                    self._retries += 1
                continue
            if status == 401:
                raise self.key_refused(message)
            if status == 400 and message.startswith("Unknown field"):
                raise FatalError(f"the server does not accept this client's requests (HTTP 400: {message}); "
                                 "is it an older dots-ocr-server? Update it.")
            raise PageError(f"HTTP {status}: {message}", status=status)


def _read_json(response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise PageError("the server answered with a body that is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("response"), str):
        raise PageError("the server's answer has no 'response' text")
    return body


def _read_stream(response, on_text: Optional[Callable[[int], None]]) -> dict[str, Any]:
    import requests

    parts: list[str] = []
    tokens: list[Any] = []  # every line's logprobs, when asked for
    chars = 0
    final: Optional[dict[str, Any]] = None
    try:
        for raw in response.iter_lines(chunk_size=256):
            if not raw:
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                raise PageError("the server sent a stream line that is not JSON") from None
            if not isinstance(line, dict):
                raise PageError("the server sent a stream line that is not a JSON object")
            if line.get("error"):
                raise PageError(f"the stream ended with an error: {line['error']}")
            if isinstance(line.get("logprobs"), list):
                tokens.extend(line["logprobs"])
            piece = line.get("response")
            if isinstance(piece, str) and piece:
                parts.append(piece)
                chars += len(piece)
                if on_text is not None:
                    on_text(chars)
            if line.get("done"):
                final = line
                break
    except requests.exceptions.RequestException as exc:
        raise PageError(f"the connection broke while streaming ({type(exc).__name__})") from None
    if final is None:
        raise PageError("the stream ended before its last line (\"done\": true)")
    result: dict[str, Any] = {"model": final.get("model"), "response": "".join(parts)}
    for key, value in final.items():
        if key not in ("model", "created_at", "response", "done"):
            result[key] = value
    if tokens or "logprobs" in final:
        result["logprobs"] = tokens
    return result
