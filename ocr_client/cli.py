"""``dots-ocr-client``: run a folder of images and PDFs through dots-ocr-server.

Every page becomes one ``POST /ocr`` request (images and PDFs are sent as base64, PDFs with
``page=k`` and ``dpi``), and its results land in ``OUT/<input name>/page_NNNN/``:

- ``layout.json``   the layout cells (bbox in original page pixels), layout prompt types only
- ``page.md``       the server's Markdown (layout prompt types) or the raw answer text
- ``page.png``      the page with the layout drawn on it (the plain page for other prompt types)
- ``response.json`` the server's JSON, written last and atomically: it marks the page as done,
                    so a second run skips the page (``--force`` redoes it)

The run ends with a summary (also ``OUT/summary.json``). Exit codes: 0 all pages done,
1 some page failed, 2 the run could not go on (server unreachable, API key refused, bad
arguments, nothing to do), 130 interrupted.
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = [
    "main", "build_parser", "collect_inputs", "assign_names", "backoff_delay", "OCRClient",
    "InputFile", "FatalError", "PageError",
]

DEFAULT_SERVER = "http://127.0.0.1:5000"
DEFAULT_OUT = "./ocr_output"
API_KEY_ENV = "DOTS_OCR_API_KEY"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
INPUT_SUFFIXES = IMAGE_SUFFIXES + (".pdf",)
#: Image formats the server decodes (Pillow names); PDFs are recognised by their bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
SUPPORTED_TEXT = "PNG, JPEG, WebP, BMP, TIFF, GIF or PDF"
#: prompt_grounding_ocr needs a bbox per request, which a batch client has no use for.
PROMPT_TYPES = ("prompt_layout_all_en", "prompt_layout_only_en", "prompt_ocr")
LAYOUT_PROMPT_TYPES = ("prompt_layout_all_en", "prompt_layout_only_en")
MIN_DPI, MAX_DPI = 36, 600
MARKER_NAME = "response.json"
SUMMARY_NAME = "summary.json"
START_HINT = "python server.py --model-path ./weights/DotsOCR   (or, without weights: python server.py --demo)"

EXIT_OK, EXIT_FAILED, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 2, 130


class FatalError(Exception):
    """Stops the whole run (exit code 2): server unreachable, API key refused, server too old."""


class PageError(Exception):
    """One page (or one input) failed; the run goes on."""


# ---------------------------------------------------------------------------------------------
# Inputs: files and folders -> validated images and PDFs, each with its output folder name
# ---------------------------------------------------------------------------------------------


@dataclass
class InputFile:
    path: Path
    label: str                 # how messages and the summary name it (relative to the cwd)
    kind: str = "invalid"      # "image" | "pdf" | "invalid"
    error: Optional[str] = None
    page_count: int = 0
    name: str = ""             # its folder under OUT


def _label(path: Path) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        relative = ".."
    if relative == ".." or relative.startswith(".." + os.sep):
        return Path(os.path.abspath(path)).as_posix()
    return Path(relative).as_posix()


def _walk(folder: Path) -> list[Path]:
    """Files with a supported extension under ``folder``, recursively, sorted by relative path;
    hidden files and folders (``.git``, macOS ``._x.png`` resource forks, ...) are left out."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in INPUT_SUFFIXES:
                found.append(Path(root) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _pdf_open_error(exc: Exception) -> str:
    try:
        import pypdfium2.raw as pdfium_c

        if getattr(exc, "err_code", None) in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY):
            return "the PDF is encrypted or password-protected (only unprotected PDFs are supported)"
    except Exception:  # noqa: BLE001 - only used to pick the message
        pass
    return "the PDF is damaged or not a valid PDF"


