"""Generation: a request dataclass in, a handle out, through the one decoding path.

``Generator.start(GenerationRequest) -> GenerationHandle``. The handle's ``pieces()`` yields the
answer as it is decoded: one ``Piece`` (text + token records) per token, or per run of tokens when
the caller has fallen behind the decoding loop; ``cancel()`` stops it within one decoding step;
``close()`` also waits until it has left the loop; ``stats`` fills in as it runs.

Where the work happens:

- **prepare** (the 28-px resize, the prompt, the image processor, the tensors on the device, the
  token chooser): on a small pool of ``max_batch_size`` threads owned by the generator, not on the
  caller's thread. torch's CPU ops start a team of OpenMP threads for each thread that calls them,
  and keep it as long as that thread lives: run on every HTTP request thread of a server, they
  grew the process by one team per request thread (82 -> 164 threads in a soak). The pool bounds
  that to ``max_batch_size`` teams; ``run_on_model_thread`` lends it to other torch work (a trace);
- **vision tower, prefill, every decode step, token choice and stop checks**: on the engine's
  loop thread (``model_runner.batching``), for up to ``max_batch_size`` requests at once;
- **tokens to text** (``PieceAssembler``, tokenizers only): on the caller's thread, so a slow
  reader costs the loop nothing. Each token record carries its span in the answer text, so that
  per-cell confidence needs no second decode.

Stopping: eos (any of the checkpoint's eos ids), ``max_new_tokens``, the repetition guard, or
cancellation (``cancel()``, closing ``pieces()``, or ``should_stop()`` returning true). Whichever
ended the run is ``stats.finish_reason``; a failed run says ``"error"`` and re-raises in ``pieces()``.
"""
from __future__ import annotations

import contextvars
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from PIL import Image

from .batching import END, BatchEngine, DecodeBackend, EngineRequest
from .decoding import DecodingOptions, GenerationInputError, Piece, PieceAssembler, TokenChooser, TokenRecord
from .defaults import DEFAULT_MAX_NEW_TOKENS
from .processing import PageInputs
from .repetition import RepetitionGuard

__all__ = ["FINISH_REASONS", "PagePrompt", "GenerationRequest", "GenerationStats", "GenerationResult",
           "GenerationHandle", "Generator", "collect", "eos_token_ids", "MAX_TOKENS_PER_PIECE",
           "BATCHED_WAKE_INTERVAL_S"]

FINISH_REASONS = ("eos", "length", "repetition", "cancelled", "error")
# The most tokens one Piece carries when the consumer has fallen behind the decoding loop.
MAX_TOKENS_PER_PIECE = 64
# How often a caller that reads the whole answer anyway (a plain HTTP answer, a batch page) is
# woken to collect the tokens decoded meanwhile; the end of the answer wakes it at once. Waking a
# thread for every token costs more than the tiny model's decode step (scripts/bench_throughput.py,
# plain requests, 2 CPU cores: batch 4 went from 2,354 to 3,498 tok/s; docs/BENCHMARKS.md).
BATCHED_WAKE_INTERVAL_S = 0.1


def eos_token_ids(model) -> frozenset[int]:
    """The checkpoint's eos ids (generation_config.json lists two: <|endoftext|> and <|endofassistant|>)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


@dataclass(frozen=True)
class PagePrompt:
    """What the model reads: a page and either a trained prompt (``prompt_type``, with ``bbox`` in
    original pixels for grounding and ``question`` for ``prompt_general``) or chat ``messages``."""

    image: Image.Image
    prompt_type: str | None = None
    bbox: Sequence[float] | None = None
    question: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. ``decoding``: temperature, top-p, seed, penalties, logprobs (validated at
    ``start``). ``ignore_eos``: the answer runs to ``max_new_tokens``: neither eos nor the
    repetition guard ends it (fixed-length benchmarks, as vLLM's ``ignore_eos``).
    ``wake_interval_s``: 0 hands each token over as soon as it is decoded (a stream); > 0 collects
    the tokens decoded meanwhile at most that often (the first one and the end at once)."""

    prompt: PagePrompt
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ignore_eos: bool = False
    should_stop: Callable[[], bool] | None = None
    wake_interval_s: float = 0.0


