"""The HTTP drivers: one page in, one :class:`Answer` out, through this server's ``POST /ocr``
(:class:`OcrDriver`) or any OpenAI-compatible ``POST /v1/chat/completions`` (:class:`OpenAIDriver`:
this server's ``/v1``, or ``vllm serve`` with dots.ocr). Both go through the client's
:class:`~dots_ocr_server.client.http_client.OCRClient` (sessions per thread, 429 retries with
backoff, the API key, errors carrying their HTTP status).

Both drivers ask for the same thing: the prompt type's exact prompt text (``model_runner.prompts``;
``/v1`` gets it after the image placeholder, as upstream's parser sends it), with explicit
sampling settings, so that neither server's own defaults decide. Streamed answers give the time
to the first text; plain ``/ocr`` answers give it from the server's statistics.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from dots_ocr_server.client.errors import PageError
from dots_ocr_server.client.http_client import OCRClient
from model_runner.defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TOP_P
from model_runner.prompts import (
    LAYOUT_PROMPT_TYPES,
    POSTPROCESS_PROMPT_TYPES,
    prompt_text,
    system_text,
)

from .pages import PageImage

__all__ = ["APIS", "IMAGE_PLACEHOLDER", "Answer", "Generation", "OcrDriver", "OpenAIDriver", "make_driver",
           "ocr_payload"]

APIS = ("ocr", "openai")
#: Where the image goes in the text of a ``/v1`` message (upstream's parser writes it first).
IMAGE_PLACEHOLDER = "<|img|><|imgpad|><|endofimg|>"


@dataclass(frozen=True)
class Generation:
    """What every page asks for. ``tokens``: the answer's tokens too (ids from ``/ocr``, token
    strings from ``/v1``), through logprobs. ``markdown``: ``/ocr`` post-processes the answer
    (its ``markdown``). ``ignore_eos``: vLLM's field, sent only when asked (fixed-length answers)."""

    prompt_type: str = "prompt_layout_all_en"
    question: str | None = None
    temperature: float = 0.0
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stream: bool = False
    tokens: bool = False
    markdown: bool = False
    skip_headers_footers: bool = True
    ignore_eos: bool = False

    def settings(self) -> dict[str, Any]:
        return dict(self.__dict__)


Token = tuple[int | None, str | None]


@dataclass
class Answer:
    """One page's answer. ``tokens``: ``(id, text)`` per token when asked for (``/v1`` gives no
    ids: None); ``markdown``: the server's (``/ocr`` with ``markdown``); times in seconds from
    sending."""

    text: str
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    tokens: list[Token] | None = None
    markdown: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


class _Driver:
    api = ""

    def __init__(self, client: OCRClient):
        self.client = client

    @property
    def url(self) -> str:
        return self.client.server

    def health(self) -> dict[str, Any]:
        """``/health`` once the model is loaded ({} from a server whose /health is not JSON)."""
        return self.client.ensure_ready()

    def describe(self) -> dict[str, Any]:
        return {"api": self.api, "url": self.url}

    def close(self) -> None:
        self.client.close()


def ocr_payload(image: PageImage, gen: Generation) -> dict[str, Any]:
    """The ``/ocr`` body for one page (``scripts/bench_throughput.py`` sends it too)."""
    body: dict[str, Any] = {"image": image.b64, "image_format": "base64", "prompt_type": gen.prompt_type,
                            "temperature": gen.temperature, "top_p": gen.top_p,
                            "max_new_tokens": gen.max_new_tokens, "stream": gen.stream}
    if gen.question is not None:
        body["prompt"] = gen.question
    if gen.tokens:
        body["logprobs"] = True
    if gen.markdown and gen.prompt_type in POSTPROCESS_PROMPT_TYPES:
        body["postprocess"] = True
        if gen.skip_headers_footers and gen.prompt_type in LAYOUT_PROMPT_TYPES:
            body["skip_headers_footers"] = True
    if gen.ignore_eos:
        body["ignore_eos"] = True
    return body


class OcrDriver(_Driver):
    """``POST /ocr`` with one base64 page."""

    api = "ocr"

    def payload(self, image: PageImage, gen: Generation) -> dict[str, Any]:
        return ocr_payload(image, gen)

    def send(self, image: PageImage, gen: Generation) -> Answer:
        first: list[float] = []  # when the first text arrived (streamed)

        def on_text(_chars: int) -> None:
            if not first:
                first.append(time.perf_counter())

        sent = time.perf_counter()
        result = self.client.ocr(self.payload(image, gen), on_text=on_text if gen.stream else None)
        latency = time.perf_counter() - sent
        if gen.stream:
            ttft = first[0] - sent if first else None
        elif isinstance(result.get("total_duration"), int) and isinstance(result.get("eval_duration"), int):
            ttft = (result["total_duration"] - result["eval_duration"]) / 1e9  # the server's own count
        else:
            ttft = None
        tokens = _tokens(result.get("logprobs"))
        return Answer(text=result["response"], output_tokens=result.get("eval_count"),
                      prompt_tokens=result.get("prompt_eval_count"), finish_reason=result.get("done_reason"),
                      tokens=tokens, markdown=result.get("markdown") if isinstance(result.get("markdown"), str)
                      else None, latency_s=latency, ttft_s=ttft, raw=result)


