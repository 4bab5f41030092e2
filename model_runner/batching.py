"""Continuous batching: many requests decode together in one loop, joining and leaving at any step.

``BatchEngine`` runs one decoding loop on one worker thread for up to ``max_batch_size``
requests. A request is prepared on its caller's thread (resize, processor), then queued; at the
next step boundary the loop runs its vision tower and prefill alone (one page per gap between two
decode steps, so a joining page stalls the running streams by at most one page's prefill), chooses
its first token, and adds its row to the batch. Every following step feeds each row's last token
through the LLM at once. After each step every row gets its token (its own ``TokenChooser``:
temperature, top-p, seed, penalties, logprobs) and its own stop checks (eos, ``max_new_tokens``,
the repetition guard, cancel via ``cancel()`` or ``should_stop()``); a row that ends leaves the
batch before the next step and its slot is free at once.

Failures stay with their request where they can be pinned on it: an error in a request's prefill,
token choice, repetition guard or ``should_stop`` fails that request alone. An error inside the
shared batched forward pass cannot be attributed to one row: it fails the rows of that step and
the engine starts again from an empty batch (requests waiting to join are not affected).

The loop's thread exists while there is work: a busy period starts one (named
``dots-ocr-generate``) and it ends when the last request has left, so an idle runner holds no
thread; as it ends, the C allocator is asked to give the memory freed meanwhile back to the
system, so that an idle server's resident memory goes back down. A backend may run the loop on a
thread of its own instead (the CUDA fast path keeps one persistent thread because CUDA graphs
belong to the thread that recorded them).

The model side is a *backend* (``DecodeBackend``: ``prefill``, ``add``, ``step``, ``remove``,
``reset``, ``rows``). ``DynamicBatch`` (here) is the plain path; ``fast_decode.StaticDecoder`` is
the CUDA fast path. The engine's public counters (``running``, ``waiting``, ``active``, ``steps``,
``max_rows_seen``) are what ``/metrics`` reads.

KV cache of the plain path (``DynamicBatch``): a transformers ``DynamicCache`` per request for its
prefill, merged into one batched ``DynamicCache`` whose rows are *left-padded* to a common length;
a 2-D attention mask hides the padding and explicit ``position_ids`` give each row its own
positions. Why this rather than a static cache with per-row positions: the plain path runs on CPU
and on GPUs without the fast path, where a cache sized for the longest page times N slots would
hold gigabytes for short answers; a dynamic cache grows with what the rows hold, the prefill is
exactly the batch-1 prefill of ``generate`` (so a greedy answer is the same alone and batched),
and transformers' own cache class and mask code do the work. The price: joining copies the
batch's cache once (padding it to the longer of the two), and short rows carry the padding of
the longest one until it leaves (the common left padding is trimmed whenever a row leaves).
``DynamicCache.update`` copies the whole cache on every step anyway (``torch.cat``), so the
extra copy on join is one step's worth.
"""
from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from image_utils import give_back_freed_memory

from .decoding import GenerationInputError, TokenChooser, choose_tokens

log = logging.getLogger(__name__)

WORKER_NAME = "dots-ocr-generate"
END = object()  # the last event of every request

__all__ = ["BatchEngine", "BatchFullError", "DecodeBackend", "DynamicBatch", "EngineRequest", "run_prefill", "END"]


class BatchFullError(RuntimeError):
    """More concurrent generations than ``max_batch_size`` were started."""


@runtime_checkable
class DecodeBackend(Protocol):
    """The model side of the engine: one request's prefill, and the batch's rows decoding together.

    Optional, looked up with ``getattr``: ``capacity`` (the most prompt + new tokens one row may
    hold; the engine refuses a request beyond it) and ``run_loop(fn)`` (runs the engine's loop on
    a thread the backend owns; returns a handle with ``is_alive()`` and ``join(timeout)``)."""

    def prefill(self, inputs: dict[str, torch.Tensor], timings: dict[str, float]) -> tuple[Any, torch.Tensor]:
        """Vision tower + prefill of one request: (a handle for ``add``, next-token logits [1, V] float32)."""

    def add(self, handle: Any) -> None:
        """The prefilled request becomes the batch's last row."""

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [b, 1] long, positions [b] long (each row's own) -> logits [b, V] float32."""

    def remove(self, rows: list[int]) -> list[int]:
        """Drop these rows; the old indices of the remaining rows, in their new order."""

    def reset(self) -> None:
        """An empty batch."""

    @property
    def rows(self) -> int:
        """Rows in the batch."""


# ---------------------------------------------------------------------------------------------
# Prefill (both backends): vision tower, image rows into the prompt, one LLM forward
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_prefill(model, inputs: dict[str, torch.Tensor], cache, timings: dict[str, float]) -> torch.Tensor:
    """The prompt (batch 1) through the model into ``cache``; the next-token logits [1, V] float32.

    The same computation as ``DotsOCRForCausalLM.forward`` at prefill, split so that the vision
    tower and the LLM are timed apart (``timings['vision_s']``, ``timings['prefill_s']``; on CUDA
    with a synchronisation between them)."""
    device = inputs["input_ids"].device
    start = time.perf_counter()
    input_ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)  # [1, L, C]
    pixel_values = inputs.get("pixel_values")
    if pixel_values is not None:
        features = model.get_image_features(pixel_values, inputs["image_grid_thw"])  # [N, C]
        embeds = model.merge_image_features(input_ids, embeds, features)
        _sync(device)
    vision_done = time.perf_counter()
    out = model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1, :].float()  # [1, V]
    _sync(device)
    timings["vision_s"] = vision_done - start
    timings["prefill_s"] = time.perf_counter() - vision_done
    return logits


