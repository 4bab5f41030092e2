"""The fast decoding path: one static KV cache, an eager prefill, a compiled one-token decode step.

``StaticDecoder(model, max_cache_len)`` stands in for ``model.generate``: its ``generate(**kwargs)``
takes the keyword arguments ``ModelRunner.stream`` gives ``model.generate`` and returns the same
``[1, prompt + new]`` sequences tensor, so the runner only swaps the callable. Inside:

- a transformers ``StaticCache`` allocated once, at construction, for ``max_cache_len`` tokens
  (rounded up to a multiple of ``kv_chunk``) and reset in place between requests;
- prefill: one eager forward over the prompt (the vision tower runs there, per image, without an
  N x N mask), filling the cache;
- decode: ``_decode_step(token) -> logits`` compiled once with
  ``torch.compile(mode="reduce-overhead", fullgraph=True, dynamic=False)`` on CUDA (CUDA graphs).
  Every shape in it is fixed (one token in, ``[1, vocab]`` out, the cache's full length), and the
  position lives in the cache's own position tensor, so page sizes and prompt lengths never cause
  a recompile;
- decode attention (``DECODE_ATTENTION``): the stock SDPA integration, when traced by dynamo,
  repeats the 2 KV heads to 12 over the whole static cache every layer and step (gigabytes of
  copies per token at page lengths). Ours reads each cached key and value once: the query heads
  of a KV head are packed into one small matrix, and the cache is cut into chunks of
  ``kv_chunk`` positions so that the two batched matrix products run over many chunks in
  parallel (split-K), with one exact softmax over all chunks. Prefill (several query tokens)
  goes to the stock SDPA function unchanged;
- the host side of each step is overlapped with the next step on the GPU: the next step is queued
  from the token still on the device before the host reads the current token back (through
  pinned memory and an event), hands it to the streamer and runs the stopping criteria on a CPU
  id buffer. A run that stops has queued one step too many; its result is dropped;
- one persistent worker thread runs every prefill and decode (CUDA graphs recorded by
  ``torch.compile`` belong to the thread that recorded them: a new thread per request would record
  them again). ``generate`` hands the job to that thread and waits for it.

Sampling uses a small function of our own (``sample_next_token``) rather than transformers'
logits-processor list: the same order and rules (temperature, then top-k, then top-p keeping at
least one token, then ``torch.multinomial``), but without the sort when top_p is 1 (the API's
default request, temperature 0.1 / top_p 1.0, is a sampled one) and with no per-step Python
objects over the whole input_ids.

Streaming, cancellation and the repetition guard behave as on the plain path: ``streamer.put``
gets the prompt, then every new token; ``streamer.end()`` is called at the end; the stopping
criteria are called after every token with ``(input_ids, None)`` (``input_ids`` a view of a CPU
buffer holding prompt + new tokens; no criterion of the runner reads ``scores``); generation stops
on either eos id (unless ``ignore_eos``, for benchmarks), on ``max_new_tokens`` or when a
criterion says so.
"""
from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

log = logging.getLogger(__name__)

DECODE_ATTENTION = "dots_static_decode"
DEFAULT_KV_CHUNK = 512

__all__ = ["StaticDecoder", "DECODE_ATTENTION", "sample_next_token", "decode_attention",
           "register_decode_attention", "dynamo_compile_count"]


# ---------------------------------------------------------------------------------------------
# Decode attention
# ---------------------------------------------------------------------------------------------


def decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, kv_chunk: int = DEFAULT_KV_CHUNK,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function. query [B, Hq, Q, D], key/value [B, Hkv, L, D],
    attention_mask [B, 1, Q, L] (bool: True = attend, or additive float) or None.
    Returns ([B, Q, Hq, D], None) like the stock functions."""
    if query.shape[2] != 1:  # prefill: the stock SDPA path (flash with is_causal on an empty cache)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    batch, q_heads, _, head_dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    scale = scaling if scaling is not None else head_dim ** -0.5
    chunk = kv_chunk if (kv_chunk and length > kv_chunk and length % kv_chunk == 0) else length
    chunks = length // chunk

    q = query.reshape(batch, kv_heads, 1, group, head_dim)  # heads kv*group + j -> (kv, j)
    k = key.reshape(batch, kv_heads, chunks, chunk, head_dim)
    v = value.reshape(batch, kv_heads, chunks, chunk, head_dim)
    f32_out = SCORE_PRECISION["mode"] != "native"
    if f32_out:  # float32 results straight from half inputs: no rounding of scores / partial sums
        qb = q.expand(batch, kv_heads, chunks, group, head_dim).reshape(-1, group, head_dim)
        scores = _bmm_float32(qb, k.reshape(-1, chunk, head_dim).transpose(1, 2))
        scores = scores.view(batch, kv_heads, chunks, group, chunk) * scale
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [B, Hkv, C, G, chunk]
    if attention_mask is not None:
        mask = attention_mask[:, :, -1, :].reshape(attention_mask.shape[0], 1, chunks, 1, chunk)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    peak = scores.amax(dim=(2, 4), keepdim=True)  # one softmax over all chunks
    weights = torch.exp(scores - peak)
    total = weights.sum(dim=(2, 4), keepdim=True)  # [B, Hkv, 1, G, 1]
    if f32_out:
        out = _bmm_float32(weights.to(value.dtype).reshape(-1, group, chunk), v.reshape(-1, chunk, head_dim))
        out = out.view(batch, kv_heads, chunks, group, head_dim)
    else:
        out = torch.matmul(weights.to(value.dtype), v).float()  # [B, Hkv, C, G, D]
    out = out.sum(dim=2) / total.squeeze(2)  # [B, Hkv, G, D]
    return out.to(query.dtype).reshape(batch, 1, q_heads, head_dim), None


# How the decode attention's two matrix products produce float32 (set by StaticDecoder):
#   "native"    in the input dtype, then upcast (float32 models; or where the next is unsupported)
#   "fp32_out"  torch.bmm(..., out_dtype=torch.float32): half inputs, float32 accumulate and result
#               (CUDA), so that bf16 scores are not rounded to bf16 as in eager attention
#   "emulate"   float32 copies of the inputs (tests of the "fp32_out" layout on CPU)
SCORE_PRECISION = {"mode": "native"}


def _bmm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if SCORE_PRECISION["mode"] == "fp32_out":
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def fp32_out_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.bmm(..., out_dtype=torch.float32)`` works for ``dtype`` inputs on ``device``."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        a = torch.ones(2, 3, 8, device=device, dtype=dtype)
        b = torch.ones(2, 8, 4, device=device, dtype=dtype)
        out = torch.bmm(a, b.transpose(1, 2).contiguous().transpose(1, 2), out_dtype=torch.float32)
        return out.dtype == torch.float32 and bool((out == 8).all())
    except Exception:  # noqa: BLE001 - an older torch or a backend without the overload
        return False


_registered = False


def register_decode_attention() -> None:
    """Register ``DECODE_ATTENTION`` with transformers (attention function + the SDPA mask builder).
    Idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    _registered = True