class OpenAIDriver(_Driver):
    """``POST /v1/chat/completions``: the page as a data URL, then the placeholder and the prompt.
    ``model``: the name to send (vLLM checks it); None asks ``GET /v1/models`` for the first."""

    api = "openai"

    def __init__(self, client: OCRClient, model: str | None = None):
        super().__init__(client)
        self._model = model

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self._served_model()
        return self._model

    def _served_model(self) -> str:
        response = self.client.get("/v1/models")
        try:
            body = response.json() if response.status_code == 200 else None
        except ValueError:
            body = None
        finally:
            response.close()
        data = body.get("data") if isinstance(body, dict) else None
        if isinstance(data, list) and data and isinstance(data[0], dict) and isinstance(data[0].get("id"), str):
            return data[0]["id"]
        return "model"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.model}

    def payload(self, image: PageImage, gen: Generation) -> dict[str, Any]:
        text = prompt_text(gen.prompt_type, image_size=image.size, question=gen.question)
        messages: list[dict[str, Any]] = []
        system = system_text(gen.prompt_type)
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image.data_url()}},
            {"type": "text", "text": IMAGE_PLACEHOLDER + text}]})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": gen.temperature,
                                "top_p": gen.top_p, "max_tokens": gen.max_new_tokens, "stream": gen.stream}
        if gen.stream:
            body["stream_options"] = {"include_usage": True}
        if gen.tokens:
            body["logprobs"] = True
        if gen.ignore_eos:
            body["ignore_eos"] = True
        return body

    def send(self, image: PageImage, gen: Generation) -> Answer:
        sent = time.perf_counter()
        response = self.client.post("/v1/chat/completions", self.payload(image, gen), stream=gen.stream)
        try:
            answer = _read_events(response, sent) if gen.stream else _read_completion(response)
        finally:
            response.close()
        answer.latency_s = time.perf_counter() - sent
        if not gen.tokens:
            answer.tokens = None
        return answer


def _tokens(entries: Any) -> list[Token] | None:
    """``(id, text)`` of each logprobs entry (``/ocr``'s have both, OpenAI's only the text)."""
    if not isinstance(entries, list):
        return None
    return [(e.get("id"), e.get("token")) for e in entries if isinstance(e, dict)]


def _completion_tokens(usage: Any) -> tuple[int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None
    return usage.get("completion_tokens"), usage.get("prompt_tokens")


def _read_completion(response) -> Answer:
    try:
        body = response.json()
        choice = body["choices"][0]
        text = choice["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise PageError("the server's answer is not a chat completion") from None
    output, prompt = _completion_tokens(body.get("usage"))
    tokens = _tokens((choice.get("logprobs") or {}).get("content"))
    return Answer(text=text, output_tokens=output, prompt_tokens=prompt, finish_reason=choice.get("finish_reason"),
                  tokens=tokens, raw=body)


def _read_events(response, sent: float) -> Answer:
    """Server-sent events of ``chat.completion.chunk``s up to ``data: [DONE]``."""
    import requests

    parts: list[str] = []
    tokens: list[Token] = []
    answer = Answer(text="")
    try:
        for raw in response.iter_lines(chunk_size=256):
            line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = _chunk(data)
            if chunk.get("usage"):  # the last chunk, with stream_options.include_usage
                answer.output_tokens, answer.prompt_tokens = _completion_tokens(chunk["usage"])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if answer.ttft_s is None:
                        answer.ttft_s = time.perf_counter() - sent
                    parts.append(piece)
                tokens.extend(_tokens((choice.get("logprobs") or {}).get("content")) or [])
                if choice.get("finish_reason"):
                    answer.finish_reason = choice["finish_reason"]
    except requests.exceptions.RequestException as exc:
        raise PageError(f"the connection broke while streaming ({type(exc).__name__})") from None
    answer.text = "".join(parts)
    answer.tokens = tokens
    return answer


def _chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise PageError("the server sent an event that is not JSON") from None
    if not isinstance(chunk, dict):
        raise PageError("the server sent an event that is not a JSON object")
    if chunk.get("error"):
        error = chunk["error"]
        raise PageError(f"the stream ended with an error: {error.get('message') if isinstance(error, dict) else error}")
    return chunk


def make_driver(api: str, url: str, *, api_key: str | None = None, timeout: float = 600.0,
                max_retries: int = 8, model: str | None = None, notify=print) -> _Driver:
    """A driver of ``api`` (``ocr`` or ``openai``) at ``url``."""
    client = OCRClient(url, api_key=api_key, timeout=timeout, max_retries=max_retries, notify=notify)
    if api == "ocr":
        return OcrDriver(client)
    if api == "openai":
        return OpenAIDriver(client, model)
    raise ValueError(f"unknown api {api!r} (one of {', '.join(APIS)})")