# ---------------------------------------------------------------------------------------------
# The plain backend: DynamicCache, left-padded rows
# ---------------------------------------------------------------------------------------------


class DynamicBatch:
    """Batched decoding on a transformers ``DynamicCache`` (see the module docstring)."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model = model
        self._new_cache = lambda: DynamicCache(config=model.config)
        self.cache = None  # the batch's DynamicCache, rows in batch order
        self.pads: list[int] = []  # left padding of each row

    @property
    def rows(self) -> int:
        return len(self.pads)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def prefill(self, inputs, timings):
        cache = self._new_cache()
        logits = run_prefill(self.model, inputs, cache, timings)
        return cache, logits

    def add(self, cache) -> None:
        """Append the prefilled request's cache as the last row."""
        if self.cache is None:
            self.cache, self.pads = cache, [0]
            return
        have, new = self.length, cache.get_seq_length()
        grow = max(0, new - have)  # the batch gets this much more left padding
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, grow), _left_pad(theirs.keys, have - new)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, grow), _left_pad(theirs.values, have - new)], dim=0)
        self.pads = [p + grow for p in self.pads] + [max(0, have - new)]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [b, 1] long, positions [b] long (each row's own) -> logits [b, V] float32."""
        rows = self.rows
        mask = None
        if any(self.pads):  # 1 = a real token; the new token's column is real for every row
            span = torch.arange(self.length + 1, device=tokens.device)
            pads = torch.tensor(self.pads, device=tokens.device)
            mask = (span.unsqueeze(0) >= pads.unsqueeze(1)).long()  # [b, T + 1]
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions.view(rows, 1),
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def remove(self, rows: list[int]) -> list[int]:
        """Drop these rows; returns the old indices of the remaining rows, in their new order."""
        keep = [i for i in range(self.rows) if i not in set(rows)]
        if not keep:
            self.reset()
            return []
        index = torch.tensor(keep, device=self.cache.layers[0].keys.device)
        self.pads = [self.pads[i] for i in keep]
        trim = min(self.pads)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]
        self.pads = [p - trim for p in self.pads]
        return keep

    def reset(self) -> None:
        self.cache, self.pads = None, []


def _left_pad(x: torch.Tensor, count: int) -> torch.Tensor:
    """x [B, H, T, D] with ``count`` zero positions in front (none when count <= 0)."""
    if count <= 0:
        return x
    return torch.cat([x.new_zeros(x.shape[0], x.shape[1], count, x.shape[3]), x], dim=2)


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class EngineRequest:
    """One generation inside the engine. The caller reads ``events``: ``(token_id, payload)``
    tuples (payload: the token's logprob row or None), then ``END``; after ``END``,
    ``finish_reason`` is set and ``error`` holds the exception of a failed request."""

    inputs: dict[str, torch.Tensor]  # input_ids [1, L], pixel_values, image_grid_thw, on the device
    chooser: TokenChooser
    max_new_tokens: int
    eos_ids: frozenset[int]  # empty: eos does not stop generation (fixed-length benchmarks)
    min_new_tokens: int = 0  # eos is masked out before this many new tokens
    guard: Any = None  # RepetitionGuard-like: guard(input_ids [1, n], None) -> bool tensor
    should_stop: Callable[[], bool] | None = None
    logprobs: int | None = None
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # The context of the thread that made the request (e.g. the server's request id): the loop
    # writes this request's log lines inside it, so they carry what that thread's lines carry.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    cache_len: int = 0  # tokens of this row in the KV cache
    last_token: torch.Tensor | None = None  # [1] long on the device: the next step's input
    _ids: torch.Tensor | None = None  # prompt + answer on the host, for the repetition guard

    @property
    def prompt_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def cancel(self) -> None:
        self.cancelled.set()

    def _wants_stop(self) -> bool:
        if not self.cancelled.is_set() and self.should_stop is not None and self.should_stop():
            self.cancelled.set()
        return self.cancelled.is_set()

    def _accept(self, token: int, payload) -> str | None:
        """Record a new token and hand it to the caller; the finish reason it causes, if any."""
        self.generated.append(token)
        self.events.put((token, payload))
        produced = len(self.generated)
        if self.guard is not None:
            if self._ids is None:
                self._ids = torch.empty(1, self.prompt_len + self.max_new_tokens, dtype=torch.long)
                self._ids[0, :self.prompt_len] = self.inputs["input_ids"][0].cpu()
            end = self.prompt_len + produced
            self._ids[0, end - 1] = token
            if bool(self.guard(self._ids[:, :end], None).any()):
                return "repetition"
        if token in self.eos_ids:
            return "eos"
        if produced >= self.max_new_tokens:
            return "length"
        return None


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


