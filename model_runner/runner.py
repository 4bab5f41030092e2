"""ModelRunner: load a dots.ocr checkpoint on a device and turn (image, prompt) into text.

``stream_pieces()`` is the one decoding path. The caller's thread prepares the request (resize,
processor); the runner's ``BatchEngine`` (model_runner.batching) runs the vision tower, the
prefill and every decode step on its loop thread, for up to ``max_batch_size`` requests at once
(1 by default: one at a time, as before). Each token comes back to the caller's thread, which
turns it into a ``Piece`` (text + token records with optional logprobs). ``stream()`` is a loop
over it yielding the non-empty texts; ``generate()`` (the non-streaming call) joins them, so the
three never drift apart. A caller never sees whether its request was batched with others.

Stopping: eos (either of the checkpoint's two eos ids), ``max_new_tokens``, the repetition guard,
or cancellation (the caller closed the generator, or ``should_stop()`` said so). Whichever ended
the run is reported in ``GenerationStats.finish_reason``; a failed run says ``"error"``.

Per-request decoding options (``seed``, ``logprobs``, the three penalties) are described in
model_runner.decoding; they work the same on the plain, batched and fast paths.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from transformers import StoppingCriteria

from .batching import END, BatchEngine, BatchFullError, DynamicBatch, EngineRequest
from .decoding import DecodingOptions, GenerationInputError, Piece, PieceAssembler, TokenChooser, TokenRecord
from .prompts import GROUNDING_PROMPT_TYPE, PROMPT_TYPES, prompt_text, system_text

log = logging.getLogger(__name__)

FINISH_REASONS = ("eos", "length", "repetition", "cancelled", "error")
# The most tokens one Piece carries when the consumer has fallen behind the decoding loop.
MAX_TOKENS_PER_PIECE = 64
# How often a caller that reads the whole answer anyway (``generate()``, a plain HTTP answer) is
# woken to collect the tokens decoded meanwhile; the end of the answer wakes it at once. Waking a
# thread for every token costs more than the tiny model's decode step (scripts/bench_throughput.py,
# plain requests, 2 CPU cores: batch 4 went from 2,354 to 3,498 tok/s; docs/BENCHMARKS.md).
BATCHED_WAKE_INTERVAL_S = 0.1

__all__ = ["ModelRunner", "GenerationStats", "GenerationResult", "GenerationInputError", "BatchFullError",
           "Piece", "TokenRecord", "RepetitionGuard", "FINISH_REASONS"]


@dataclass
class GenerationStats:
    """Filled in by ``ModelRunner.stream_pieces`` as it runs; read it after the stream ends.
    Durations in seconds (``time.perf_counter``)."""

    finish_reason: str | None = None  # one of FINISH_REASONS
    prompt_tokens: int = 0  # prompt length, image tokens included
    new_tokens: int = 0  # tokens generated (an eos that ended the answer counts)
    original_size: tuple[int, int] | None = None  # (width, height) of the image given
    model_size: tuple[int, int] | None = None  # (width, height) the model saw
    seed: int | None = None  # the seed this request sampled with (its own, or drawn for it)
    prepare_s: float = 0.0  # resize + processor + copy to device (caller's thread)
    queue_s: float = 0.0  # waiting for the loop to take the request in (other pages' prefill)
    vision_s: float = 0.0  # vision tower
    prefill_s: float = 0.0  # LLM prefill over the prompt
    decode_s: float = 0.0  # from the first new token to the last
    ttft_s: float | None = None  # from the call to the first token decoded
    first_piece_s: float | None = None  # from the start of generation to the first non-empty text
    generate_s: float = 0.0  # from the start of generation (after prepare) to its end
    timings: dict[str, float] = field(default_factory=dict)  # the durations above by name

    @property
    def prompt_eval_s(self) -> float:
        """Vision tower + prefill (Ollama's prompt_eval_duration)."""
        return self.vision_s + self.prefill_s


@dataclass
class GenerationResult:
    text: str
    stats: GenerationStats
    tokens: list[TokenRecord] = field(default_factory=list)

    @property
    def finish_reason(self) -> str | None:
        return self.stats.finish_reason


# ---------------------------------------------------------------------------------------------
# Stopping criteria (each returns a bool tensor [batch], as transformers expects)
# ---------------------------------------------------------------------------------------------


class RepetitionGuard(StoppingCriteria):
    """Stops a generation that loops: the last ``window`` tokens are an exact repetition with some
    period ``p <= max_period`` (so the span repeats at least ``window / max_period`` times).

    Real tables with many empty cells repeat ``<td></td>`` for a while, so the window is long
    (hundreds of tokens) and the repetition must be exact. Kept incremental: for every period p a
    counter of consecutive tokens equal to the token p positions earlier, updated with one
    vectorised comparison per step, so the cost per token does not grow with the window.
    """

    def __init__(self, window: int = 512, max_period: int = 128):
        if window <= 0:
            raise ValueError("window must be positive (disable the guard instead)")
        self.window = window
        self.max_period = max(1, min(max_period, window // 2))
        self._runs: torch.Tensor | None = None  # [batch, max_period] int32
        self._needed: torch.Tensor | None = None  # [max_period]: window - p
        self.triggered = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        batch, length = input_ids.shape
        period = self.max_period
        if length <= period:
            return torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        if self._runs is None:
            self._runs = torch.zeros(batch, period, dtype=torch.int32, device=input_ids.device)
            self._needed = self.window - torch.arange(1, period + 1, device=input_ids.device, dtype=torch.int32)
        # earlier[:, p-1] is the token p positions before the newest one
        earlier = input_ids[:, -period - 1:-1].flip(-1)
        same = earlier == input_ids[:, -1:]
        self._runs = (self._runs + 1) * same
        looping = (self._runs >= self._needed).any(dim=-1)
        return looping

    def finalize(self) -> None:
        """Record (once, after generation) whether the guard fired."""
        if self._runs is not None:
            self.triggered = bool((self._runs >= self._needed).any())


# ---------------------------------------------------------------------------------------------
# Device / dtype / attention choice
# ---------------------------------------------------------------------------------------------

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for, but CUDA is not available "
                           "(install a CUDA build of torch, or use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """auto: bfloat16 on CUDA (the released dtype), float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}: use auto, bfloat16, float16 or float32") from None


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


def resolve_attention(attn: str, device: torch.device) -> tuple[str, str]:
    """(LLM attention, vision attention). auto: SDPA for the LLM; flash-attn's varlen kernel for
    the vision tower when it imports on CUDA, else SDPA."""
    if attn == "auto":
        vision = "flash_attention_2" if device.type == "cuda" and flash_attn_available() else "sdpa"
        return "sdpa", vision
    if attn == "flash_attention_2":
        if device.type != "cuda" or not flash_attn_available():
            raise RuntimeError("flash_attention_2 needs CUDA and the flash-attn package; "
                               "use --attn-implementation sdpa")
        return attn, attn
    if attn in ("sdpa", "eager"):
        return attn, attn
    raise ValueError(f"unsupported attention {attn!r}: use auto, sdpa, flash_attention_2 or eager")


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


class ModelRunner:
    """Owns the model and processor of one checkpoint folder. Construction is cheap; ``load()``
    does the heavy work (the server calls it on a background thread). ``from_model`` wraps a
    model and processor loaded elsewhere.

    ``max_batch_size``: how many generations may run at once (continuous batching, see
    model_runner.batching). A stream started beyond it raises ``BatchFullError``; ``running`` is
    the number in flight.
    """

    def __init__(self, model_path: str | Path, *, device: str = "auto", dtype: str | torch.dtype = "auto",
                 attn_implementation: str = "auto", repetition_window: int = 512,
                 repetition_max_period: int = 128, poll_interval_s: float = 0.5, compile: bool | None = None,
                 max_new_tokens_limit: int = 24000, max_batch_size: int = 1,
                 fast_path_options: dict[str, Any] | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model_path = Path(model_path)
        self.device_name = device
        self.dtype_name = dtype
        self.attn_name = attn_implementation
        self.repetition_window = repetition_window
        self.repetition_max_period = repetition_max_period
        # How often a caller waiting for its next token wakes up to check that the decoding loop
        # is still alive (never waits forever).
        self.poll_interval_s = poll_interval_s
        self.model = None
        self.processor = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.attn_implementation: tuple[str, str] | None = None
        self.load_seconds: float | None = None
        # CUDA fast path (model_runner.fast_decode): None = on for CUDA, off on CPU; True on CPU is
        # allowed (dynamo capture with a CPU-safe backend; for tests). The static cache holds
        # ``max_batch_size`` slots, each sized for the largest page prompt plus
        # ``max_new_tokens_limit`` new tokens. ``fast_path_options`` go to ``StaticDecoder``.
        self.compile = compile
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_batch_size = int(max_batch_size)
        self.fast_path_options = dict(fast_path_options or {})
        self.decoder = None  # the fast path's StaticDecoder (or another backend), None: plain path
        self.fast_path = False
        self._engine: BatchEngine | None = None
        self._plain: DynamicBatch | None = None
        self._engine_lock = threading.Lock()

    @classmethod
    def from_config(cls, config, **overrides) -> "ModelRunner":
        """Build from the server's config object (attributes of the ctor's names)."""
        options = dict(device=config.device, dtype=config.dtype, attn_implementation=config.attn_implementation,
                       repetition_window=config.repetition_window, compile=getattr(config, "compile", None),
                       max_new_tokens_limit=getattr(config, "max_new_tokens_limit", 24000),
                       max_batch_size=getattr(config, "max_batch_size", 1))
        options.update(overrides)
        return cls(config.model_path, **options)

    @classmethod
    def from_model(cls, model, processor, *, model_path: str | Path | None = None, decoder=None,
                   **options) -> "ModelRunner":
        """A loaded runner around a model and processor loaded elsewhere (benchmarks, tests,
        notebooks). Device and dtype are the model's; ``options`` are the ctor's. The fast path
        is built as ``load()`` would (``compile``), unless ``decoder`` gives a decoding backend
        to use instead (a ``StaticDecoder``, or any object with its backend methods)."""
        start = time.perf_counter()
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        runner = cls(model_path or getattr(model, "name_or_path", "") or ".", device=str(device), dtype=dtype,
                     **options)
        vision = getattr(model.vision_tower, "attn_implementation", None)
        runner.attn_implementation = (model.config._attn_implementation, vision)
        runner._install(model, processor, device, dtype, decoder)
        runner.load_seconds = time.perf_counter() - start
        return runner

    # -- loading -------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.model is not None and self.processor is not None

    def load(self) -> "ModelRunner":
        from .modeling_dots_ocr import DotsOCRForCausalLM
        from .processing import load_processor

        start = time.perf_counter()
        if not (self.model_path / "config.json").is_file():
            raise FileNotFoundError(f"no dots.ocr checkpoint at {self.model_path} (config.json missing)")
        device = resolve_device(self.device_name)
        dtype = resolve_dtype(self.dtype_name, device)
        llm_attn, vision_attn = resolve_attention(self.attn_name, device)
        processor = load_processor(self.model_path)
        model = DotsOCRForCausalLM.from_pretrained(self.model_path, dtype=dtype, device=device,
                                                   attn_implementation=llm_attn,
                                                   vision_attn_implementation=vision_attn)
        self.attn_implementation = (llm_attn, vision_attn)
        self._install(model, processor, device, dtype)
        self.load_seconds = time.perf_counter() - start
        log.info("loaded %s on %s (%s, attention llm=%s vision=%s, fast path %s, max batch %d) in %.1f s",
                 self.model_path, device, str(dtype).removeprefix("torch."), llm_attn, vision_attn,
                 "on" if self.fast_path else "off", self.max_batch_size, self.load_seconds)
        return self

    def _install(self, model, processor, device: torch.device, dtype: torch.dtype, decoder=None) -> None:
        # Every request sets max_new_tokens; the checkpoint's max_length (32768) would only make
        # generate warn on each call that both are set.
        model.generation_config.max_length = None
        self.device, self.dtype = device, dtype
        # the fast path is built and warmed up before `loaded` turns true (/health: model_loaded)
        self.decoder = decoder if decoder is not None else self.build_fast_path(model, processor, device)
        self.fast_path = self.decoder is not None
        self.processor, self.model = processor, model

    def build_fast_path(self, model, processor, device: torch.device, enabled: bool | None = None,
                        **decoder_options):
        """The warmed-up ``StaticDecoder`` (``max_batch_size`` slots) when the fast path is on
        (``enabled``, default: the ``compile`` setting), else None. ``decoder_options`` (and the
        ctor's ``fast_path_options``) go to ``StaticDecoder``."""
        if enabled is None:
            enabled = self.compile if self.compile is not None else device.type == "cuda"
        if not enabled:
            return None
        from .fast_decode import StaticDecoder, default_max_cache_len

        options = {**self.fast_path_options, **decoder_options}
        image = processor.image_processor
        cache_len = options.pop("max_cache_len", None) or default_max_cache_len(
            int(image.size["longest_edge"]), int(image.patch_size), int(image.merge_size), self.max_new_tokens_limit)
        # a small page compiles and records the decode step; on CUDA a letter page at 200 dpi
        # (158 x 122 patches) also warms the prefill kernels and the allocator for real pages
        grids = ((4, 4), (158, 122)) if device.type == "cuda" else ((4, 4),)
        try:
            decoder = StaticDecoder(model, cache_len, slots=self.max_batch_size, **options)
            seconds = decoder.warmup(grids)
        except Exception:
            if self.compile:  # asked for explicitly: fail loudly
                raise
            log.exception("the fast path failed to build or warm up; serving with the plain path")
            return None
        log.info("fast path: static cache of %d slots x %d tokens, decode step compiled (%s%s) for batch sizes %s "
                 "and warmed up in %.1f s", decoder.slots, decoder.max_cache_len, decoder.backend,
                 f", {decoder.mode}" if decoder.mode else "", list(decoder.batch_buckets), seconds)
        return decoder

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise RuntimeError("Model not loaded")

    # -- the engine ----------------------------------------------------------------------------

    def _engine_now(self) -> BatchEngine:
        """The engine on the current backend (the fast path's decoder, else the plain one)."""
        with self._engine_lock:
            if self.decoder is not None:
                backend = self.decoder
            else:
                if self._plain is None or self._plain.model is not self.model:
                    self._plain = DynamicBatch(self.model)
                backend = self._plain
            engine = self._engine
            if engine is None or engine.backend is not backend or engine.max_batch_size != self.max_batch_size:
                if engine is not None and engine.running:
                    raise RuntimeError("the decoding backend cannot change while generations run")
                engine = self._engine = BatchEngine(backend, self.max_batch_size,
                                                    run_loop=getattr(backend, "run_loop", None))
            return engine

    @property
    def running(self) -> int:
        """Generations in flight (preparing, waiting to join, or decoding)."""
        engine = self._engine
        return engine.running if engine is not None else 0

    # -- inputs --------------------------------------------------------------------------------

    @property
    def pixel_limits(self) -> tuple[int, int]:
        """(min_pixels, max_pixels) of the checkpoint's image processor."""
        size = self.processor.image_processor.size
        return int(size["shortest_edge"]), int(size["longest_edge"])

    def model_input_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the model input for an image of that size (28-px smart resize)."""
        from image_utils import smart_resize_dims

        min_pixels, max_pixels = self.pixel_limits
        return smart_resize_dims(width, height, min_pixels=min_pixels, max_pixels=max_pixels)

    def prepare(self, image: Image.Image, prompt_type: str | None, bbox=None, stats: GenerationStats | None = None,
                *, messages: list[dict] | None = None, question: str | None = None):
        """Resize the image to the model's input size, build the prompt, tokenize, and move the
        tensors to the device. Returns the processor's ``BatchFeature``.

        The prompt is ``prompt_type``'s trained prompt, or, with ``messages`` (chat turns, as the
        OpenAI route receives them), ``processor.render_chat(messages)``; ``prompt_type`` and
        ``bbox`` are then not used."""
        from image_utils import ImageInputError, resize_for_model, to_model_coords

        self._require_loaded()
        if messages is None and prompt_type not in PROMPT_TYPES:
            raise GenerationInputError(f"Invalid prompt_type. Must be one of: {list(PROMPT_TYPES)}")
        image = image.convert("RGB") if image.mode != "RGB" else image
        original = image.size
        try:
            model_size = self.model_input_size(*original)
            min_pixels, max_pixels = self.pixel_limits
            resized = resize_for_model(image, min_pixels=min_pixels, max_pixels=max_pixels)
        except ImageInputError as exc:
            raise GenerationInputError(exc.message) from exc
        if messages is not None:
            text = self.processor.render_chat(messages)
        else:
            model_bbox = None
            if prompt_type == GROUNDING_PROMPT_TYPE:
                if bbox is None:
                    raise GenerationInputError("bbox is required for prompt_grounding_ocr")
                model_bbox = to_model_coords(bbox, original, model_size)
            try:
                user_text = prompt_text(prompt_type, model_bbox, image_size=original, question=question)
            except ValueError as exc:
                raise GenerationInputError(str(exc)) from None
            text = self.processor.render_prompt(user_text, system=system_text(prompt_type))
        try:
            inputs = self.processor(text=text, images=[resized]).to(self.device)
        except ValueError as exc:  # e.g. a chat with no image placeholder, or several
            raise GenerationInputError(str(exc)) from exc
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        if stats is not None:
            stats.original_size, stats.model_size = original, model_size
            stats.prompt_tokens = int(inputs["input_ids"].shape[1])
        return inputs

    # -- generation ----------------------------------------------------------------------------

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, (list, tuple)) else [eos])

    def stream_pieces(self, image: Image.Image, prompt_type: str | None, *, bbox=None, temperature: float = 0.1,
                      top_p: float = 1.0, max_new_tokens: int = 12000, stats: GenerationStats | None = None,
                      should_stop: Callable[[], bool] | None = None, messages: list[dict] | None = None,
                      question: str | None = None, seed: int | None = None, logprobs: int | None = None,
                      repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                      ignore_eos: bool = False, wake_interval_s: float = 0.0) -> Iterator[Piece]:
        """Yield the answer as it is decoded: one ``Piece`` per generated token, or per run of
        tokens when the caller has fallen behind (at most ``MAX_TOKENS_PER_PIECE``; ``.text`` is
        empty while a character spelled over several tokens is unfinished), then one last piece
        with what is still held back, if anything.

        Closing the generator (or ``should_stop()`` returning true) stops generation within one
        decoding step; the request has left the decoding loop when the generator has closed. An
        exception inside generation is re-raised here. ``ignore_eos``: eos does not end the
        answer (fixed-length benchmarks). Raises ``BatchFullError`` when ``max_batch_size``
        generations are already running. ``wake_interval_s``: 0 (streaming) hands each token over
        as soon as it is decoded; > 0 collects the tokens decoded meanwhile at most that often (the
        first one and the end at once), which spares the decoding loop a thread wake-up per token:
        a caller that only wants the whole answer passes ``BATCHED_WAKE_INTERVAL_S``.
        """
        started = time.perf_counter()
        stats = stats if stats is not None else GenerationStats()
        if max_new_tokens < 1:
            raise GenerationInputError("max_new_tokens must be at least 1")
        if not wake_interval_s >= 0:
            raise GenerationInputError("wake_interval_s must be >= 0")
        options = DecodingOptions(temperature=temperature, top_p=top_p, seed=seed, logprobs=logprobs,
                                  repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                                  presence_penalty=presence_penalty).validate()
        self._require_loaded()
        engine = self._engine_now()
        engine.reserve()
        request = None
        t_gen = started
        try:
            inputs = self.prepare(image, prompt_type, bbox, stats, messages=messages, question=question)
            stats.prepare_s = time.perf_counter() - started
            request = self._request(inputs, options, max_new_tokens, should_stop, ignore_eos)
            stats.seed = request.chooser.seed
            assembler = PieceAssembler(self.processor.tokenizer)
            t_gen = time.perf_counter()
            engine.submit(request)
            for piece in self._pieces(engine, request, assembler, logprobs, wake_interval_s):
                if stats.ttft_s is None:  # when the loop chose it, not when this thread woke up
                    stats.ttft_s = request.timings.get("first_token", time.perf_counter()) - started
                if piece.text and stats.first_piece_s is None:
                    stats.first_piece_s = time.perf_counter() - t_gen
                yield piece
            if request.error is not None:
                raise request.error
            tail = assembler.end()
            if tail:
                yield Piece(tail)
        finally:
            # Reached on normal end, on error, and on close() (GeneratorExit at the yield): stop
            # the request at its next step and wait until it has left the loop.
            if request is not None:
                request.cancel()
                engine.wait(request, self.poll_interval_s)
                self._finish(stats, request, t_gen)
            engine.release()

    def stream(self, image: Image.Image, prompt_type: str | None, **kwargs) -> Iterator[str]:
        """The answer as non-empty text pieces while it is generated; the keyword arguments of
        ``stream_pieces`` (bbox, temperature, top_p, max_new_tokens, stats, should_stop, messages,
        seed, logprobs, repetition_penalty, frequency_penalty, presence_penalty)."""
        for piece in self.stream_pieces(image, prompt_type, **kwargs):
            if piece.text:
                yield piece.text

    def generate(self, image: Image.Image, prompt_type: str | None, **kwargs) -> GenerationResult:
        """The whole answer at once: a loop over the same pieces ``stream`` yields, keeping the
        token records too."""
        stats = kwargs.pop("stats", None) or GenerationStats()
        kwargs.setdefault("wake_interval_s", BATCHED_WAKE_INTERVAL_S)
        text, tokens = [], []
        for piece in self.stream_pieces(image, prompt_type, stats=stats, **kwargs):
            text.append(piece.text)
            tokens.extend(piece.tokens)
        return GenerationResult(text="".join(text), stats=stats, tokens=tokens)

    # -- helpers of stream_pieces ----------------------------------------------------------------

    def _request(self, inputs, options: DecodingOptions, max_new_tokens: int, should_stop,
                 ignore_eos: bool) -> EngineRequest:
        vocab = int(self.model.lm_head.weight.shape[0])
        chooser = TokenChooser(options, vocab, self.device, prompt_ids=inputs["input_ids"][0])
        guard = (RepetitionGuard(self.repetition_window, self.repetition_max_period)
                 if self.repetition_window > 0 else None)
        pixel_inputs = {k: inputs[k] for k in ("input_ids", "pixel_values", "image_grid_thw") if k in inputs}
        return EngineRequest(inputs=pixel_inputs, chooser=chooser, max_new_tokens=int(max_new_tokens),
                             eos_ids=frozenset() if ignore_eos else frozenset(self._eos_ids()), guard=guard,
                             should_stop=should_stop, logprobs=options.logprobs)

    def _pieces(self, engine: BatchEngine, request: EngineRequest, assembler: PieceAssembler,
                logprobs: int | None, wake_interval_s: float = 0.0) -> Iterator[Piece]:
        """Pieces of the request's tokens until its END; the timeout only checks that the loop
        is alive (a loop that died without ending the request raises). ``wake_interval_s`` > 0:
        collect at most that often (the first token, the end of the answer, and what is left
        after a full piece, at once)."""
        next_collect, behind = 0.0, False
        while True:
            if wake_interval_s and not behind:
                wait_s = next_collect - time.perf_counter()
                if wait_s > 0:
                    request.done.wait(wait_s)
                next_collect = time.perf_counter() + wake_interval_s
            try:
                event = request.events.get(timeout=self.poll_interval_s)
            except queue.Empty:
                if engine.worker_alive() or request.done.is_set():
                    continue
                raise RuntimeError("the generation loop ended without closing its stream") from None
            if event is END:
                return
            # Tokens that are already waiting join this piece: a consumer slower than the loop
            # (many streams on few cores, a slow client) gets fewer, larger pieces and catches
            # up, instead of paying its per-piece cost (an NDJSON line, an SSE event) per token.
            events = [event]
            ended = False
            while len(events) < MAX_TOKENS_PER_PIECE:
                try:
                    waiting = request.events.get_nowait()
                except queue.Empty:
                    break
                if waiting is END:
                    ended = True
                    break
                events.append(waiting)
            behind = len(events) == MAX_TOKENS_PER_PIECE  # more may be waiting: collect them next
            pieces = [assembler.add(token, payload, logprobs) for token, payload in events]
            yield pieces[0] if len(pieces) == 1 else Piece("".join(p.text for p in pieces),
                                                           tuple(t for p in pieces for t in p.tokens))
            if ended:
                return

    @staticmethod
    def _finish(stats: GenerationStats, request: EngineRequest, t_gen: float) -> None:
        t = request.timings
        end = t.get("end", time.perf_counter())
        stats.finish_reason = request.finish_reason
        stats.new_tokens = len(request.generated)
        stats.queue_s = t.get("queue_s", 0.0)
        stats.vision_s = t.get("vision_s", 0.0)
        stats.prefill_s = t.get("prefill_s", 0.0)
        stats.decode_s = end - t["first_token"] if "first_token" in t else 0.0
        stats.generate_s = end - t_gen
        stats.timings = {name: getattr(stats, name) for name in
                         ("prepare_s", "queue_s", "vision_s", "prefill_s", "decode_s", "generate_s")}
        if stats.ttft_s is not None:
            stats.timings["ttft_s"] = stats.ttft_s

    def trace(self, image: Image.Image, prompt_type: str, **kwargs):
        """Tokens, logprobs and attention-to-image maps of one answer: ``model_runner.trace.trace``."""
        from .trace import trace

        return trace(self, image, prompt_type, **kwargs)