def count_pdf_pages(path: Path) -> int:
    """Number of pages of the PDF at ``path`` (pypdfium2); PageError with a reason if unreadable."""
    import pypdfium2 as pdfium

    from image_utils.pdf import PDFIUM_LOCK

    with PDFIUM_LOCK:
        try:
            document = pdfium.PdfDocument(str(path))
        except Exception as exc:  # noqa: BLE001 - PdfiumError or an OS error: the reason is reported
            raise PageError(_pdf_open_error(exc)) from None
        try:
            return len(document)
        finally:
            document.close()


def _image_format(path: Path) -> str:
    """Pillow's format name for the image at ``path`` (header only); PageError if it is none."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.format or "unknown"
    except Image.DecompressionBombError as exc:
        raise PageError(f"the image is too large to process ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise PageError(f"not an image or PDF (supported: {SUPPORTED_TEXT})") from None


def classify(path: Path) -> InputFile:
    """Look at the file's bytes (not its extension) and fill in kind, page count or error."""
    from image_utils.decode import is_pdf_bytes

    item = InputFile(path=path, label=_label(path))
    try:
        with open(path, "rb") as handle:
            head = handle.read(1024)
    except OSError as exc:
        item.error = f"{item.label}: cannot read the file ({exc.strerror or exc})"
        return item
    try:
        if head and is_pdf_bytes(head):
            pages = count_pdf_pages(path)
            if pages < 1:
                raise PageError("the PDF has no pages")
            item.kind, item.page_count = "pdf", pages
        else:
            fmt = _image_format(path)
            if fmt not in IMAGE_FORMATS:
                raise PageError(f"unsupported image format {fmt} (supported: {SUPPORTED_TEXT})")
            item.kind, item.page_count = "image", 1
    except PageError as exc:
        item.error = f"{item.label}: {exc}"
    return item


def collect_inputs(paths: list[str], warn: Callable[[str], None] = lambda _m: None) -> list[InputFile]:
    """Files as given (any extension, recognised by content) and folders (recursed, sorted, only
    supported extensions), without duplicates. Missing paths and unusable files come back as
    ``kind == "invalid"`` items with an ``error`` naming them."""
    items: list[InputFile] = []
    seen: set[str] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files = _walk(path)
            if not files:
                warn(f"warning: no images or PDFs in folder {_label(path)}")
        elif path.exists():
            files = [path]
        else:
            label = _label(path)
            items.append(InputFile(path=path, label=label, error=f"{label}: no such file or folder"))
            continue
        for file in files:
            key = os.path.realpath(file)
            if key in seen:
                continue
            seen.add(key)
            items.append(classify(file))
    return items


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def assign_names(items: list[InputFile]) -> None:
    """Output folder per input: the file's stem, or ``<stem>-<hash of its relative path>`` when
    several inputs share a stem (compared case-insensitively, for case-insensitive file systems)
    or the stem would clash with ``summary.json``."""
    groups: dict[str, list[InputFile]] = {}
    for item in items:
        if item.kind == "invalid":
            continue
        stem = item.path.stem.strip() or "input"
        if stem in (".", ".."):
            stem = "input"
        item.name = stem
        groups.setdefault(stem.casefold(), []).append(item)
    for key, group in groups.items():
        if len(group) > 1 or key == SUMMARY_NAME.casefold():
            for item in group:
                item.name = f"{item.name}-{_short_hash(item.label)}"


# ---------------------------------------------------------------------------------------------
# HTTP: retries for 429, clear errors for the rest
# ---------------------------------------------------------------------------------------------


def backoff_delay(attempt: int, base: float, cap: float, retry_after: Optional[float] = None) -> float:
    """Seconds to wait before retry number ``attempt + 1``: ``base * 2**attempt`` (at least the
    server's Retry-After when it sent one), never more than ``cap``."""
    delay = base * (2.0 ** min(attempt, 60))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return max(0.0, min(delay, cap))