class _ThreadRunner:
    """Runs each busy period of the loop on a new thread (the plain path)."""

    def __call__(self, fn: Callable[[], None]):
        thread = threading.Thread(target=fn, name=WORKER_NAME, daemon=True)
        thread.start()
        return thread


class BatchEngine:
    """See the module docstring. ``backend``: DynamicBatch or StaticDecoder. ``run_loop``: how a
    busy period's loop is started (default: a new thread); it returns a handle with
    ``is_alive()`` and ``join(timeout)``."""

    def __init__(self, backend: DecodeBackend, max_batch_size: int = 1, run_loop: Callable | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.backend = backend
        self.max_batch_size = int(max_batch_size)
        self._run_loop = run_loop or _ThreadRunner()
        self._lock = threading.Lock()
        self._reserved = 0
        self._pending: deque[EngineRequest] = deque()
        self._active: list[EngineRequest] = []  # the batch's rows, in the backend's row order
        self._worker = None  # the handle of the running loop, None when idle
        # The handle of the last loop that went idle: it has said so (``_worker`` is None) but its
        # thread may still be on its way out, so ``release`` can still wait for it to end.
        self._ending = None
        self.steps = 0  # decode steps run (all rows together)
        self.max_rows_seen = 0

    # -- admission --------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Generations in flight (reserved: preparing, waiting to join, or decoding)."""
        return self._reserved

    @property
    def waiting(self) -> int:
        """Prepared requests waiting to join the batch (behind other pages' prefill)."""
        return len(self._pending)

    @property
    def active(self) -> int:
        """Rows decoding in the batch now."""
        return len(self._active)

    def reserve(self) -> None:
        with self._lock:
            if self._reserved >= self.max_batch_size:
                raise BatchFullError(f"{self._reserved} generations are running, the most this runner takes "
                                     f"at once (max_batch_size {self.max_batch_size})")
            self._reserved += 1

    def release(self) -> None:
        with self._lock:
            self._reserved -= 1
            idle_worker = None
            if self._reserved == 0:
                idle_worker = self._worker if self._worker is not None else self._ending
        if idle_worker is not None:  # nothing left: let the loop's thread end before we return
            idle_worker.join(5.0)

    def submit(self, request: EngineRequest) -> None:
        """Queue a prepared request (after ``reserve``); it joins the batch at the next step."""
        request.timings["submitted"] = time.perf_counter()
        with self._lock:
            self._pending.append(request)
            if self._worker is None:
                self._worker = self._run_loop(self._loop)

    def worker_alive(self) -> bool:
        worker = self._worker
        return worker is not None and worker.is_alive()

    def wait(self, request: EngineRequest, poll_s: float = 0.5) -> None:
        """Block until the request has left the engine (its loop may be gone: then it is failed)."""
        while not request.done.wait(poll_s):
            if not self.worker_alive() and not request.done.is_set():
                self._finish(request, "error", RuntimeError("the generation loop ended without finishing the request"))

    # -- the loop (one thread) ----------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        if not self._pending and not self._active:
                            self._ending, self._worker = self._worker, None
                            break
                        joining = self._pending.popleft() if self._pending else None
                    if joining is not None:
                        self._admit(joining)
                    self._drop_cancelled()
                    if self._active:
                        self._step()
        except BaseException as exc:  # a bug in the loop itself: fail everything, leave nothing running
            log.exception("the batch decoding loop failed")
            with self._lock:
                stranded = list(self._active) + list(self._pending)
                self._active, self._ending, self._worker = [], self._worker, None
                self._pending.clear()
            self.backend.reset()
            for request in stranded:
                self._finish(request, "error", exc)
        # Idle: the pages, activations and caches of this busy period were freed, mostly into the
        # per-thread malloc arenas of the threads that made them; without this, a server's RSS
        # stays at its busiest (about 1 ms with a model loaded, once per busy period).
        give_back_freed_memory()

    def _admit(self, request: EngineRequest) -> None:
        """Vision tower + prefill of one request, its first token, and its row in the batch."""
        request.timings["queue_s"] = time.perf_counter() - request.timings["submitted"]
        try:
            if request._wants_stop():
                self._finish(request, "cancelled")
                return
            self._check_capacity(request)
            handle, logits = self.backend.prefill(request.inputs, request.timings)
            request.cache_len = request.prompt_len
            if self._emit([request], logits):  # ended on its first token (or failed)
                return
            self.backend.add(handle)
        except Exception as exc:  # noqa: BLE001 - this request's own failure
            request.context.run(log.warning, "a request failed in its prefill: %s: %s", type(exc).__name__, exc)
            self._finish(request, "error", exc)
            return
        self._active.append(request)
        self.max_rows_seen = max(self.max_rows_seen, len(self._active))

    def _check_capacity(self, request: EngineRequest) -> None:
        """A backend with a fixed cache per row (``capacity``: the fast path's static cache) takes
        only requests whose prompt + ``max_new_tokens`` fit in it."""
        capacity = getattr(self.backend, "capacity", None)
        if capacity is not None and request.prompt_len + request.max_new_tokens > capacity:
            raise GenerationInputError(
                f"prompt ({request.prompt_len} tokens) + max_new_tokens ({request.max_new_tokens}) exceed the "
                f"{capacity} tokens a request may hold on this server's fast path (lower max_new_tokens)")

    def _drop_cancelled(self) -> None:
        leaving = []
        for i, request in enumerate(self._active):
            try:
                if request._wants_stop():
                    self._finish(request, "cancelled")
                    leaving.append(i)
            except Exception as exc:  # noqa: BLE001 - a failing should_stop fails its request
                self._finish(request, "error", exc)
                leaving.append(i)
        self._leave(leaving)

    def _step(self) -> None:
        active = self._active
        try:
            tokens = torch.cat([r.last_token for r in active]).view(len(active), 1)
            positions = torch.tensor([r.cache_len for r in active], device=tokens.device)
            logits = self.backend.step(tokens, positions)
        except Exception as exc:  # the shared forward failed: every row of it fails
            log.exception("a batched decode step failed (%d rows)", len(active))
            self._fail_batch(exc)
            return
        self.steps += 1
        for request in active:
            request.cache_len += 1
        ended = self._emit(active, logits)
        self._leave(ended)

    def _emit(self, requests: list[EngineRequest], logits: torch.Tensor) -> list[int]:
        """Choose, read back and hand out one token per row; the rows that ended."""
        for i, request in enumerate(requests):
            if request.min_new_tokens and len(request.generated) < request.min_new_tokens and request.eos_ids:
                logits[i, sorted(request.eos_ids)] = float("-inf")
        tokens, payload, errors = choose_tokens([r.chooser for r in requests], logits,
                                                [r.logprobs for r in requests])
        host_tokens = tokens.tolist()
        host_payload = payload.tolist() if payload is not None else None
        ended = []
        for i, request in enumerate(requests):
            if i in errors:
                self._finish(request, "error", errors[i])
                ended.append(i)
                continue
            request.last_token = tokens[i:i + 1]
            if "first_token" not in request.timings:
                request.timings["first_token"] = time.perf_counter()
            row = host_payload[i] if host_payload is not None and request.logprobs is not None else None
            try:
                reason = request._accept(host_tokens[i], row)
            except Exception as exc:  # noqa: BLE001 - e.g. its repetition guard failed
                self._finish(request, "error", exc)
                ended.append(i)
                continue
            if reason is not None:
                self._finish(request, reason)
                ended.append(i)
        return ended

    def _leave(self, rows: list[int]) -> None:
        if not rows:
            return
        try:
            order = self.backend.remove(rows)
        except Exception as exc:  # the batch's cache is in doubt: start again
            log.exception("removing finished rows failed")
            self._fail_batch(exc)
            return
        self._active = [self._active[i] for i in order]

    def _fail_batch(self, exc: BaseException) -> None:
        for request in self._active:
            if not request.done.is_set():
                request.context.run(log.warning, "a request failed with its batch's shared step: %s: %s",
                                    type(exc).__name__, exc)
                self._finish(request, "error", exc)
        self._active = []
        self.backend.reset()

    @staticmethod
    def _finish(request: EngineRequest, reason: str, error: BaseException | None = None) -> None:
        if request.done.is_set():
            return
        request.finish_reason = "error" if error is not None else reason
        request.error = error
        request.timings["end"] = time.perf_counter()
        request.events.put(END)
        request.done.set()
