"""The fast decoding path: a batched backend for ``batching.BatchEngine`` with a static KV cache of
N slots and a compiled one-token decode step.

``StaticDecoder(model, max_cache_len, slots=N)`` has the backend methods the engine drives
(``prefill``, ``add``, ``step``, ``remove``, ``reset``, ``run_loop``); the engine keeps the
requests, their token choice and their stop checks. Inside:

- **The cache.** Per layer one key and one value tensor ``[N, Hkv, max_cache_len, D]``, allocated
  once at construction (after checking, on CUDA, that they fit in free GPU memory) and never
  reallocated. Why our own tensors rather than transformers' ``StaticCache``: ``StaticCache``
  writes every row of a step at the same ``cache_position``, while here each row sits at its own
  position (pages of different lengths, joined at different steps). The rows of the batch are
  the first rows of the cache, in the engine's order: row i of a step is slot i. A request that
  joins takes the next free slot (the first after the batch); one that leaves frees its slot, and
  the last row of the batch moves into the hole (one copy of that row's filled positions; the
  rest of the cache is not touched). ``remove`` tells the engine the new order.
- **Prefill** (one request, batch 1, eager): ``batching.run_prefill`` into a fresh
  ``DynamicCache``: exactly the plain path's prefill (same kernels, same mask, so the first token
  is the plain path's), vision tower included. ``add`` copies its keys and values into the slot's
  rows (prompt-length positions, once per request; small against the prefill itself).
- **Decode step**: one token per row through the LLM, each row at its own position. The step runs
  on a *batch bucket* (1, 2, 4, 8, 16 ... up to N: the active rows padded up to the next bucket;
  pad rows are free slots, writing at their position 0, which nothing reads before a prefill
  overwrites it) and on a *KV-length bucket* (powers of two from ``kv_chunk`` up to the cache
  length): attention reads only the first ``bucket`` positions of each row, and a mask hides each
  row's positions beyond its own length. So a step costs in proportion to the tokens the rows
  hold, not to the cache's capacity. With ``compile``, the step is one ``torch.compile``d
  function (``fullgraph``; on CUDA ``mode="reduce-overhead"``: CUDA graphs). The KV length is a
  dynamic dimension (one compiled graph serves every length bucket; CUDA graphs are recorded per
  (batch, length) pair), the batch bucket a static one. ``warmup()`` runs every pair, so that
  nothing compiles or records in steady state (``dynamo_compile_count()`` checks it).
- **Decode attention** (``decode_attention``): the stock SDPA integration, when traced by dynamo,
  repeats the 2 KV heads to 12 over the whole cache every layer and step. Ours reads each cached
  key and value once: the query heads of a KV head are packed into one small matrix, and the KV
  length is cut into chunks of ``kv_chunk`` positions so that the two batched matrix products run
  over many chunks in parallel (split-K), with one exact softmax over all chunks. Its score
  precision is per decoder (``score_precision``; passed down with the step's keyword arguments).
  How it is reached: building a decoder registers, once, an attention function under a name of
  its own (``sdpa+dots_static_decode`` for an SDPA model) and sets the LLM config's attention to
  it, once. That function runs ``decode_attention`` for the calls that carry ``static_decode=True``
  (the decoder's own steps pass it with their keyword arguments) and the implementation the model
  was loaded with for every other call (prefills, a teacher-forced trace on another thread). So
  nothing about the shared model changes per step, and a forward pass on any thread sees the same
  configuration.
- **One persistent thread** (``run_loop``) runs the engine's loop and the warm-up: CUDA graphs
  recorded by ``torch.compile`` belong to the thread that recorded them, so a new thread per busy
  period would record them again.
"""
from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from typing import Any, Callable, Sequence

import torch

from .batching import run_prefill

log = logging.getLogger(__name__)

DECODE_ATTENTION = "dots_static_decode"  # the suffix of the registered attention's name
DEFAULT_KV_CHUNK = 512
SCORE_PRECISIONS = ("native", "fp32_out", "emulate")
DEFAULT_MEMORY_RESERVE_GIB = 4.0

__all__ = ["StaticDecoder", "DECODE_ATTENTION", "SCORE_PRECISIONS", "decode_attention", "register_decode_attention",
           "base_attention",
           "dynamo_compile_count", "batch_buckets", "kv_buckets", "slots_that_fit", "default_max_cache_len",
           "fp32_out_supported"]