@dataclass
class GenerationStats:
    """Filled in while a generation runs; read it after its pieces end. Seconds (perf_counter)."""

    finish_reason: str | None = None  # one of FINISH_REASONS
    prompt_tokens: int = 0  # prompt length, image tokens included
    new_tokens: int = 0  # tokens generated (an eos that ended the answer counts)
    original_size: tuple[int, int] | None = None  # (width, height) of the image given
    model_size: tuple[int, int] | None = None  # (width, height) the model saw
    seed: int | None = None  # the seed this request sampled with (its own, or drawn for it)
    prepare_s: float = 0.0  # resize + processor + copy to device
    queue_s: float = 0.0  # waiting for the loop to take the request in (other pages' prefill)
    vision_s: float = 0.0  # vision tower
    prefill_s: float = 0.0  # LLM prefill over the prompt
    decode_s: float = 0.0  # from the first new token to the last
    ttft_s: float | None = None  # from the start to the first token decoded
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


class GenerationHandle:
    """One running generation (see the module docstring). ``pieces()`` may be iterated once."""

    def __init__(self, generator: "Generator", request: GenerationRequest, stats: GenerationStats | None = None):
        self.request = request
        self.stats = stats if stats is not None else GenerationStats()
        self.inputs: PageInputs | None = None  # the prepared page, once prepared
        self._generator = generator
        self._engine_request: EngineRequest | None = None
        self._cancelled = False
        self._iterator = generator._run(self)

    def pieces(self) -> Iterator[Piece]:
        return self._iterator

    __iter__ = pieces

    def cancel(self) -> None:
        """Stop at the next decoding step (the pieces then end, ``finish_reason`` "cancelled")."""
        self._cancelled = True
        if self._engine_request is not None:
            self._engine_request.cancel()

    def close(self) -> None:
        """Cancel and wait until the request has left the decoding loop (its slot is free)."""
        self.cancel()
        self._iterator.close()

    @property
    def cancelled(self) -> bool:
        return self._cancelled