# ---------------------------------------------------------------------------------------------
# Token selection
# ---------------------------------------------------------------------------------------------


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sampled token per row of ``logits`` [B, V] (float32): temperature, then top-k, then
    nucleus (top-p; the smallest set of most likely tokens whose probability reaches top_p, at
    least one token), then ``torch.multinomial``. The same rules, in the same order, as transformers'
    warpers. Returns [B] long."""
    scores = logits / temperature if temperature not in (None, 1.0) else logits
    vocab = scores.shape[-1]
    if top_k and 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1.0 - top_p)
        drop[..., -1:] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def dynamo_compile_count() -> int:
    """How many graphs dynamo has compiled in this process (grows on every compile and recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class _Job:
    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _Worker:
    """One persistent daemon thread that runs jobs in order."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.result = job.fn()
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                job.error = exc
            finally:
                job.done.set()

    def run(self, fn: Callable[[], Any]) -> Any:
        if threading.current_thread() is self._thread:
            return fn()
        if not self._thread.is_alive():
            raise RuntimeError("the fast-decode worker thread has stopped")
        job = _Job(fn)
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def stop(self, timeout: float | None = 10.0) -> None:
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


class _TokenReader:
    """Reads device tokens back to the host. On CUDA: an asynchronous copy into pinned memory and
    an event per slot, so that the host waits only for the step that made the token."""

    def __init__(self, device: torch.device, slots: int = 2):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._host = torch.zeros(slots, dtype=torch.long, pin_memory=True)
            self._events = [torch.cuda.Event() for _ in range(slots)]
        self._slots = slots
        self._values: list[torch.Tensor | None] = [None] * slots

    def start(self, slot: int, token: torch.Tensor) -> None:
        slot %= self._slots
        if self.cuda:
            self._host[slot:slot + 1].copy_(token.reshape(1), non_blocking=True)
            self._events[slot].record()
        else:
            self._values[slot] = token

    def read(self, slot: int) -> int:
        slot %= self._slots
        if self.cuda:
            self._events[slot].synchronize()
            return int(self._host[slot])
        return int(self._values[slot].reshape(()))


@dataclass
class _Request:
    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    max_new_tokens: int
    streamer: Any
    criteria: Any
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    ignore_eos: bool
    min_new_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------


class StaticDecoder:
    """A drop-in for ``model.generate`` (batch 1) with a static KV cache and a compiled decode step.

    Args:
        model: a loaded ``DotsOCRForCausalLM`` (eval mode) on its device.
        max_cache_len: the longest prompt + new tokens a request may need; the cache is allocated
            once for it (rounded up to a multiple of ``kv_chunk``). A request that does not fit
            runs on plain ``model.generate`` instead (logged).
        compile: compile the decode step (``torch.compile``, fullgraph, fixed shapes). False: the
            same code, eager.
        backend / mode: ``torch.compile`` backend and mode. Defaults: "inductor" with
            "reduce-overhead" (CUDA graphs) on CUDA; "eager" (dynamo capture only, no code
            generation) elsewhere, e.g. for CPU tests. "aot_eager" also works on CPU.
        kv_chunk: decode-attention chunk length (see the module docstring).
        score_precision: ``SCORE_PRECISION`` mode of the decode attention; default "fp32_out" where
            supported (bf16/fp16 on CUDA), else "native". A compile that fails with "fp32_out" is
            retried once with "native" (logged).
    """

    def __init__(self, model, max_cache_len: int, compile: bool = True, *, backend: str | None = None,
                 mode: str | None = None, kv_chunk: int = DEFAULT_KV_CHUNK, score_precision: str | None = None):
        from transformers import StaticCache

        if max_cache_len < 2:
            raise ValueError("max_cache_len must be at least 2")
        self.model = model
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.kv_chunk = int(kv_chunk)
        if self.kv_chunk > 0 and max_cache_len > self.kv_chunk:
            max_cache_len = -(-max_cache_len // self.kv_chunk) * self.kv_chunk
        self.max_cache_len = int(max_cache_len)

        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = StaticCache(config=config, max_cache_len=self.max_cache_len)
        self.cache.early_initialization(batch_size=1, num_heads=config.num_key_value_heads, head_dim=head_dim,
                                        dtype=self.dtype, device=self.device)
        register_decode_attention()
        # the LLM's name for its KV cache argument: `past_key_values` up to transformers 5.23, `cache` after
        llm_forward = inspect.signature(type(model.model).forward).parameters
        self._cache_arg = "cache" if "cache" in llm_forward else "past_key_values"
        if score_precision is None:
            score_precision = "fp32_out" if fp32_out_supported(self.device, self.dtype) else "native"
        if score_precision not in ("native", "fp32_out", "emulate"):
            raise ValueError(f"unknown score_precision {score_precision!r}")
        self.score_precision = SCORE_PRECISION["mode"] = score_precision

        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
        self.eos_ids = sorted({int(e) for e in eos})
        self._eos_tensor = torch.tensor(self.eos_ids, dtype=torch.long, device=self.device)

        self.compiled = bool(compile)
        if backend is None:
            backend = "inductor" if self.device.type == "cuda" else "eager"
        if mode is None and backend == "inductor" and self.device.type == "cuda":
            mode = "reduce-overhead"
        self.backend, self.mode = (backend, mode) if compile else (None, None)
        self._cudagraphs = bool(compile) and self.device.type == "cuda" and mode == "reduce-overhead"
        self._compile_options = {"backend": backend, "fullgraph": True, "dynamic": False}
        if mode is not None:
            self._compile_options["mode"] = mode
        self._step = torch.compile(self._decode_step, **self._compile_options) if compile else self._decode_step

        self._ids = torch.zeros(1, self.max_cache_len, dtype=torch.long)  # prompt + new tokens (host)
        self._reader = _TokenReader(self.device)
        self._worker = _Worker("dots-ocr-fast-decode")
        self._lock = threading.Lock()
        self.warmed_up = False
        self.warmup_seconds: float | None = None
        self.last_timings: dict[str, float] = {}
        self.fallbacks = 0

    # -- the compiled step ------------------------------------------------------------------

    def _decode_step(self, token: torch.Tensor) -> torch.Tensor:
        """token [1, 1] long -> next-token logits [1, vocab] float32. Position = the cache length."""
        out = self.model.model(input_ids=token, use_cache=True, **{self._cache_arg: self.cache})
        logits = self.model.lm_head(out.last_hidden_state)  # [1, 1, vocab], as in the model's forward
        return logits[:, -1, :].float()

    @contextmanager
    def _decode_attention(self):
        config = self.model.config
        previous = config._attn_implementation
        config._attn_implementation = {"": DECODE_ATTENTION}  # the LLM only; sub-configs untouched
        try:
            yield
        finally:
            config._attn_implementation = {"": previous}

    # -- public API -------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                 max_new_tokens: int = 20, streamer=None, stopping_criteria: Iterable | None = None,
                 do_sample: bool = False, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, pad_token_id: int | None = None, *, ignore_eos: bool = False,
                 min_new_tokens: int = 0, mm_token_type_ids=None, **unsupported) -> torch.Tensor:
        """Like ``model.generate`` for one sequence; returns [1, prompt + new] on the input's device.

        Extras: ``ignore_eos`` (eos does not stop generation; for fixed-length benchmarks) and
        ``min_new_tokens`` (eos is masked out before that many new tokens, as in generate)."""
        if unsupported:
            raise TypeError(f"StaticDecoder.generate got unsupported arguments: {sorted(unsupported)}")
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"StaticDecoder is batch 1 only; got input_ids {tuple(input_ids.shape)}")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("StaticDecoder does not support padding (attention_mask must be all ones)")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        prompt = int(input_ids.shape[1])
        if prompt + max_new_tokens > self.max_cache_len:
            self.fallbacks += 1
            log.warning("prompt %d + max_new_tokens %d exceed the static cache (%d): plain generate",
                        prompt, max_new_tokens, self.max_cache_len)
            kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                          image_grid_thw=image_grid_thw, max_new_tokens=max_new_tokens, streamer=streamer,
                          stopping_criteria=stopping_criteria, do_sample=do_sample, temperature=temperature,
                          top_p=top_p, top_k=top_k, pad_token_id=pad_token_id)
            if ignore_eos:  # the nearest plain equivalent: eos masked until the last token
                min_new_tokens = max_new_tokens
            if min_new_tokens:
                kwargs["min_new_tokens"] = min_new_tokens
            if mm_token_type_ids is not None:
                kwargs["mm_token_type_ids"] = mm_token_type_ids
            with torch.inference_mode():
                return self.model.generate(**kwargs)

        gen = self.model.generation_config
        if do_sample:
            temperature = gen.temperature if temperature is None else temperature
            top_p = gen.top_p if top_p is None else top_p
            top_k = gen.top_k if top_k is None else top_k
        request = _Request(
            input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
            max_new_tokens=int(max_new_tokens), streamer=streamer,
            criteria=list(stopping_criteria) if stopping_criteria is not None else [],
            do_sample=bool(do_sample), temperature=float(temperature if temperature is not None else 1.0),
            top_p=float(top_p if top_p is not None else 1.0), top_k=int(top_k or 0),
            ignore_eos=bool(ignore_eos), min_new_tokens=int(min_new_tokens or 0))
        if request.do_sample and request.temperature <= 0:
            raise ValueError("temperature must be positive when sampling")
        with self._lock:  # one generation at a time
            return self._worker.run(lambda: self._run(request))

    def warmup(self, grids: Sequence[tuple[int, int]] = ((4, 4),), new_tokens: int = 8,
               text_tokens: int = 12) -> float:
        """Compile and record the decode step (greedy and sampled runs over small dummy prompts with
        one image each, ``grids`` in patches), so that no request pays for it. Returns seconds."""
        start = time.perf_counter()
        try:
            self._warmup_runs(grids, new_tokens, text_tokens)
        except Exception:
            if not (self.compiled and self.score_precision == "fp32_out"):
                raise
            log.exception("compiling the decode step with float32-output matmuls failed; retrying with native ones")
            self.score_precision = SCORE_PRECISION["mode"] = "native"
            torch._dynamo.reset()
            self._step = torch.compile(self._decode_step, **self._compile_options)
            self._warmup_runs(grids, new_tokens, text_tokens)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmed_up = True
        self.warmup_seconds = time.perf_counter() - start
        return self.warmup_seconds

    def _warmup_runs(self, grids, new_tokens: int, text_tokens: int) -> None:
        for grid in grids:
            ids, pixels, thw = self.dummy_inputs(grid, text_tokens)
            for sampled in (False, True):
                self.generate(input_ids=ids, pixel_values=pixels, image_grid_thw=thw, max_new_tokens=new_tokens,
                              do_sample=sampled, temperature=0.7 if sampled else None,
                              top_p=0.9 if sampled else None, top_k=0 if sampled else None, ignore_eos=True)

    def dummy_inputs(self, grid: tuple[int, int], text_tokens: int = 12):
        """(input_ids [1, L], pixel_values [h*w, C*T*p*p], image_grid_thw [[1, h, w]]) for a
        random image of ``grid`` = (h, w) patches, on the model's device."""
        vision = self.model.config.vision_config
        h, w = grid
        merge = vision.spatial_merge_size
        if h % merge or w % merge:
            raise ValueError(f"grid sides must be multiples of {merge}")
        image_tokens = (h // merge) * (w // merge)
        special = set(self.eos_ids) | {int(self.model.config.image_token_id),
                                       int(getattr(self.model.config, "video_token_id", -1))}
        text = [t for t in range(1, text_tokens + len(special) + 1) if t not in special][:text_tokens]
        half = len(text) // 2
        ids = text[:half] + [int(self.model.config.image_token_id)] * image_tokens + text[half:]
        row = vision.num_channels * vision.temporal_patch_size * vision.patch_size ** 2
        generator = torch.Generator(device="cpu").manual_seed(0)
        pixels = torch.randn(h * w, row, generator=generator).to(self.device, self.dtype)
        return (torch.tensor([ids], device=self.device), pixels,
                torch.tensor([[1, h, w]], device=self.device))

    def close(self) -> None:
        """Stop the worker thread (after the job in hand). The decoder cannot be used afterwards."""
        self._worker.stop()

    # -- one generation (on the worker thread) ---------------------------------------------

    def _select(self, logits: torch.Tensor, request: _Request, produced: int) -> torch.Tensor:
        if produced < request.min_new_tokens and self.eos_ids:
            logits = logits.index_fill(-1, self._eos_tensor, float("-inf"))
        if not request.do_sample:
            return logits.argmax(dim=-1)
        return sample_next_token(logits, request.temperature, request.top_p, request.top_k)

    def _queue_step(self, token: torch.Tensor, r: _Request, produced: int) -> torch.Tensor | None:
        """Queue the decode step after token number ``produced`` (0-based) and the choice of the
        next token; start reading it back. None when no further token may be produced."""
        if produced + 1 >= r.max_new_tokens:
            return None
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._step(token.reshape(1, 1))
        next_token = self._select(logits, r, produced + 1)
        self._reader.start(produced + 1, next_token)
        return next_token

    def _run(self, request: _Request) -> torch.Tensor:
        with torch.inference_mode(), self._decode_attention():
            return self._generate(request)

    def _generate(self, r: _Request) -> torch.Tensor:
        t0 = time.perf_counter()
        prompt = int(r.input_ids.shape[1])
        ids = self._ids
        ids[0, :prompt].copy_(r.input_ids[0].to("cpu"))
        if r.streamer is not None:
            r.streamer.put(ids[:, :prompt].clone())
        self.cache.reset()

        # prefill: eager, the vision tower inside (images only while the cache is empty)
        out = self.model(input_ids=r.input_ids.to(self.device), pixel_values=r.pixel_values,
                         image_grid_thw=r.image_grid_thw, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1)
        token = self._select(out.logits[:, -1, :].float(), r, 0)
        del out
        reader = self._reader
        reader.start(0, token)

        eos = set() if r.ignore_eos else set(self.eos_ids)
        produced = 0
        t_first = None
        pipelined = reader.cuda  # on CUDA the next step runs while the host handles this token
        next_token = None
        while True:
            if pipelined:
                next_token = self._queue_step(token, r, produced)
            value = reader.read(produced)
            if t_first is None:
                t_first = time.perf_counter()
            ids[0, prompt + produced] = value
            produced += 1
            if r.streamer is not None:
                r.streamer.put(torch.tensor([value]))
            stop = False
            if r.criteria:  # every criterion, every step (the repetition guard keeps state)
                for criterion in r.criteria:
                    if bool(criterion(ids[:, :prompt + produced], None).any()):
                        stop = True
            if value in eos or produced >= r.max_new_tokens or stop:
                break
            token = next_token if pipelined else self._queue_step(token, r, produced - 1)
        t_end = time.perf_counter()
        if r.streamer is not None:
            r.streamer.end()
        self.last_timings = {
            "prefill_s": t_first - t0,  # prompt in -> first new token on the host (vision included)
            "decode_s": t_end - t_first,  # the other produced - 1 tokens
            "new_tokens": float(produced),
            "decode_tok_s": (produced - 1) / (t_end - t_first) if produced > 1 and t_end > t_first else 0.0,
        }
        return ids[:, :prompt + produced].clone().to(r.input_ids.device)


def default_max_cache_len(max_pixels: int, patch_size: int = 14, merge_size: int = 2,
                          max_new_tokens: int = 24000, text_allowance: int = 1024) -> int:
    """Cache length for the largest page: image tokens at ``max_pixels`` + prompt text + new tokens."""
    image_tokens = max_pixels // (patch_size * merge_size) ** 2
    return int(image_tokens + text_allowance + max_new_tokens)
