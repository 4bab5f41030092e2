"""ModelRunner: load a dots.ocr checkpoint on a device and turn (image, prompt type) into text.

``stream()`` is the one decoding path: ``generate`` runs on a background thread and feeds a
``TextIteratorStreamer``; the generator yields text pieces as they are decoded. ``generate()`` (the
non-streaming call) is a loop over ``stream()``, so the two can never drift apart.

Stopping: eos (either of the checkpoint's two eos ids), ``max_new_tokens``, the repetition guard,
or cancellation (the caller closed the generator, or ``should_stop()`` said so). Whichever ended
the run is reported in ``GenerationStats.finish_reason``.
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
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .prompts import GROUNDING_PROMPT_TYPE, PROMPT_TYPES, prompt_text

log = logging.getLogger(__name__)

FINISH_REASONS = ("eos", "length", "repetition", "cancelled", "error")


class GenerationInputError(ValueError):
    """A request the model cannot run (bad prompt type, bad bbox, impossible geometry).
    The message is meant for the client."""


@dataclass
class GenerationStats:
    """Filled in by ``ModelRunner.stream`` as it runs; read it after the stream ends."""

    finish_reason: str | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    original_size: tuple[int, int] | None = None  # (width, height) of the image given
    model_size: tuple[int, int] | None = None  # (width, height) the model saw
    prepare_s: float = 0.0  # resize + processor + copy to device
    first_piece_s: float | None = None  # from the start of generation to the first text piece
    generate_s: float = 0.0  # from the start of generation to its end
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class GenerationResult:
    text: str
    stats: GenerationStats

    @property
    def finish_reason(self) -> str | None:
        return self.stats.finish_reason


# ---------------------------------------------------------------------------------------------
# Stopping criteria (each returns a bool tensor [batch], as transformers expects)
# ---------------------------------------------------------------------------------------------


class CancelCriterion(StoppingCriteria):
    """Stops generation at the next decoding step once ``cancel()`` was called or
    ``should_stop()`` returns true (e.g. the HTTP client went away)."""

    def __init__(self, should_stop: Callable[[], bool] | None = None):
        self._event = threading.Event()
        self._should_stop = should_stop

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if not self._event.is_set() and self._should_stop is not None and self._should_stop():
            self._event.set()
        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool, device=input_ids.device)


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


class _GenerationThread(threading.Thread):
    """Runs the generate callable (``model.generate``, or the fast path's ``StaticDecoder.generate``,
    which takes the same arguments) and keeps its result or exception for the consumer."""

    def __init__(self, generate: Callable[..., Any], kwargs: dict[str, Any], streamer: TextIteratorStreamer):
        super().__init__(name="dots-ocr-generate", daemon=True)
        self._generate = generate
        self._kwargs = kwargs
        self._streamer = streamer
        self.output: torch.Tensor | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with torch.inference_mode():
                self.output = self._generate(**self._kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self.error = exc
            self._streamer.end()  # wake the consumer; it re-raises `error`


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
    does the heavy work (the server calls it on a background thread)."""

    def __init__(self, model_path: str | Path, *, device: str = "auto", dtype: str | torch.dtype = "auto",
                 attn_implementation: str = "auto", repetition_window: int = 512,
                 repetition_max_period: int = 128, poll_interval_s: float = 0.5, compile: bool | None = None,
                 max_new_tokens_limit: int = 24000):
        self.model_path = Path(model_path)
        self.device_name = device
        self.dtype_name = dtype
        self.attn_name = attn_implementation
        self.repetition_window = repetition_window
        self.repetition_max_period = repetition_max_period
        # The streamer's timeout: how often the consumer wakes up to check that the generation
        # thread is still alive while it waits for the next piece (never waits forever).
        self.poll_interval_s = poll_interval_s
        self.model = None
        self.processor = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.attn_implementation: tuple[str, str] | None = None
        self.load_seconds: float | None = None
        # CUDA fast path (model_runner.fast_decode): None = on for CUDA, off on CPU; True on CPU is
        # allowed (dynamo capture with a CPU-safe backend; for tests). The static cache is sized for
        # the largest page prompt plus ``max_new_tokens_limit`` new tokens.
        self.compile = compile
        self.max_new_tokens_limit = max_new_tokens_limit
        self.decoder = None  # StaticDecoder when the fast path is on
        self.fast_path = False

    @classmethod
    def from_config(cls, config) -> "ModelRunner":
        """Build from the server's config object (attributes of the same names)."""
        return cls(config.model_path, device=config.device, dtype=config.dtype,
                   attn_implementation=config.attn_implementation,
                   repetition_window=config.repetition_window, compile=getattr(config, "compile", None),
                   max_new_tokens_limit=getattr(config, "max_new_tokens_limit", 24000))

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
        # Every request sets max_new_tokens; the checkpoint's max_length (32768) would only make
        # generate warn on each call that both are set.
        model.generation_config.max_length = None
        self.device, self.dtype, self.attn_implementation = device, dtype, (llm_attn, vision_attn)
        # the fast path is built and warmed up before `loaded` turns true (/health: model_loaded)
        self.decoder = self.build_fast_path(model, processor, device)
        self.fast_path = self.decoder is not None
        self.processor, self.model = processor, model
        self.load_seconds = time.perf_counter() - start
        log.info("loaded %s on %s (%s, attention llm=%s vision=%s, fast path %s) in %.1f s", self.model_path,
                 device, str(dtype).removeprefix("torch."), llm_attn, vision_attn,
                 "on" if self.fast_path else "off", self.load_seconds)
        return self

    def build_fast_path(self, model, processor, device: torch.device, enabled: bool | None = None,
                        **decoder_options):
        """The warmed-up ``StaticDecoder`` when the fast path is on (``enabled``, default: the
        ``compile`` setting), else None. ``decoder_options`` go to ``StaticDecoder`` (backend, mode)."""
        if enabled is None:
            enabled = self.compile if self.compile is not None else device.type == "cuda"
        if not enabled:
            return None
        from .fast_decode import StaticDecoder, default_max_cache_len

        image = processor.image_processor
        cache_len = default_max_cache_len(int(image.size["longest_edge"]), int(image.patch_size),
                                          int(image.merge_size), self.max_new_tokens_limit)
        # a small page compiles and records the decode step; on CUDA a letter page at 200 dpi
        # (158 x 122 patches) also warms the prefill kernels and the allocator for real pages
        grids = ((4, 4), (158, 122)) if device.type == "cuda" else ((4, 4),)
        try:
            decoder = StaticDecoder(model, cache_len, compile=True, **decoder_options)
            seconds = decoder.warmup(grids)
        except Exception:
            if self.compile:  # asked for explicitly: fail loudly
                raise
            log.exception("the fast path failed to build or warm up; serving with plain generate")
            return None
        log.info("fast path: static cache %d tokens, decode step compiled (%s%s) and warmed up in %.1f s",
                 decoder.max_cache_len, decoder.backend, f", {decoder.mode}" if decoder.mode else "", seconds)
        return decoder

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise RuntimeError("Model not loaded")

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

    def prepare(self, image: Image.Image, prompt_type: str, bbox=None, stats: GenerationStats | None = None):
        """Resize the image to the model's input size, build the prompt, tokenize, and move the
        tensors to the device. Returns the processor's ``BatchFeature``."""
        from image_utils import ImageInputError, resize_for_model, to_model_coords

        self._require_loaded()
        if prompt_type not in PROMPT_TYPES:
            raise GenerationInputError(f"Invalid prompt_type. Must be one of: {list(PROMPT_TYPES)}")
        image = image.convert("RGB") if image.mode != "RGB" else image
        original = image.size
        try:
            model_size = self.model_input_size(*original)
            min_pixels, max_pixels = self.pixel_limits
            resized = resize_for_model(image, min_pixels=min_pixels, max_pixels=max_pixels)
        except ImageInputError as exc:
            raise GenerationInputError(exc.message) from exc
        model_bbox = None
        if prompt_type == GROUNDING_PROMPT_TYPE:
            if bbox is None:
                raise GenerationInputError("bbox is required for prompt_grounding_ocr")
            model_bbox = to_model_coords(bbox, original, model_size)
        text = self.processor.render_prompt(prompt_text(prompt_type, model_bbox))
        inputs = self.processor(text=text, images=[resized]).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        if stats is not None:
            stats.original_size, stats.model_size = original, model_size
            stats.prompt_tokens = int(inputs["input_ids"].shape[1])
        return inputs

    # -- generation ----------------------------------------------------------------------------

    def _sampling_kwargs(self, temperature: float, top_p: float) -> dict[str, Any]:
        if temperature < 0 or not 0 < top_p <= 1:
            raise GenerationInputError("temperature must be >= 0 and top_p in (0, 1]")
        if temperature == 0:  # greedy, deterministic
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        # top_k=0: no top-k cut, only temperature and nucleus sampling, as the API describes.
        return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, (list, tuple)) else [eos])

    def stream(self, image: Image.Image, prompt_type: str, *, bbox=None, temperature: float = 0.1,
               top_p: float = 1.0, max_new_tokens: int = 12000, stats: GenerationStats | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """Yield the model's answer as text pieces while it is generated.

        Closing the generator (or ``should_stop()`` returning true) stops generation within one
        decoding step; the generation thread has finished when the generator has closed. An
        exception inside generation is re-raised here.
        """
        stats = stats if stats is not None else GenerationStats()
        if max_new_tokens < 1:
            raise GenerationInputError("max_new_tokens must be at least 1")
        sampling = self._sampling_kwargs(temperature, top_p)
        t0 = time.perf_counter()
        inputs = self.prepare(image, prompt_type, bbox, stats)
        stats.prepare_s = time.perf_counter() - t0

        cancel = CancelCriterion(should_stop)
        criteria = [cancel]
        guard = None
        if self.repetition_window > 0:
            guard = RepetitionGuard(self.repetition_window, self.repetition_max_period)
            criteria.append(guard)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True, timeout=self.poll_interval_s)
        eos_ids = self._eos_ids()
        kwargs = dict(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                      stopping_criteria=StoppingCriteriaList(criteria),
                      pad_token_id=min(eos_ids), **sampling)
        generate = self.decoder.generate if self.decoder is not None else self.model.generate
        worker = _GenerationThread(generate, kwargs, streamer)
        t_gen = time.perf_counter()
        worker.start()
        try:
            for piece in self._pieces(streamer, worker):
                if stats.first_piece_s is None:
                    stats.first_piece_s = time.perf_counter() - t_gen
                yield piece
            worker.join()
            if worker.error is not None:
                raise worker.error
        finally:
            # Reached on normal end, on error, and on close() (GeneratorExit at the yield):
            # stop the thread at its next step and wait for it, so no generation outlives us.
            cancel.cancel()
            worker.join()
            stats.generate_s = time.perf_counter() - t_gen
            if guard is not None:
                guard.finalize()
            self._finish(stats, worker, cancel, guard, eos_ids, max_new_tokens)

    @staticmethod
    def _pieces(streamer: TextIteratorStreamer, worker: _GenerationThread) -> Iterator[str]:
        """Non-empty text pieces from the streamer until it ends; the streamer's timeout is only a
        chance to notice a generation thread that died without ending the stream."""
        while True:
            try:
                piece = next(streamer)
            except StopIteration:
                return
            except queue.Empty:
                if worker.is_alive():
                    continue
                if worker.error is None and streamer.text_queue.empty():
                    raise RuntimeError("the generation thread ended without closing its stream")
                continue
            if piece:
                yield piece

    def _finish(self, stats, worker, cancel, guard, eos_ids, max_new_tokens) -> None:
        output = worker.output
        if output is not None:
            sequences = output if isinstance(output, torch.Tensor) else output.sequences
            stats.new_tokens = int(sequences.shape[1]) - stats.prompt_tokens
        if worker.error is not None:
            stats.finish_reason = "error"
        elif guard is not None and guard.triggered:
            stats.finish_reason = "repetition"
        elif output is not None and stats.new_tokens > 0 and int(sequences[0, -1]) in eos_ids:
            stats.finish_reason = "eos"
        elif output is not None and stats.new_tokens >= max_new_tokens:
            stats.finish_reason = "length"
        elif cancel.cancelled:
            stats.finish_reason = "cancelled"
        stats.timings = {"prepare_s": stats.prepare_s, "generate_s": stats.generate_s}

    def generate(self, image: Image.Image, prompt_type: str, **kwargs) -> GenerationResult:
        """The whole answer at once: a loop over ``stream``."""
        stats = kwargs.pop("stats", None) or GenerationStats()
        text = "".join(self.stream(image, prompt_type, stats=stats, **kwargs))
        return GenerationResult(text=text, stats=stats)

    def trace(self, image: Image.Image, prompt_type: str, **kwargs):
        """Tokens, logprobs and attention-to-image maps of one answer: ``model_runner.trace.trace``."""
        from .trace import trace

        return trace(self, image, prompt_type, **kwargs)
