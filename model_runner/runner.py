"""ModelRunner: one checkpoint folder, loaded on a device, and the one way to generate from it.

The parts, each in its own module: geometry and prompts on the processor
(``processing.DotsOCRProcessor.page_inputs``), loading and the device choice (``loading``),
generation (``generation.Generator``: a ``GenerationRequest`` in, a ``GenerationHandle`` out,
through the continuous-batching engine of ``batching``, on the plain backend or the CUDA fast
path of ``fast_decode``). This class only wires them together and keeps the settings:

- ``load()`` (the server calls it on a background thread) or ``from_model(model, processor)``;
- ``start(request)`` is the one decoding path: every caller (the server's routes, the batch job,
  a trace's answer) goes through it; ``stream()`` and ``generate()`` are loops over it for a page
  and a prompt type, so the three never drift apart. A caller never sees whether its request was
  batched with others;
- ``trace()``: tokens, logprobs and attention-to-image maps of one answer (``trace``).
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image

from .batching import BatchFullError, DynamicBatch
from .decoding import DecodingOptions, GenerationInputError, Piece, TokenRecord
from .defaults import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT
from .generation import (BATCHED_WAKE_INTERVAL_S, FINISH_REASONS, GenerationHandle, GenerationRequest,
                         GenerationResult, GenerationStats, Generator, PagePrompt, collect)
from .repetition import RepetitionGuard

log = logging.getLogger(__name__)

__all__ = ["ModelRunner", "GenerationStats", "GenerationResult", "GenerationRequest", "GenerationHandle",
           "GenerationInputError", "BatchFullError", "PagePrompt", "Piece", "TokenRecord", "RepetitionGuard",
           "FINISH_REASONS", "BATCHED_WAKE_INTERVAL_S"]

# The keyword arguments of ``stream``/``generate`` that are DecodingOptions fields.
_DECODING_FIELDS = ("temperature", "top_p", "top_k", "seed", "logprobs", "repetition_penalty",
                    "frequency_penalty", "presence_penalty")


class ModelRunner:
    """Owns the model and processor of one checkpoint folder. Construction is cheap; ``load()``
    does the heavy work. ``max_batch_size``: how many generations may run at once (continuous
    batching); one started beyond it raises ``BatchFullError``; ``running`` counts those in flight.

    ``compile``: the CUDA fast path (static cache + compiled decode step), None = on for CUDA,
    off on CPU; True on CPU is allowed (dynamo capture with a CPU-safe backend; for tests). Its
    static cache holds ``max_batch_size`` slots sized for the largest page prompt plus
    ``max_new_tokens_limit`` new tokens; ``fast_path_options`` go to ``StaticDecoder``."""

    def __init__(self, model_path: str | Path, *, device: str = "auto", dtype: str | torch.dtype = "auto",
                 attn_implementation: str = "auto", repetition_window: int = 512,
                 repetition_max_period: int = 128, poll_interval_s: float = 0.5, compile: bool | None = None,
                 max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT, max_batch_size: int = 1,
                 fast_path_options: dict[str, Any] | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model_path = Path(model_path)
        self.device_name = device
        self.dtype_name = dtype
        self.attn_name = attn_implementation
        self.repetition_window = repetition_window
        self.repetition_max_period = repetition_max_period
        self.poll_interval_s = poll_interval_s
        self.compile = compile
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_batch_size = int(max_batch_size)
        self.fast_path_options = dict(fast_path_options or {})
        self.model = None
        self.processor = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.attn_implementation: tuple[str, str | None] | None = None
        self.load_seconds: float | None = None
        self.decoder = None  # the fast path's StaticDecoder (or another backend); None: the plain path
        self.generator: Generator | None = None
        self._install_lock = threading.Lock()

    @classmethod
    def from_config(cls, config, **overrides) -> "ModelRunner":
        """Build from the server's config object (attributes of the ctor's names)."""
        options = dict(device=config.device, dtype=config.dtype, attn_implementation=config.attn_implementation,
                       repetition_window=config.repetition_window, compile=config.compile,
                       max_new_tokens_limit=config.max_new_tokens_limit, max_batch_size=config.max_batch_size)
        options.update(overrides)
        return cls(config.model_path, **options)

    @classmethod
    def from_model(cls, model, processor, *, model_path: str | Path | None = None, decoder=None,
                   **options) -> "ModelRunner":
        """A loaded runner around a model and processor loaded elsewhere (benchmarks, tests,
        notebooks). Device and dtype are the model's; ``options`` are the ctor's. The fast path
        is built as ``load()`` would (``compile``), unless ``decoder`` gives a decoding backend
        to use instead (a ``StaticDecoder``, or any ``batching.DecodeBackend``)."""
        start = time.perf_counter()
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        runner = cls(model_path or getattr(model, "name_or_path", "") or ".", device=str(device), dtype=dtype,
                     **options)
        from .fast_decode import base_attention

        runner.attn_implementation = (base_attention(model.config._attn_implementation),
                                      getattr(model.vision_tower, "attn_implementation", None))
        runner._install(model, processor, device, dtype, decoder)
        runner.load_seconds = time.perf_counter() - start
        return runner

    # -- loading -------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.generator is not None

    @property
    def fast_path(self) -> bool:
        return self.decoder is not None

    def load(self) -> "ModelRunner":
        from .loading import load_checkpoint

        start = time.perf_counter()
        loaded = load_checkpoint(self.model_path, self.device_name, self.dtype_name, self.attn_name)
        self.attn_implementation = loaded.attention
        self._install(loaded.model, loaded.processor, loaded.device, loaded.dtype)
        self.load_seconds = time.perf_counter() - start
        llm_attn, vision_attn = loaded.attention
        log.info("loaded %s on %s (%s, attention llm=%s vision=%s, fast path %s, max batch %d) in %.1f s",
                 self.model_path, loaded.device, str(loaded.dtype).removeprefix("torch."), llm_attn, vision_attn,
                 "on" if self.fast_path else "off", self.max_batch_size, self.load_seconds)
        return self

    def _install(self, model, processor, device: torch.device, dtype: torch.dtype, decoder=None) -> None:
        from .loading import build_fast_path

        with self._install_lock:
            self.device, self.dtype = device, dtype
            # the fast path is built and warmed up before `loaded` turns true (/health: model_loaded)
            if decoder is None:
                decoder = build_fast_path(model, processor, device, slots=self.max_batch_size,
                                          max_new_tokens_limit=self.max_new_tokens_limit, compile=self.compile,
                                          options=self.fast_path_options)
            self.decoder = decoder
            backend = decoder if decoder is not None else DynamicBatch(model)
            self.model, self.processor = model, processor
            self.generator = Generator(model, processor, backend, max_batch_size=self.max_batch_size,
                                       repetition_window=self.repetition_window,
                                       repetition_max_period=self.repetition_max_period,
                                       poll_interval_s=self.poll_interval_s)

    def _require_loaded(self) -> Generator:
        if self.generator is None:
            raise RuntimeError("Model not loaded")
        return self.generator

    @property
    def engine(self):
        """The decoding engine (its counters: ``running``, ``waiting``, ``active``, ``steps``)."""
        return self._require_loaded().engine

    @property
    def running(self) -> int:
        """Generations in flight (preparing, waiting to join, or decoding)."""
        return self.generator.engine.running if self.generator is not None else 0

    # -- generation ----------------------------------------------------------------------------

    def start(self, request: GenerationRequest, stats: GenerationStats | None = None) -> GenerationHandle:
        """The one decoding path: a handle on ``request``'s generation (``model_runner.generation``)."""
        return self._require_loaded().start(request, stats)

    def request(self, image: Image.Image, prompt_type: str | None, *, bbox=None, question: str | None = None,
                messages=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, ignore_eos: bool = False,
                should_stop=None, wake_interval_s: float = 0.0, **decoding) -> GenerationRequest:
        """A ``GenerationRequest`` for a page and a prompt type (or chat ``messages``); ``decoding``:
        the ``DecodingOptions`` fields (temperature, top_p, top_k, seed, logprobs, penalties)."""
        unknown = sorted(set(decoding) - set(_DECODING_FIELDS))
        if unknown:
            raise TypeError(f"unknown generation options: {unknown}")
        prompt = PagePrompt(image, prompt_type, bbox=bbox, question=question, messages=messages)
        return GenerationRequest(prompt, DecodingOptions(**decoding), max_new_tokens=max_new_tokens,
                                 ignore_eos=ignore_eos, should_stop=should_stop, wake_interval_s=wake_interval_s)

    def stream_pieces(self, image: Image.Image, prompt_type: str | None, **options) -> Iterator[Piece]:
        """The answer's pieces (text + token records) as they are decoded; ``options``: those of
        ``request``, plus ``stats`` (a ``GenerationStats`` to fill in). Closing the iterator stops
        the generation."""
        stats = options.pop("stats", None)
        handle = self.start(self.request(image, prompt_type, **options), stats)
        try:
            yield from handle.pieces()
        finally:
            handle.close()

    def stream(self, image: Image.Image, prompt_type: str | None, **options) -> Iterator[str]:
        """The answer as non-empty text pieces while it is generated (``stream_pieces``' options)."""
        for piece in self.stream_pieces(image, prompt_type, **options):
            if piece.text:
                yield piece.text

    def generate(self, image: Image.Image, prompt_type: str | None, **options) -> GenerationResult:
        """The whole answer at once: a loop over the same pieces ``stream`` yields, keeping the token
        records too (``stream_pieces``' options)."""
        stats = options.pop("stats", None)
        options.setdefault("wake_interval_s", BATCHED_WAKE_INTERVAL_S)
        return collect(self.start(self.request(image, prompt_type, **options), stats))

    # -- looking inside ------------------------------------------------------------------------

    def trace(self, image: Image.Image, prompt_type: str, *, text: str | None = None, bbox=None,
              question: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
              should_stop=None, **trace_options):
        """Tokens, logprobs and attention-to-image maps of one answer (``trace.trace_answer``; its
        options: layers, heads, average_heads, span, char_span, average_span, vision_blocks). The
        answer is ``text`` when given, else it is generated here through ``start`` (greedy by
        default); ``trace.TraceStopped`` when ``should_stop()`` ended that generation."""
        from .trace import TraceStopped, trace_answer

        generator = self._require_loaded()
        if max_new_tokens < 1 or temperature < 0:
            raise GenerationInputError("max_new_tokens must be at least 1 and temperature >= 0")
        prompt = PagePrompt(image, prompt_type, bbox=bbox, question=question)
        token_ids = None
        if text is None:
            handle = self.start(GenerationRequest(prompt, DecodingOptions(temperature=temperature),
                                                  max_new_tokens=max_new_tokens, should_stop=should_stop,
                                                  wake_interval_s=BATCHED_WAKE_INTERVAL_S))
            answer = collect(handle)
            if answer.finish_reason == "cancelled":
                raise TraceStopped("the generation of the answer to trace was stopped")
            token_ids = [t.id for t in answer.tokens]
            while token_ids and token_ids[-1] in generator.eos_ids:
                token_ids.pop()
            page = handle.inputs
        else:
            page = generator.prepare(prompt)
        return generator.run_on_model_thread(lambda: trace_answer(
            self.model, self.processor, page, prompt_type, token_ids=token_ids, text=text, **trace_options))