def _retry_after(response) -> Optional[float]:
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _error_message(response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("error"):
            return str(body["error"])
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
    """A thin client of ``/health`` and ``/ocr``.

    ``ocr()`` retries 429 (server busy) with exponential backoff up to ``max_retries`` times;
    other HTTP errors and timeouts raise PageError with the server's message; an unreachable
    server, a refused API key or a server without this client's request fields raise FatalError.
    """

    def __init__(self, server: str, *, api_key: Optional[str] = None, timeout: float = 600.0,
                 max_retries: int = 8, retry_wait: float = 1.0, max_retry_wait: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep, notify: Callable[[str], None] = print):
        import requests

        self.server = normalize_server(server)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.retry_wait = float(retry_wait)
        self.max_retry_wait = float(max_retry_wait)
        self.sleep = sleep
        self.notify = notify
        self.retries = 0  # 429 retries over the whole run
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "dots-ocr-client"
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self._ready = False

    def close(self) -> None:
        self.session.close()

    def unreachable(self, detail: str = "") -> FatalError:
        message = (f"cannot reach the server at {self.server} — is it running? "
                   f"(start it with: {START_HINT})")
        return FatalError(message + (f"\n  detail: {detail}" if detail else ""))

    def _request(self, method: str, path: str, **kwargs):
        import requests

        timeout = (min(10.0, self.timeout), self.timeout)
        for attempt in (0, 1):
            try:
                return self.session.request(method, self.server + path, timeout=timeout, **kwargs)
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

    def ensure_ready(self) -> None:
        """Check ``/health`` once before the first request; wait (up to the timeout) while the
        server is still loading its model."""
        if self._ready:
            return
        start = time.monotonic()
        said_waiting = False
        while True:
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
            if not isinstance(body, dict) or body.get("model_loaded", True) is not False:
                if isinstance(body, dict) and body.get("demo") and body.get("warning"):
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
        self._ready = True

    def ocr(self, payload: dict[str, Any], on_text: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
        """POST /ocr; the result is the server's JSON (for ``stream`` the pieces joined into the
        same shape, plus the extra fields of the stream's last line)."""
        self.ensure_ready()
        stream = bool(payload.get("stream"))
        attempt = 0
        while True:
            response = self._request("POST", "/ocr", json=payload, stream=stream)
            status = response.status_code
            if status == 200:
                try:
                    return _read_stream(response, on_text) if stream else _read_json(response)
                finally:
                    response.close()
            message = _error_message(response)
            response.close()
            if status == 429:
                if attempt >= self.max_retries:
                    raise PageError(f"server still busy after {self.max_retries} retries (HTTP 429: {message})")
                self.sleep(backoff_delay(attempt, self.retry_wait, self.max_retry_wait, _retry_after(response)))
                attempt += 1
                self.retries += 1
                continue
            if status == 401:
                raise FatalError(f"the server refused the request (HTTP 401: {message}); "
                                 f"pass its key with --api-key or the {API_KEY_ENV} environment variable")
            if status == 400 and message.startswith("Unknown field"):
                raise FatalError(f"the server does not accept this client's requests (HTTP 400: {message}); "
                                 "is it an older dots-ocr-server? Update it.")
            raise PageError(f"HTTP {status}: {message}")


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
    return result


# ---------------------------------------------------------------------------------------------
# Per-page work and outputs
# ---------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, flush it to disk, rename it over."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def _local_page_image(item: InputFile, page: int, dpi: int):
    """The page as the server saw it: the same loader, so a PDF page has the same pixel size
    (and the layout's pixel coordinates fit it)."""
    from image_utils import ImageInputError, ImagePolicy, load_document

    policy = ImagePolicy(max_image_pixels=1_000_000_000, max_download_bytes=1 << 40)
    try:
        loaded = load_document(str(item.path), "path", policy, page=page,
                               dpi=dpi if item.kind == "pdf" else None)
    except ImageInputError as exc:
        raise PageError(f"could not load the page locally to draw it: {exc.message}") from None
    return loaded.image


def write_page_outputs(page_dir: Path, item: InputFile, page: int, result: dict[str, Any],
                       prompt_type: str, dpi: int) -> None:
    """layout.json, page.md, page.png, then response.json (last, atomically: the done marker)."""
    from layout import draw_layout

    page_dir.mkdir(parents=True, exist_ok=True)
    text = result.get("response") if isinstance(result.get("response"), str) else ""
    is_layout = prompt_type in LAYOUT_PROMPT_TYPES
    cells: list = []
    if is_layout:
        cells = result.get("layout") if isinstance(result.get("layout"), list) else []
        _write_atomic(page_dir / "layout.json", _json_bytes(cells))
        markdown = result.get("markdown") if isinstance(result.get("markdown"), str) else text
    else:
        (page_dir / "layout.json").unlink(missing_ok=True)  # stale, from a forced rerun
        markdown = text
    _write_atomic(page_dir / "page.md", markdown.encode("utf-8") if markdown.endswith("\n")
                  else (markdown + "\n").encode("utf-8"))
    image = _local_page_image(item, page, dpi)
    if cells:
        image = draw_layout(image, cells)
    fd, tmp = tempfile.mkstemp(dir=page_dir, prefix=".page.png.", suffix=".tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, page_dir / "page.png")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _write_atomic(page_dir / MARKER_NAME, _json_bytes(result))


def build_payload(args: argparse.Namespace, image_b64: str, item: InputFile, page: int) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "image": image_b64,
        "image_format": "base64",
        "prompt_type": args.prompt_type,
        "temperature": args.temperature,
        "stream": bool(args.stream),
    }
    if args.top_p is not None:
        payload["top_p"] = args.top_p
    if args.max_new_tokens is not None:
        payload["max_new_tokens"] = args.max_new_tokens
    if item.kind == "pdf":
        payload["page"] = page
        payload["dpi"] = args.dpi
    if args.prompt_type in LAYOUT_PROMPT_TYPES:
        payload["postprocess"] = True
        if args.skip_headers_footers:
            payload["skip_headers_footers"] = True
    return payload


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _ranged(kind, low=None, high=None, low_open=False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and value > high):
            bound = f"{'>' if low_open else '>='} {low}" if low is not None else ""
            bound += (" and " if bound and high is not None else "") + (f"<= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}: {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dots-ocr-client",
        description="Send images and PDFs (files or folders) to a dots-ocr-server and save, per page, "
                    "response.json, layout.json, page.md and page.png under OUT/<input>/page_NNNN/.",
        epilog="Exit codes: 0 all pages done, 1 some page failed, 2 could not run "
               "(server unreachable, API key refused, bad arguments, nothing to do), 130 interrupted.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image or PDF files (recognised by content) and folders (searched recursively)")
    parser.add_argument("--server", metavar="URL", default=DEFAULT_SERVER, help=f"server URL (default {DEFAULT_SERVER})")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--prompt-type", default="prompt_layout_all_en", choices=PROMPT_TYPES,
                        help="what to ask the model (default prompt_layout_all_en)")
    parser.add_argument("--stream", action="store_true", help="use streaming responses (NDJSON)")
    parser.add_argument("--dpi", metavar="DPI", type=_ranged(int, MIN_DPI, MAX_DPI), default=200,
                        help=f"PDF rendering resolution, {MIN_DPI}..{MAX_DPI} (default 200)")
    parser.add_argument("--force", action="store_true", help="redo pages that are already done")
    parser.add_argument("--max-retries", metavar="N", type=_ranged(int, 0), default=8,
                        help="retries of a page while the server is busy (HTTP 429) (default 8)")
    parser.add_argument("--retry-wait", metavar="SECONDS", type=_ranged(float, 0), default=1.0,
                        help="first wait before a retry in seconds, doubled each time (default 1.0)")
    parser.add_argument("--max-retry-wait", metavar="SECONDS", type=_ranged(float, 0), default=30.0,
                        help="longest wait between two retries in seconds (default 30)")
    parser.add_argument("--timeout", metavar="SECONDS", type=_ranged(float, 0, low_open=True), default=600.0,
                        help="seconds to wait for the server's answer to one page (default 600)")
    parser.add_argument("--api-key", metavar="KEY", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"the server's API key (default: ${API_KEY_ENV})")
    parser.add_argument("--temperature", metavar="T", type=_ranged(float, 0), default=0.1,
                        help="sampling temperature (default 0.1)")
    parser.add_argument("--top-p", metavar="P", type=_ranged(float, 0, 1, low_open=True), default=None,
                        help="nucleus sampling (default: the server's, 1.0)")
    parser.add_argument("--max-new-tokens", metavar="N", type=_ranged(int, 1), default=None,
                        help="longest answer per page in tokens (default: the server's, 12000)")
    parser.add_argument("--skip-headers-footers", action="store_true",
                        help="leave page headers and footers out of page.md (layout prompt types)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


@dataclass
class PageRecord:
    input: str
    page: Optional[int]
    status: str                  # "ok" | "failed" | "skipped"
    dir: Optional[str] = None
    seconds: Optional[float] = None
    repaired: Optional[bool] = None
    error: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _summary(records: list[PageRecord], args, server: str, out: Path, started: float,
             started_at: str, retries: int, finished: bool, fatal: Optional[str]) -> dict[str, Any]:
    ok = [r for r in records if r.status == "ok"]
    work = sum(r.seconds or 0.0 for r in ok)
    summary: dict[str, Any] = {
        "server": server,
        "prompt_type": args.prompt_type,
        "out": str(out),
        "started_at": started_at,
        "finished": finished,
        "pages": len(records),
        "ok": len(ok),
        "failed": sum(r.status == "failed" for r in records),
        "skipped": sum(r.status == "skipped" for r in records),
        "repaired": sum(bool(r.repaired) for r in ok),
        "busy_retries": retries,
        "seconds_total": round(time.monotonic() - started, 3),
        "seconds_per_page": round(work / len(ok), 3) if ok else None,
        "failures": [{"input": r.input, "page": r.page, "error": r.error} for r in records if r.status == "failed"],
        "page_results": [r.as_dict() for r in records],
    }
    if fatal:
        summary["error"] = fatal
    return summary


def _print_summary(summary: dict[str, Any], out: Path, stream) -> None:
    per_page = summary["seconds_per_page"]
    rate = f", {per_page:.2f} s/page" if per_page is not None else ""
    print(f"pages: {summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped, "
          f"{summary['repaired']} repaired (of {summary['pages']}) in {summary['seconds_total']:.1f} s{rate}",
          file=stream)
    for failure in summary["failures"]:
        where = failure["input"] + (f" page {failure['page']}" if failure["page"] is not None else "")
        error = failure["error"] or ""
        print(f"  FAILED {where}: {error.removeprefix(failure['input'] + ': ')}", file=stream)
    print(f"results in {out} (summary: {out / SUMMARY_NAME})", file=stream)


def _process_page(client: OCRClient, args: argparse.Namespace, item: InputFile, page: int,
                  page_dir: Path, image_b64: str, bar) -> PageRecord:
    """One request and its outputs; PageError / OSError become a failed record."""
    record = PageRecord(input=item.label, page=page, status="ok", dir=_label(page_dir))
    last_shown = [0.0]

    def on_text(chars: int) -> None:
        now = time.monotonic()
        if now - last_shown[0] >= 0.5:
            last_shown[0] = now
            bar.set_postfix_str(f"{chars} chars")

    started = time.monotonic()
    try:
        (page_dir / MARKER_NAME).unlink(missing_ok=True)  # with --force: not done until done again
        result = client.ocr(build_payload(args, image_b64, item, page), on_text)
        if "prompt_type" not in result:  # streamed answers: put it where JSON answers have it
            head = {k: result[k] for k in ("model", "response") if k in result}
            result = {**head, "prompt_type": args.prompt_type, **result}
        write_page_outputs(page_dir, item, page, result, args.prompt_type, args.dpi)
        if "repaired" in result:
            record.repaired = bool(result["repaired"])
    except PageError as exc:
        record.status, record.error = "failed", str(exc)
    except OSError as exc:  # writing the outputs
        record.status, record.error = "failed", f"cannot write the results in {_label(page_dir)}: {exc}"
    record.seconds = round(time.monotonic() - started, 3)
    bar.set_postfix_str("")
    return record


def main(argv: Optional[list[str]] = None) -> int:
    """The command line; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)

    from tqdm import tqdm

    def say(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    if args.skip_headers_footers and args.prompt_type not in LAYOUT_PROMPT_TYPES:
        say(f"warning: --skip-headers-footers has no effect with {args.prompt_type}")
    items = collect_inputs(args.inputs, warn=say)
    assign_names(items)
    if not items:
        say("error: no images or PDFs to process")
        return EXIT_FATAL
    out = Path(args.out).expanduser()
    total = sum(item.page_count if item.kind != "invalid" else 1 for item in items)

    client = OCRClient(args.server, api_key=args.api_key, timeout=args.timeout,
                       max_retries=args.max_retries, retry_wait=args.retry_wait,
                       max_retry_wait=args.max_retry_wait, notify=say)
    records: list[PageRecord] = []
    started = time.monotonic()
    started_at = _dt.datetime.now().isoformat(timespec="seconds")
    fatal: Optional[str] = None
    interrupted = False
    bar = tqdm(total=total, unit="page", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for item in items:
            if item.kind == "invalid":
                records.append(PageRecord(input=item.label, page=None, status="failed", error=item.error))
                say(f"FAILED {item.error}")
                bar.update(1)
                continue
            image_b64: Optional[str] = None
            read_error: Optional[str] = None
            for page in range(1, item.page_count + 1):
                page_dir = out / item.name / f"page_{page:04d}"
                bar.set_description_str(f"{item.label} p{page}/{item.page_count}"[-60:])
                if (page_dir / MARKER_NAME).exists() and not args.force:
                    records.append(PageRecord(input=item.label, page=page, status="skipped", dir=_label(page_dir)))
                    bar.update(1)
                    continue
                client.ensure_ready()  # before the page's clock starts: model loading is not page time
                if image_b64 is None and read_error is None:
                    try:
                        image_b64 = base64.b64encode(item.path.read_bytes()).decode("ascii")
                    except OSError as exc:
                        read_error = f"cannot read the file ({exc.strerror or exc})"
                if image_b64 is not None:
                    record = _process_page(client, args, item, page, page_dir, image_b64, bar)
                else:
                    record = PageRecord(input=item.label, page=page, status="failed", error=read_error)
                if record.status == "failed":
                    say(f"FAILED {item.label} page {page}: {record.error}")
                records.append(record)
                bar.update(1)
    except FatalError as exc:
        fatal = str(exc)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        client.close()

    if fatal and not any(r.status != "skipped" and r.page is not None for r in records):
        # Not one request got through: leave OUT as it was.
        print(f"error: {fatal}", file=sys.stderr)
        return EXIT_FATAL
    summary = _summary(records, args, client.server, out, started, started_at, client.retries,
                       finished=not (fatal or interrupted), fatal=fatal or ("interrupted" if interrupted else None))
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / SUMMARY_NAME, _json_bytes(summary))
    except OSError as exc:
        print(f"error: cannot write {out / SUMMARY_NAME}: {exc}", file=sys.stderr)
    _print_summary(summary, out, sys.stdout)
    if fatal:
        print(f"error: {fatal}", file=sys.stderr)
        return EXIT_FATAL
    if interrupted:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary["failed"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
