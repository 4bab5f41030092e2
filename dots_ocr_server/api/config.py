"""Server configuration: one object, filled from flags and DOTS_OCR_* environment variables."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from image_utils.policy import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_PDF_RENDER_TIMEOUT_S
from model_runner.defaults import DEFAULT_MAX_NEW_TOKENS, DEMO_MAX_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT


@dataclass
class ServerConfig:
    model_path: str = "./weights/DotsOCR"
    host: str = "127.0.0.1"
    port: int = 5000
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    demo: bool = False
    image_root: str | None = None
    allow_private_urls: bool = False
    api_key: str | None = None
    max_body_mb: float = 64.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT
    # the answer length of a request that sets none: None = 12000, or 256 in demo mode
    default_max_new_tokens: int | None = None
    repetition_window: int = 512
    compile: bool | None = None  # CUDA fast path (static cache + compiled decode): None = on for CUDA
    threads: int = 16
    max_batch_size: int = 1
    torch_threads: int | None = None  # torch's intra-op threads (None: torch's default, one per core)
    max_queue: int = 64
    stream_interval_ms: float = 10.0  # a stream's lines come at most this often (0: one per token)
    max_pdf_pages: int = 2000
    pdf_render_timeout: float = DEFAULT_PDF_RENDER_TIMEOUT_S
    max_prompt_chars: int = 4000
    metrics: bool = True  # GET /metrics (Prometheus) and its bookkeeping
    # Document jobs (dots_ocr_server/jobs): SQLite and the stored documents under data_dir
    jobs: bool = True
    data_dir: str = "dots-ocr-data"
    job_retention: str = "7d"  # finished jobs are deleted after this long (none: kept)
    max_job_storage: str = "20G"  # the data folder at most (none: no cap)
    job_slots: int | None = None  # generation slots jobs may use (None: --max-batch-size - 1, at least 1)
    job_page_retries: int = 1
    log_format: str = "text"  # text | json (one JSON object per line)
    # The HTTP server (api/serving.py): slow clients and shutdown.
    connection_limit: int = 1000
    idle_timeout: float = 15.0
    request_timeout: float = 60.0
    max_header_kb: int = 64
    graceful_timeout: float = 10.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_new_tokens_default(self) -> int:
        """``max_new_tokens`` of a request that does not set it: ``--default-max-new-tokens``, else
        12000 (the interface document's), or ``DEMO_MAX_NEW_TOKENS`` in demo mode; never above the limit."""
        if self.default_max_new_tokens is not None:
            chosen = self.default_max_new_tokens
        else:
            chosen = DEMO_MAX_NEW_TOKENS if self.demo else DEFAULT_MAX_NEW_TOKENS
        return min(chosen, self.max_new_tokens_limit)

    @property
    def open_ended_max_new_tokens(self) -> int:
        """The answer length of a /v1 request without ``max_tokens``: OpenAI's "as long as it
        takes" is the limit, unless a default was configured or this is demo mode."""
        if self.default_max_new_tokens is not None or self.demo:
            return self.max_new_tokens_default
        return self.max_new_tokens_limit

    @property
    def job_retention_s(self) -> float | None:
        return parse_duration(self.job_retention)

    @property
    def max_job_storage_bytes(self) -> int | None:
        return parse_size(self.max_job_storage)

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> "ServerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = dict(values or {})
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        return cls(**values)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.I)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)


def parse_duration(text: str | None) -> float | None:
    """"7d", "36h", "90m", "3600s" or "3600" (seconds) -> seconds; "none" (or empty) -> None."""
    if text is None or str(text).strip().lower() in ("", "none", "never"):
        return None
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (e.g. 7d, 36h, 90m, 3600s)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2).lower()]


def parse_size(text: str | None) -> int | None:
    """"20G", "500M", "1.5T", "4096" (bytes) -> bytes (powers of 1024); "none" -> None."""
    if text is None or str(text).strip().lower() in ("", "none", "unlimited"):
        return None
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 20G, 500M, 4096)")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " "))