class Generator:
    """The decoding path of one loaded model: its engine (on ``backend``), its prepare pool, its
    eos ids and repetition guard settings. ``poll_interval_s``: how often a caller waiting for its
    next token checks that the decoding loop is still alive (so it never waits forever)."""

    def __init__(self, model, processor, backend: DecodeBackend, *, max_batch_size: int = 1,
                 repetition_window: int = 512, repetition_max_period: int = 128, poll_interval_s: float = 0.5):
        self.model = model
        self.processor = processor
        self.backend = backend
        self.engine = BatchEngine(backend, max_batch_size, run_loop=getattr(backend, "run_loop", None))
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.eos_ids = eos_token_ids(model)
        self.repetition_window = repetition_window
        self.repetition_max_period = repetition_max_period
        self.poll_interval_s = poll_interval_s
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(max_batch_size)), thread_name_prefix="dots-ocr-prepare")

    @property
    def max_batch_size(self) -> int:
        return self.engine.max_batch_size

    def start(self, request: GenerationRequest, stats: GenerationStats | None = None) -> GenerationHandle:
        """A handle on ``request``'s generation (filling in ``stats`` when given). It reserves its
        place in the engine when its pieces are first asked for (``BatchFullError`` there when
        ``max_batch_size`` already run)."""
        if request.max_new_tokens < 1:
            raise GenerationInputError("max_new_tokens must be at least 1")
        if not request.wake_interval_s >= 0:
            raise GenerationInputError("wake_interval_s must be >= 0")
        request.decoding.validate()
        return GenerationHandle(self, request, stats)

    def run_on_model_thread(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on one of the pool's threads (torch work of a request that is not decoding,
        e.g. a trace's forward pass), its result or its exception."""
        return self._pool.submit(fn).result()

    def prepare(self, prompt: PagePrompt) -> PageInputs:
        """The page's model inputs (CPU tensors), on the pool."""
        return self.run_on_model_thread(lambda: self._page_inputs(prompt))

    def close(self) -> None:
        """Stop the pool's threads (a generator that is thrown away; the server keeps its own)."""
        self._pool.shutdown(wait=True)

    # -- one run, on the caller's thread ------------------------------------------------------------

    def _run(self, handle: GenerationHandle) -> Iterator[Piece]:
        started = time.perf_counter()
        request, stats, engine = handle.request, handle.stats, self.engine
        engine.reserve()
        t_gen = started
        engine_request = None
        try:
            # prepared on the pool, inside the caller's context (its log lines keep the request id),
            # which the engine request keeps for the decoding loop's lines about it
            handle.inputs, engine_request = self._pool.submit(
                contextvars.copy_context().run, self._engine_request, request, contextvars.copy_context()).result()
            handle._engine_request = engine_request
            if handle.cancelled:
                engine_request.cancel()
            inputs = handle.inputs
            stats.original_size, stats.model_size = inputs.original_size, inputs.model_size
            stats.prompt_tokens = inputs.prompt_tokens
            stats.seed = engine_request.chooser.seed
            stats.prepare_s = time.perf_counter() - started
            assembler = PieceAssembler(self.processor.tokenizer)
            t_gen = time.perf_counter()
            engine.submit(engine_request)
            logprobs = request.decoding.logprobs
            for piece in self._pieces(engine_request, assembler, logprobs, request.wake_interval_s):
                if stats.ttft_s is None:  # when the loop chose it, not when this thread woke up
                    stats.ttft_s = engine_request.timings.get("first_token", time.perf_counter()) - started
                if piece.text and stats.first_piece_s is None:
                    stats.first_piece_s = time.perf_counter() - t_gen
                yield piece
            if engine_request.error is not None:
                raise engine_request.error
            tail = assembler.end()
            if tail:
                yield Piece(tail)
        finally:
            # Reached on normal end, on error, and on close() (GeneratorExit at the yield): stop
            # the request at its next step and wait until it has left the loop.
            if engine_request is not None:
                engine_request.cancel()
                engine.wait(engine_request, self.poll_interval_s)
                _finish(stats, engine_request, t_gen)
            engine.release()

    def _page_inputs(self, prompt: PagePrompt) -> PageInputs:
        return self.processor.page_inputs(prompt.image, prompt.prompt_type, bbox=prompt.bbox,
                                          question=prompt.question, messages=prompt.messages)

    def _engine_request(self, request: GenerationRequest,
                        context: contextvars.Context) -> tuple[PageInputs, EngineRequest]:
        """On the pool: the page's inputs on the device, its token chooser and repetition guard."""
        inputs = self._page_inputs(request.prompt)
        tensors = {k: inputs.tensors[k] for k in ("input_ids", "pixel_values", "image_grid_thw") if k in inputs.tensors}
        tensors = {k: v.to(self.device) for k, v in tensors.items()}
        if "pixel_values" in tensors:
            tensors["pixel_values"] = tensors["pixel_values"].to(self.dtype)
        vocab = int(self.model.lm_head.weight.shape[0])
        chooser = TokenChooser(request.decoding, vocab, self.device, prompt_ids=tensors["input_ids"][0])
        guard = (RepetitionGuard(self.repetition_window, self.repetition_max_period)
                 if self.repetition_window > 0 and not request.ignore_eos else None)
        engine_request = EngineRequest(inputs=tensors, chooser=chooser, max_new_tokens=int(request.max_new_tokens),
                                       eos_ids=frozenset() if request.ignore_eos else self.eos_ids, guard=guard,
                                       should_stop=request.should_stop, logprobs=request.decoding.logprobs,
                                       context=context)
        return inputs, engine_request

    def _pieces(self, request: EngineRequest, assembler: PieceAssembler, logprobs: int | None,
                wake_interval_s: float = 0.0) -> Iterator[Piece]:
        """Pieces of the request's tokens until its END; the timeout only checks that the loop
        is alive (a loop that died without ending the request raises). ``wake_interval_s`` > 0:
        collect at most that often (the first token, the end of the answer, and what is left
        after a full piece, at once)."""
        engine = self.engine
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


def collect(handle: GenerationHandle) -> GenerationResult:
    """The whole answer of ``handle``: a loop over its pieces, keeping the token records too."""
    text, tokens = [], []
    try:
        for piece in handle.pieces():
            text.append(piece.text)
            tokens.extend(piece.tokens)
    finally:
        handle.close()
    return GenerationResult(text="".join(text), stats=handle.stats, tokens=tokens)