# ---------------------------------------------------------------------------------------------
# Decode attention
# ---------------------------------------------------------------------------------------------


def decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, kv_chunk: int = DEFAULT_KV_CHUNK,
                     score_precision: str = "native", **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function. query [B, Hq, Q, D], key/value [B, Hkv, L, D],
    attention_mask [B, 1, Q, L] (bool: True = attend, or additive float) or None.
    Returns ([B, Q, Hq, D], None) like the stock functions.

    ``score_precision``: how the two matrix products produce float32 scores and sums:
      "native"    in the input dtype, then upcast (float32 models; or where the next is unsupported)
      "fp32_out"  ``torch.bmm(..., out_dtype=torch.float32)``: half inputs, float32 accumulate and
                  result (CUDA), so that bf16 scores are not rounded to bf16 as in eager attention
      "emulate"   float32 copies of the inputs (tests of the "fp32_out" layout on CPU)"""
    if query.shape[2] != 1:  # several query tokens (a prefill): the stock SDPA function
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    batch, q_heads, _, head_dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    scale = scaling if scaling is not None else head_dim ** -0.5
    chunk = kv_chunk if (kv_chunk and length >= kv_chunk and length % kv_chunk == 0) else length
    chunks = length // chunk

    q = query.reshape(batch, kv_heads, 1, group, head_dim)  # heads kv*group + j -> (kv, j)
    k = key.unflatten(2, (chunks, chunk))  # a view (unlike reshape, no contiguity check on a narrowed cache)
    v = value.unflatten(2, (chunks, chunk))
    f32_out = score_precision != "native"
    if f32_out:  # float32 results straight from half inputs: no rounding of scores / partial sums
        qb = q.expand(batch, kv_heads, chunks, group, head_dim).reshape(-1, group, head_dim)
        scores = _bmm_float32(qb, k.reshape(-1, chunk, head_dim).transpose(1, 2), score_precision)
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
        out = _bmm_float32(weights.to(value.dtype).reshape(-1, group, chunk), v.reshape(-1, chunk, head_dim),
                           score_precision)
        out = out.view(batch, kv_heads, chunks, group, head_dim)
    else:
        out = torch.matmul(weights.to(value.dtype), v).float()  # [B, Hkv, C, G, D]
    out = out.sum(dim=2) / total.squeeze(2)  # [B, Hkv, G, D]
    return out.to(query.dtype).reshape(batch, 1, q_heads, head_dim), None


def _bmm_float32(a: torch.Tensor, b: torch.Tensor, score_precision: str) -> torch.Tensor:
    if score_precision == "fp32_out":
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


_registered: set[str] = set()
_SUFFIX = "+" + DECODE_ATTENTION


def base_attention(name: str) -> str:
    """The implementation a model was loaded with, under the name ``register_decode_attention`` gave it."""
    return name.removesuffix(_SUFFIX)


def register_decode_attention(base: str) -> str:
    """Register (once per ``base``) the attention function of the module docstring: for calls with
    ``static_decode=True``, ``decode_attention``; for every other call, ``base``'s own function
    ("sdpa", "eager", "flash_attention_2"), with ``base``'s mask builder. Returns its name
    (``base`` + "+dots_static_decode"; a name that contains "flash" keeps transformers' checks for
    flash attention true)."""
    base = base_attention(base)
    name = base + _SUFFIX
    if name in _registered:
        return name
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

    fallback = ALL_ATTENTION_FUNCTIONS.get_interface(base, eager_attention_forward)

    def attention(module, query, key, value, attention_mask, *, static_decode: bool = False,
                  kv_chunk: int = DEFAULT_KV_CHUNK, score_precision: str = "native", **kwargs):
        if static_decode:
            return decode_attention(module, query, key, value, attention_mask, kv_chunk=kv_chunk,
                                    score_precision=score_precision, **kwargs)
        return fallback(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    mask = ALL_MASK_ATTENTION_FUNCTIONS[base] if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping else sdpa_mask
    AttentionMaskInterface.register(name, mask)
    _registered.add(name)
    return name


# ---------------------------------------------------------------------------------------------
# Sizes: buckets, memory, cache length
# ---------------------------------------------------------------------------------------------


def dynamo_compile_count() -> int:
    """How many graphs dynamo has compiled in this process (grows on every compile and recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def batch_buckets(slots: int) -> tuple[int, ...]:
    """Batch sizes the decode step is compiled for: powers of two below ``slots``, then ``slots``."""
    sizes, size = [], 1
    while size < slots:
        sizes.append(size)
        size *= 2
    return tuple(sizes + [int(slots)])


def kv_buckets(max_cache_len: int, kv_chunk: int) -> tuple[int, ...]:
    """KV lengths a step attends over: ``kv_chunk`` times 2, 4, 8 ... (256, 512 ... without
    chunking) below ``max_cache_len``, then ``max_cache_len``. At least two chunks: a compiled
    step sees the chunk count as a dynamic size, and dynamo gives a size of 1 a graph of its own."""
    sizes, size = [], 2 * max(1, kv_chunk or 128)
    while size < max_cache_len:
        sizes.append(size)
        size *= 2
    return tuple(sizes + [int(max_cache_len)])


def slots_that_fit(bytes_per_slot: int, free_bytes: int, reserve_bytes: int) -> int:
    """How many cache slots fit in ``free_bytes`` while leaving ``reserve_bytes`` free."""
    return max(0, int((free_bytes - reserve_bytes) // bytes_per_slot))


def default_max_cache_len(max_pixels: int, patch_size: int = 14, merge_size: int = 2,
                          max_new_tokens: int = 24000, text_allowance: int = 1024) -> int:
    """Cache length for the largest page: image tokens at ``max_pixels`` + prompt text + new tokens."""
    image_tokens = max_pixels // (patch_size * merge_size) ** 2
    return int(image_tokens + text_allowance + max_new_tokens)


# ---------------------------------------------------------------------------------------------
# The persistent thread
# ---------------------------------------------------------------------------------------------


class _Job:
    """A function queued on the worker; also the engine's loop handle (``is_alive``, ``join``)."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def is_alive(self) -> bool:
        return not self.done.is_set()

    def join(self, timeout: float | None = None) -> None:
        self.done.wait(timeout)


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
            except BaseException as exc:  # noqa: BLE001 - handed back to whoever waits for it
                job.error = exc
            finally:
                job.done.set()

    def submit(self, fn: Callable[[], Any]) -> _Job:
        if not self._thread.is_alive():
            raise RuntimeError("the fast-decode worker thread has stopped")
        job = _Job(fn)
        self._jobs.put(job)
        return job

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker and wait for its result (at once when already on it)."""
        if threading.current_thread() is self._thread:
            return fn()
        job = self.submit(fn)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def stop(self, timeout: float | None = 10.0) -> None:
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


# ---------------------------------------------------------------------------------------------
# The cache as the LLM sees it during one step
# ---------------------------------------------------------------------------------------------


class _StepCache:
    """What the LLM's attention layers get as their KV cache during one decode step: ``update``
    writes row i's new key/value at ``positions[i]`` of slot i and returns the first
    ``kv_len`` positions of the step's rows (views of the static tensors, no copy)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor,
                 kv_len: int):
        self.keys, self.values, self.positions, self.kv_len = keys, values, positions, kv_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows = key_states.shape[0]
        keys, values = self.keys[layer_idx], self.values[layer_idx]  # [N, Hkv, max_len, D]
        index = torch.arange(rows, device=keys.device)
        keys[index, :, self.positions] = key_states[:, :, 0]  # [rows, Hkv, D] at (row, :, its position)
        values[index, :, self.positions] = value_states[:, :, 0]
        # narrow, not a slice: a slice whose end may equal the length would make dynamo specialise
        return keys[:rows].narrow(2, 0, self.kv_len), values[:rows].narrow(2, 0, self.kv_len)


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------


class StaticDecoder:
    """A batched decoding backend with a static KV cache of ``slots`` rows and a compiled decode step
    (see the module docstring).

    Args:
        model: a loaded ``DotsOCRForCausalLM`` (eval mode) on its device.
        max_cache_len: the longest prompt + new tokens one request may need; every slot holds that
            many positions (rounded up to a multiple of ``kv_chunk``). The engine refuses a request
            that would not fit (``capacity``).
        slots: how many requests decode together (the runner's ``max_batch_size``).
        compile: compile the decode step (``torch.compile``, fullgraph). False: the same code, eager.
        backend / mode: ``torch.compile`` backend and mode. Defaults: "inductor" with
            "reduce-overhead" (CUDA graphs) on CUDA; "eager" (dynamo capture only, no code
            generation) elsewhere, e.g. for CPU tests. "aot_eager" also works on CPU.
        kv_chunk: decode-attention chunk length and the smallest KV-length bucket.
        score_precision: see ``decode_attention``; default "fp32_out" where supported (bf16/fp16 on
            CUDA), else "native". A compile that fails with "fp32_out" is retried once with "native".
        batch_sizes: the batch buckets (default ``batch_buckets(slots)``).
        memory_reserve_gib: on CUDA, GPU memory that must stay free after the cache is allocated
            (prefill and vision activations, CUDA-graph pools).
    """

    def __init__(self, model, max_cache_len: int, slots: int = 1, compile: bool = True, *,
                 backend: str | None = None, mode: str | None = None, kv_chunk: int = DEFAULT_KV_CHUNK,
                 score_precision: str | None = None, batch_sizes: Sequence[int] | None = None,
                 memory_reserve_gib: float = DEFAULT_MEMORY_RESERVE_GIB):
        if max_cache_len < 2:
            raise ValueError("max_cache_len must be at least 2")
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.model = model
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.slots = int(slots)
        self.kv_chunk = int(kv_chunk)
        if self.kv_chunk > 0 and max_cache_len > self.kv_chunk:
            max_cache_len = -(-max_cache_len // self.kv_chunk) * self.kv_chunk
        self.max_cache_len = int(max_cache_len)
        self.batch_buckets = tuple(sorted(set(batch_sizes))) if batch_sizes else batch_buckets(self.slots)
        if self.batch_buckets[-1] < self.slots or self.batch_buckets[0] < 1:
            raise ValueError(f"batch_sizes {self.batch_buckets} must be positive and reach slots ({self.slots})")
        self.kv_buckets = kv_buckets(self.max_cache_len, self.kv_chunk)

        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # one spare chunk of positions past the last bucket, never read: a view of a row that
        # spanned the whole tensor would be contiguous, the others not, and dynamo would compile
        # the last KV bucket apart
        shape = (self.slots, config.num_key_value_heads, self.max_cache_len + max(1, self.kv_chunk), head_dim)
        self.bytes_per_slot = 2 * config.num_hidden_layers * shape[1] * shape[2] * shape[3] * self.dtype.itemsize
        if self.device.type == "cuda":
            self._check_memory(memory_reserve_gib)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        for tensor in self.keys + self.values:  # fixed addresses: CUDA graphs may mutate them in place
            torch._dynamo.mark_static_address(tensor)
        self._span = torch.arange(self.max_cache_len, device=self.device)
        self.lengths: list[int] = []  # tokens held by each row of the batch (host side)

        # once, at construction: see "How it is reached" in the module docstring
        config._attn_implementation = {"": register_decode_attention(config._attn_implementation)}
        # the LLM's name for its KV cache argument: `past_key_values` up to transformers 5.23, `cache` after
        llm_forward = inspect.signature(type(model.model).forward).parameters
        self._cache_arg = "cache" if "cache" in llm_forward else "past_key_values"
        if score_precision is None:
            score_precision = "fp32_out" if fp32_out_supported(self.device, self.dtype) else "native"
        if score_precision not in SCORE_PRECISIONS:
            raise ValueError(f"unknown score_precision {score_precision!r}")
        self.score_precision = score_precision

        self.compiled = bool(compile)
        if backend is None:
            backend = "inductor" if self.device.type == "cuda" else "eager"
        if mode is None and backend == "inductor" and self.device.type == "cuda":
            mode = "reduce-overhead"
        self.backend, self.mode = (backend, mode) if compile else (None, None)
        self._cudagraphs = bool(compile) and self.device.type == "cuda" and mode == "reduce-overhead"
        # dynamic=None: only the dimension marked dynamic (the KV length) is; the batch stays static
        self._compile_options = {"backend": backend, "fullgraph": True, "dynamic": None}
        if mode is not None:
            self._compile_options["mode"] = mode
        self._step = self._compile() if compile else self._decode_step

        self._worker = _Worker("dots-ocr-fast-decode")
        self.warmed_up = False
        self.warmup_seconds: float | None = None
        self.steps = 0

    def _check_memory(self, reserve_gib: float) -> None:
        free, _total = torch.cuda.mem_get_info(self.device)
        reserve = int(reserve_gib * 2**30)
        fit = slots_that_fit(self.bytes_per_slot, free, reserve)
        if fit < self.slots:
            raise RuntimeError(
                f"the fast path's KV cache does not fit: {self.slots} slots of {self.max_cache_len} tokens need "
                f"{self.slots * self.bytes_per_slot / 2**30:.1f} GiB ({self.bytes_per_slot / 2**30:.2f} GiB a slot), "
                f"but {free / 2**30:.1f} GiB of GPU memory is free and {reserve_gib:.1f} GiB must stay free for "
                f"activations: {fit} slot{'s' if fit != 1 else ''} would fit. Lower --max-batch-size to {fit} "
                f"(or --max-new-tokens-limit).")

    def _compile(self):
        return torch.compile(self._decode_step, **self._compile_options)

    # -- the (compiled) step ------------------------------------------------------------------

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1] long, positions [B] long (row i = slot i), mask [B, C, chunk] bool (the KV
        bucket as C chunks; True where row i attends) -> next-token logits [B, vocab] float32.

        The mask comes in chunks so that the KV length is C * chunk with C the dynamic size: the
        decode attention's split into chunks is then exact for dynamo (a length that is only
        known to divide by the chunk would make it specialise on every length)."""
        mask = mask.flatten(1)  # [B, K]
        cache = _StepCache(self.keys, self.values, positions, mask.shape[1])
        out = self.model.model(input_ids=tokens, position_ids=positions.unsqueeze(1),
                               attention_mask={"full_attention": mask[:, None, None, :]}, use_cache=True,
                               static_decode=True, kv_chunk=self.kv_chunk, score_precision=self.score_precision,
                               **{self._cache_arg: cache})
        logits = self.model.lm_head(out.last_hidden_state)  # [B, 1, vocab], as in the model's forward
        return logits[:, -1, :].float()

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One step over ``tokens.shape[0]`` rows (a batch bucket) attending ``kv_len`` positions."""
        chunk = self.kv_chunk if self.kv_chunk and kv_len % self.kv_chunk == 0 else kv_len
        mask = (self._span[:kv_len].unsqueeze(0) <= positions.unsqueeze(1)).view(-1, kv_len // chunk, chunk)
        if self.compiled:  # the chunk count is dynamic, the batch bucket static (one graph per bucket)
            torch._dynamo.maybe_mark_dynamic(mask, 1)
            for tensor in (tokens, positions, mask):
                torch._dynamo.mark_static(tensor, 0)
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._step(tokens, positions, mask)
        return logits.clone() if self._cudagraphs else logits  # a CUDA-graph output is overwritten next step

    # -- the backend interface (on the loop's thread) -----------------------------------------------

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        """Prompt + new tokens one request may reach (the engine checks it at admission)."""
        return self.max_cache_len

    def run_loop(self, fn: Callable[[], None]) -> _Job:
        """Run the engine's loop on the persistent thread (see the module docstring)."""
        return self._worker.submit(fn)

    def prefill(self, inputs: dict[str, torch.Tensor], timings: dict[str, float]):
        """One request's vision tower + prefill (batch 1, eager); (handle for ``add``, logits [1, V])."""
        from transformers import DynamicCache

        length = int(inputs["input_ids"].shape[1])
        if length >= self.max_cache_len:
            raise ValueError(f"a prompt of {length} tokens does not fit the fast path's cache "
                             f"({self.max_cache_len} tokens)")
        cache = DynamicCache(config=self.model.config)
        logits = run_prefill(self.model, inputs, cache, timings)
        return (cache, length), logits

    def add(self, handle) -> None:
        """The prefilled request takes the next free slot: the batch's new last row."""
        cache, length = handle
        row = self.rows
        if row >= self.slots:
            raise RuntimeError(f"all {self.slots} slots of the fast path are taken")
        for layer, keys, values in zip(cache.layers, self.keys, self.values):
            keys[row, :, :length].copy_(layer.keys[0])
            values[row, :, :length].copy_(layer.values[0])
        self.lengths.append(length)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [b, 1] long, positions [b] long (each row's own) -> logits [b, V] float32."""
        rows = tokens.shape[0]
        if rows != self.rows:
            raise RuntimeError(f"a step of {rows} rows on a batch of {self.rows}")
        needed = max(self.lengths) + 1
        if needed > self.max_cache_len:
            raise RuntimeError(f"a row would pass the end of the static cache ({self.max_cache_len} tokens)")
        bucket = next(b for b in self.batch_buckets if b >= rows)
        kv_len = next(k for k in self.kv_buckets if k >= needed)
        if bucket > rows:  # pad rows: free slots, position 0 (see the module docstring)
            tokens = torch.cat([tokens, tokens.new_zeros(bucket - rows, 1)])
            positions = torch.cat([positions, positions.new_zeros(bucket - rows)])
        logits = self._forward(tokens, positions, kv_len)
        self.lengths = [n + 1 for n in self.lengths]
        self.steps += 1
        return logits[:rows]

    def remove(self, rows: list[int]) -> list[int]:
        """Free these rows' slots; the last rows move into the holes. Returns the old indices of
        the remaining rows, in their new order."""
        leaving = set(rows)
        count = self.rows - len(leaving)
        order = list(range(self.rows))
        holes = sorted(i for i in leaving if i < count)
        movers = [i for i in range(count, self.rows) if i not in leaving]
        for hole, mover in zip(holes, movers):
            filled = self.lengths[mover]
            for keys, values in zip(self.keys, self.values):
                keys[hole, :, :filled].copy_(keys[mover, :, :filled])
                values[hole, :, :filled].copy_(values[mover, :, :filled])
            order[hole] = mover
            self.lengths[hole] = filled
        self.lengths = self.lengths[:count]
        return order[:count]

    def reset(self) -> None:
        """Every slot free (the tensors stay; what they hold is overwritten before it is read)."""
        self.lengths = []

    # -- start-up ----------------------------------------------------------------------------

    def warmup(self, grids: Sequence[tuple[int, int]] = ((4, 4),), new_tokens: int = 3,
               text_tokens: int = 12) -> float:
        """On the persistent thread: one dummy request per image grid (vision tower, prefill, a few
        steps) and, when compiled, every (batch bucket, KV bucket) pair, so that no request pays
        for a compile or a CUDA-graph recording. Returns seconds."""
        start = time.perf_counter()
        try:
            self._worker.run(lambda: self._warmup_runs(grids, new_tokens, text_tokens))
        except Exception:
            if not (self.compiled and self.score_precision == "fp32_out"):
                raise
            log.exception("compiling the decode step with float32-output matmuls failed; retrying with native ones")
            self.score_precision = "native"
            torch._dynamo.reset()
            self._step = self._compile()
            self._worker.run(lambda: self._warmup_runs(grids, new_tokens, text_tokens))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmed_up = True
        self.warmup_seconds = time.perf_counter() - start
        return self.warmup_seconds

    def _warmup_runs(self, grids, new_tokens: int, text_tokens: int) -> None:
        self.reset()
        try:
            with torch.inference_mode():
                for grid in grids:
                    ids, pixels, thw = self.dummy_inputs(grid, text_tokens)
                    handle, _ = self.prefill({"input_ids": ids, "pixel_values": pixels, "image_grid_thw": thw}, {})
                    self.add(handle)
                    token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
                    for _ in range(new_tokens):
                        self.step(token, torch.tensor([self.lengths[0]], device=self.device))
                    self.remove([0])
                if self.compiled:  # each pair: a warm-up run, a recording, a replay (CUDA graphs)
                    for bucket in self.batch_buckets:
                        tokens = torch.zeros(bucket, 1, dtype=torch.long, device=self.device)
                        for kv_len in self.kv_buckets:
                            positions = torch.zeros(bucket, dtype=torch.long, device=self.device)
                            positions[0] = kv_len - 1
                            for _ in range(3):
                                self._forward(tokens, positions, kv_len)
        finally:
            self.reset()

    def dummy_inputs(self, grid: tuple[int, int], text_tokens: int = 12):
        """(input_ids [1, L], pixel_values [h*w, C*T*p*p], image_grid_thw [[1, h, w]]) for a
        random image of ``grid`` = (h, w) patches, on the model's device."""
        vision = self.model.config.vision_config
        h, w = grid
        merge = vision.spatial_merge_size
        if h % merge or w % merge:
            raise ValueError(f"grid sides must be multiples of {merge}")
        image_tokens = (h // merge) * (w // merge)
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
        special = {int(e) for e in eos} | {int(self.model.config.image_token_id),
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