# Command-line flags; each also reads DOTS_OCR_<NAME> from the environment.
_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--model-path", dict(help="checkpoint folder (config.json, safetensors, tokenizer)")),
    ("--host", dict(help="address to bind (default 127.0.0.1: this machine only)")),
    ("--port", dict(type=int)),
    ("--device", dict(help="auto | cpu | cuda | cuda:N")),
    ("--dtype", dict(choices=["auto", "bfloat16", "float16", "float32"])),
    ("--attn-implementation", dict(choices=["auto", "sdpa", "flash_attention_2", "eager"])),
    ("--demo", dict(action="store_true", help="build and serve a tiny RANDOM checkpoint (no real OCR)")),
    ("--image-root", dict(help="confine `path` images to this folder")),
    ("--allow-private-urls", dict(action="store_true",
                                  help="let `url` images come from loopback/private/link-local addresses")),
    ("--api-key", dict(help="require `Authorization: Bearer KEY` on /ocr and /v1/...")),
    ("--max-body-mb", dict(type=float, help="largest request body accepted")),
    ("--max-image-pixels", dict(type=int, help="largest decoded image (width x height)")),
    ("--max-new-tokens-limit", dict(type=int, help="largest max_new_tokens a request may ask for")),
    ("--default-max-new-tokens", dict(
        type=int, help=f"max_new_tokens of a request that sets none (None: {DEFAULT_MAX_NEW_TOKENS}; "
                       f"{DEMO_MAX_NEW_TOKENS} with --demo)")),
    ("--repetition-window", dict(type=int, help="tokens of exact repetition that stop a looping page (0: off)")),
    ("--compile", dict(action=argparse.BooleanOptionalAction,
                       help="CUDA fast path: static KV cache + compiled decode step "
                            "(default: on with CUDA, off on CPU)")),
    ("--threads", dict(type=int, help="request threads (one request runs; the others get 429)")),
    ("--max-batch-size", dict(type=int, help="requests that generate together (1: one at a time, as the dots.ocr "
                                             "API document)")),
    ("--torch-threads", dict(type=int, help="torch's intra-op CPU threads (default: torch's, one per core); "
                                           "fewer leaves cores to the request threads on a CPU server")),
    ("--max-queue", dict(type=int, help="/v1 requests that wait for a slot when all are busy (more: 429); "
                                        "/ocr never waits")),
    ("--stream-interval-ms", dict(type=float, help="a stream sends what was decoded at most this often, "
                                                   "several tokens per line when they come faster (0: a line "
                                                   "per token, at a cost per token that a small model feels)")),
    ("--max-pdf-pages", dict(type=int, help="largest PDF (pages) accepted, checked when it is opened")),
    ("--pdf-render-timeout", dict(type=float, help="seconds one PDF page may take to open and draw (413 beyond: "
                                                   "the page is too complex); it is rendered before a generation "
                                                   "slot is taken")),
    ("--max-prompt-chars", dict(type=int, help="longest `prompt` (question) for prompt_general")),
    ("--metrics", dict(action=argparse.BooleanOptionalAction,
                       help="serve GET /metrics (Prometheus text format; open like /health)")),
    ("--log-format", dict(choices=["text", "json"], help="log lines as text or as one JSON object each")),
    ("--jobs", dict(action=argparse.BooleanOptionalAction,
                    help="serve the document jobs (POST /jobs ...; --no-jobs turns the routes off)")),
    ("--data-dir", dict(help="where the jobs' database and stored documents live")),
    ("--job-retention", dict(help="finished jobs are deleted (with their files) after this long: 7d, 36h, 90m, "
                                  "or none")),
    ("--max-job-storage", dict(help="the data folder at most (20G, 500M, or none): a job that would pass it is "
                                    "refused with 507")),
    ("--job-slots", dict(type=int, help="generation slots the jobs may use at once (default: --max-batch-size - 1, "
                                        "at least 1; at --max-batch-size 1 a job page holds the one slot)")),
    ("--job-page-retries", dict(type=int, help="times a failed page of a job is tried again before it is marked "
                                               "failed")),
    ("--connection-limit", dict(type=int, help="open connections at most (more wait in the listen backlog)")),
    ("--idle-timeout", dict(type=float, help="seconds a connection may send nothing before it is closed "
                                             "(between requests or mid-request)")),
    ("--request-timeout", dict(type=float, help="seconds a client has to send one whole request "
                                                "(headers and body), however steadily it drips")),
    ("--max-header-kb", dict(type=int, help="largest request line + headers, in KiB (431 beyond)")),
    ("--graceful-timeout", dict(type=float, help="on SIGTERM, seconds running requests may still finish "
                                                 "before they are stopped (503 / last stream line)")),
]


def _env_value(name: str, spec: dict[str, Any]):
    raw = os.environ.get("DOTS_OCR_" + name.upper())
    if raw is None:
        return None
    if spec.get("action") in ("store_true", argparse.BooleanOptionalAction):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return spec.get("type", str)(raw)


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="server.py", description="dots.ocr HTTP server (transformers, no vLLM)")
    for flag, spec in _FLAGS:
        dest = flag[2:].replace("-", "_")
        env = _env_value(dest, spec)
        default = env if env is not None else getattr(defaults, dest)
        help_text = (spec.get("help", "") + f" [env DOTS_OCR_{dest.upper()}; default {default!r}]").strip()
        parser.add_argument(flag, dest=dest, default=default, **{**spec, "help": help_text})
    args = parser.parse_args(argv)
    return ServerConfig.from_mapping(vars(args))

