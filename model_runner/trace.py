"""Looking inside one answer: tokens, logprobs, and where each generated token looked on the page.

``trace_answer(model, processor, inputs, ...)`` runs an answer (its token ids, or its text) once
more as a single teacher-forced forward pass (prompt + answer tokens, no KV cache) with forward
hooks on the selected decoder layers. ``ModelRunner.trace(image, prompt_type, ...)`` prepares the
page, generates the answer through the decoding engine when none is given (like any request), and
calls it. For those layers it captures what the attention module computed
(``q_proj`` / ``k_proj`` outputs and the rotary ``position_embeddings`` the layer received),
applies RoPE with transformers' own ``apply_rotary_pos_emb`` and computes the softmax
probabilities itself, chunk by chunk, keeping only the image-token part of each row.

Why not ``output_attentions=True``: that needs the eager attention implementation for the whole
model (an L x L matrix for every layer and head, at 5,000+ image tokens), while the server runs
SDPA or flash attention. The hooks only read tensors, so the same code works whatever attention
kernel runs the forward pass, and the model itself is never switched.

A forward pass over "prompt + answer" gives exactly the queries and keys that decoding saw (causal
attention, same positions), so the maps are those of generation, computed in one batch.

Shapes (one page, batch 1):
    L     prompt + answer tokens;  P = prompt tokens;  n answer tokens; S tokens in the span
    Hq    query heads (12 in the release);  Hkv key/value heads (2);  D head dim (128)
    rows, cols   the LLM image-token grid = patch grid / merge size (one token per 28 x 28 px)
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

# The attention math must match the model's: use the library's own RoPE function.
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from .decoding import GenerationInputError
from .processing import PageInputs

QUERY_CHUNK = 256  # queries per softmax chunk: scores are [Hq, 256, L] float32 at a time
LOGIT_CHUNK = 256  # answer positions per lm_head chunk (the vocabulary is 151,936 wide)


@dataclass(frozen=True)
class ImageGrid:
    """Where the image tokens are, in the sequence and on the page.

    ``t, h, w``: the vision grid in 14-px patches (``image_grid_thw``); ``merge_size`` (2): each LLM
    image token is one ``merge x merge`` block of patches, so the LLM sees ``rows x cols`` tokens,
    row-major, starting at sequence position ``first_position``.
    """

    t: int
    h: int
    w: int
    merge_size: int
    patch_size: int
    first_position: int
    model_size: tuple[int, int]  # (width, height) of the resized model input, = (w, h) * patch_size
    original_size: tuple[int, int]  # (width, height) of the image given

    @property
    def rows(self) -> int:
        return self.h // self.merge_size

    @property
    def cols(self) -> int:
        return self.w // self.merge_size

    @property
    def num_tokens(self) -> int:
        return self.t * self.rows * self.cols

    @property
    def cell_pixels(self) -> int:
        """Side of one image token's cell in model-input pixels (28)."""
        return self.patch_size * self.merge_size

    @property
    def positions(self) -> range:
        """Sequence positions of the image tokens."""
        return range(self.first_position, self.first_position + self.num_tokens)

    def token_cell(self, index: int) -> tuple[int, int]:
        """(row, col) of the ``index``-th image token (0-based, within the image)."""
        if not 0 <= index < self.num_tokens:
            raise IndexError(f"image token {index} outside 0..{self.num_tokens - 1}")
        return divmod(index % (self.rows * self.cols), self.cols)

    def cell_box(self, row: int, col: int, *, original: bool = False) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) of a cell in model-input pixels, or in original-image pixels."""
        side = self.cell_pixels
        box = (col * side, row * side, (col + 1) * side, (row + 1) * side)
        if not original:
            return box
        sx = self.original_size[0] / self.model_size[0]
        sy = self.original_size[1] / self.model_size[1]
        return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)

    def to_dict(self) -> dict:
        return {"t": self.t, "h": self.h, "w": self.w, "merge_size": self.merge_size,
                "patch_size": self.patch_size, "rows": self.rows, "cols": self.cols,
                "cell_pixels": self.cell_pixels, "model_size": list(self.model_size),
                "original_size": list(self.original_size)}


@dataclass
class TraceResult:
    """What ``trace`` found. Token-indexed lists cover the whole answer; maps cover ``span``."""

    prompt_type: str
    text: str  # the answer
    token_ids: list[int]
    tokens: list[str]  # each token's piece of ``text`` ('' for a token that only starts a character)
    offsets: list[tuple[int, int]]  # [start, end) of each token in ``text``
    logprobs: list[float]  # log p(token | everything before it), from the same forward pass
    grid: ImageGrid
    span: tuple[int, int]  # [start, end) answer tokens the maps cover
    layers: tuple[int, ...]
    heads: tuple[int, ...]  # query heads kept (all, unless asked); averaged when ``heads_averaged``
    heads_averaged: bool
    # layer -> [S, H', rows, cols]: probability mass each span token puts on each image token
    # (H' = len(heads), or 1 when heads_averaged; S = 1 when span_averaged)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    # layer -> [S, H']: probability mass on every other key (the prompt's text tokens, earlier
    # answer tokens, itself); attention.sum((-2, -1)) + other_mass == 1
    other_mass: dict[int, torch.Tensor] = field(default_factory=dict)
    # True: the maps were averaged over the span's tokens while tracing (one row per layer)
    span_averaged: bool = False
    # vision tower outputs, index 0 = patch embeddings, j + 1 = block j: [t, h, w, E] on the patch grid
    vision_blocks: dict[int, torch.Tensor] | None = None

    def heatmap(self, layers: Sequence[int] | None = None, tokens: Sequence[int] | None = None) -> torch.Tensor:
        """[rows, cols]: the attention to the image averaged over ``layers`` (default: all traced),
        the kept heads, and ``tokens`` (answer-token indices inside ``span``; default: the span)."""
        layers = list(self.layers if layers is None else layers)
        missing = [layer for layer in layers if layer not in self.attention]
        if missing or not layers:
            raise ValueError(f"layers {missing or layers} were not traced (traced: {list(self.layers)})")
        start, end = self.span
        if self.span_averaged:
            if tokens is not None:
                raise ValueError("the maps were averaged over the span while tracing: no per-token rows")
            return torch.stack([self.attention[layer] for layer in layers]).mean(dim=(0, 1, 2))
        picked = list(range(start, end)) if tokens is None else list(tokens)
        if not picked or any(not start <= i < end for i in picked):
            raise ValueError(f"tokens must lie inside the traced span [{start}, {end})")
        rows = torch.tensor([i - start for i in picked])
        stacked = torch.stack([self.attention[layer][rows] for layer in layers])  # [layers, S', H', rows, cols]
        return stacked.mean(dim=(0, 1, 2))


# ---------------------------------------------------------------------------------------------
# The answer's tokens
# ---------------------------------------------------------------------------------------------


def token_offsets(tokenizer, token_ids: Sequence[int]) -> tuple[str, list[str], list[tuple[int, int]]]:
    """Decode ``token_ids`` incrementally: (text, piece per token, [start, end) per token).

    tokenizers' ``DecodeStream`` yields each new piece of text as soon as it is complete (a token
    that ends inside a multi-byte character yields nothing; the next one yields the character), so
    this is one pass, not one full decode per prefix. A token that yields nothing shares the span
    of the token that completes its character.
    """
    from tokenizers.decoders import DecodeStream

    backend = tokenizer.backend_tokenizer
    stream = DecodeStream(skip_special_tokens=True)
    text, pieces, offsets, pending = "", [], [], []
    for index, token_id in enumerate(token_ids):
        piece = stream.step(backend, int(token_id)) or ""
        pieces.append(piece)
        offsets.append((len(text), len(text) + len(piece)))
        if not piece:
            pending.append(index)
            continue
        for waiting in pending:  # tokens that started this character
            offsets[waiting] = offsets[index]
        pending = []
        text += piece
    return text, pieces, offsets


def tokenize_answer(tokenizer, text: str) -> tuple[list[int], list[str], list[tuple[int, int]]]:
    """Token ids of an answer given as text, with each token's character span in that text."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    return ids, [text[a:b] for a, b in offsets], offsets


def chars_to_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """The smallest token span [first, last + 1) that covers the characters [start, end)."""
    if not 0 <= start < end:
        raise GenerationInputError(f"character span [{start}, {end}) is empty or negative")
    hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    if not hits:
        raise GenerationInputError(f"character span [{start}, {end}) lies outside the answer "
                                   f"({offsets[-1][1] if offsets else 0} characters)")
    return hits[0], hits[-1] + 1


class TraceStopped(RuntimeError):
    """The generation of the answer to trace was stopped (a client gone, a shutdown): nothing traced."""


# ---------------------------------------------------------------------------------------------
# Attention from captured queries and keys
# ---------------------------------------------------------------------------------------------


def attention_rows(query: torch.Tensor, key: torch.Tensor, query_positions: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """Causal softmax rows, float32: query [Hq, S, D], key [Hkv, L, D] (RoPE applied),
    query_positions [S] (absolute) -> probabilities [Hq, S, L] (each row sums to 1 over the keys
    at or before its position).

    GQA: query head h reads key head h // (Hq / Hkv), as transformers' ``repeat_kv`` does.
    """
    groups = query.shape[0] // key.shape[0]
    key = key.float().repeat_interleave(groups, dim=0)  # [Hq, L, D]
    scores = torch.matmul(query.float(), key.transpose(1, 2)) * scaling  # [Hq, S, L]
    key_positions = torch.arange(key.shape[1], device=key.device)
    future = key_positions[None, :] > query_positions.to(key.device)[:, None]  # [S, L]
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1)


class _LayerCapture:
    """Hooks on one decoder layer's attention: keep q_proj / k_proj outputs, and when the module
    finishes, turn them into attention-to-image maps for the span's queries (then drop them).

    The hooks act only on the tracing thread: a server may run other requests' decode steps
    through the same modules meanwhile (``--max-batch-size`` > 1), and those must neither be
    captured nor disturbed."""

    def __init__(self, attn, query_positions: torch.Tensor, image: range, heads: list[int], average: bool,
                 average_span: bool = False):
        self.attn = attn
        self.query_positions = query_positions
        self.image = image
        self.heads = heads
        self.average = average
        self.average_span = average_span
        self.thread = threading.get_ident()
        self.q = self.k = None
        self.maps: torch.Tensor | None = None  # [S, H', n_image]
        self.other: torch.Tensor | None = None  # [S, H']
        self.handles = [
            attn.q_proj.register_forward_hook(self._keep("q")),
            attn.k_proj.register_forward_hook(self._keep("k")),
            attn.register_forward_hook(self._finish, with_kwargs=True),
        ]

    def _keep(self, name: str):
        def hook(module, args, output):
            if threading.get_ident() == self.thread:
                setattr(self, name, output)
        return hook

    def _finish(self, module, args, kwargs, output) -> None:
        if threading.get_ident() != self.thread:
            return
        if getattr(module, "sliding_window", None):
            raise NotImplementedError("attention maps for sliding-window layers are not supported")
        cos, sin = kwargs["position_embeddings"]  # [1, L, D] each, in the model's dtype
        head_dim = module.head_dim
        # [1, L, H*D] -> [1, H, L, D], exactly as Qwen2Attention.forward
        q = self.q.view(*self.q.shape[:-1], -1, head_dim).transpose(1, 2)
        k = self.k.view(*self.k.shape[:-1], -1, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        self.q = self.k = None
        q = q[0, self.heads][:, self.query_positions]  # [H', S, D]
        groups = module.num_key_value_groups
        k = k[0, [h // groups for h in self.heads]]  # [H', L, D]: each kept head's own key head
        maps, other = [], []
        for chunk in torch.split(torch.arange(len(self.query_positions)), QUERY_CHUNK):
            probs = attention_rows(q[:, chunk], k, self.query_positions[chunk], module.scaling)  # [H', s, L]
            image = probs[..., self.image.start:self.image.stop]  # [H', s, n_image]
            rest = probs[..., :self.image.start].sum(-1) + probs[..., self.image.stop:].sum(-1)  # [H', s]
            if self.average:
                image, rest = image.mean(0, keepdim=True), rest.mean(0, keepdim=True)
            if self.average_span:  # keep sums over the chunk's tokens: [H', 1, ...]
                image, rest = image.sum(1, keepdim=True), rest.sum(1, keepdim=True)
            maps.append(image.transpose(0, 1).cpu())  # [s, H', n_image]
            other.append(rest.transpose(0, 1).cpu())
        self.maps, self.other = torch.cat(maps), torch.cat(other)
        if self.average_span:  # chunk sums -> the mean over the span: [1, H', n_image]
            count = len(self.query_positions)
            self.maps = self.maps.sum(0, keepdim=True) / count
            self.other = self.other.sum(0, keepdim=True) / count

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _OutputCapture:
    """Keep a module's output (optionally a slice of its rows) on the CPU; like ``_LayerCapture``,
    only for calls on the tracing thread."""

    def __init__(self, module, rows: slice | None = None, to_cpu: bool = True):
        self.value = None
        self.thread = threading.get_ident()
        self.handle = module.register_forward_hook(self._hook)
        self.rows, self.to_cpu = rows, to_cpu

    def _hook(self, module, args, output):
        if threading.get_ident() != self.thread:
            return
        value = output[0] if isinstance(output, tuple) else output
        value = value if self.rows is None else value[:, self.rows]
        self.value = value.detach().cpu() if self.to_cpu else value.detach()

    def remove(self) -> None:
        self.handle.remove()


def patches_to_grid(hidden: torch.Tensor, tower, grid_thw: torch.Tensor) -> torch.Tensor:
    """Vision tower rows [P, E] (processor order: 2x2 blocks) -> [t, h, w, E] on the patch grid."""
    (t, h, w), = grid_thw.tolist()
    row_col = tower.patch_row_col_ids(grid_thw.cpu())  # [P, 2]
    out = hidden.new_empty(t, h, w, hidden.shape[-1])
    frames = torch.arange(t).repeat_interleave(h * w)
    out[frames, row_col[:, 0], row_col[:, 1]] = hidden
    return out


# ---------------------------------------------------------------------------------------------
# trace
# ---------------------------------------------------------------------------------------------


def _resolve_indices(values: Sequence[int] | None, count: int, what: str) -> list[int]:
    if values is None:
        return list(range(count))
    resolved = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not -count <= value < count:
            raise GenerationInputError(f"{what} must be integers in [{-count}, {count}), got {value!r}")
        resolved.append(value % count)
    if not resolved:
        raise GenerationInputError(f"{what} must not be empty")
    return sorted(set(resolved))


def _resolve_span(span, char_span, offsets, count: int) -> tuple[int, int]:
    if span is not None and char_span is not None:
        raise GenerationInputError("give span (tokens) or char_span (characters), not both")
    if char_span is not None:
        return chars_to_tokens(offsets, int(char_span[0]), int(char_span[1]))
    if span is None:
        return 0, count
    start, end = int(span[0]), int(span[1])
    if not 0 <= start < end <= count:
        raise GenerationInputError(f"span [{start}, {end}) must satisfy 0 <= start < end <= {count} "
                                   f"(the answer has {count} tokens)")
    return start, end


def _image_grid(processor, page: PageInputs) -> ImageGrid:
    inputs = page.tensors
    (t, h, w), = inputs["image_grid_thw"].tolist()
    positions = (inputs["input_ids"][0] == processor.image_token_id).nonzero().flatten()
    merge = processor.merge_size
    grid = ImageGrid(t=t, h=h, w=w, merge_size=merge, patch_size=int(processor.image_processor.patch_size),
                     first_position=int(positions[0]), model_size=tuple(page.model_size),
                     original_size=tuple(page.original_size))
    # the <|imgpad|> tokens are one contiguous run, one per merged block
    if len(positions) != grid.num_tokens or int(positions[-1]) != grid.positions[-1] or t != 1:
        raise RuntimeError(f"unexpected image token layout: {len(positions)} pads for grid {(t, h, w)}")
    return grid


def trace_answer(model, processor, page: PageInputs, prompt_type: str, *, token_ids: Sequence[int] | None = None,
                 text: str | None = None, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                 average_heads: bool = False, span: tuple[int, int] | None = None,
                 char_span: tuple[int, int] | None = None, average_span: bool = False,
                 vision_blocks: bool | Sequence[int] = False) -> TraceResult:
    """Trace one answer to ``page`` (its prepared inputs, ``prompt_type``'s prompt): given as the
    ``token_ids`` the model generated, or as ``text`` (e.g. what ``/ocr`` returned; it is tokenized).

    Maps are computed for the answer tokens in ``span`` ([start, end) token indices) or
    ``char_span`` ([start, end) characters of the answer), default all, for ``layers`` (default
    all; negative indices count from the end) and query ``heads`` (default all; ``average_heads``
    keeps only their mean). ``average_span`` keeps only the mean over the span's tokens (one row per
    layer: memory no longer grows with the span). ``vision_blocks``: True for every vision block's
    output, or a list of indices (0 = patch embeddings, j + 1 = block j).

    Memory: each traced layer keeps S x H' x rows x cols float32 on the CPU (a letter page has
    about 5,000 image tokens: 12 heads x 256 tokens is 60 MB per layer).
    """
    if (token_ids is None) == (text is None):
        raise GenerationInputError("give the answer as token ids or as text (one of the two)")
    tokenizer = processor.tokenizer
    device = model.lm_head.weight.device
    inputs = {k: v.to(device) for k, v in page.tensors.items() if k in ("input_ids", "pixel_values", "image_grid_thw")}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.lm_head.weight.dtype)
    grid = _image_grid(processor, page)

    if text is None:
        answer, pieces, offsets = token_offsets(tokenizer, list(token_ids))
        token_ids = list(token_ids)
    else:
        answer = text
        token_ids, pieces, offsets = tokenize_answer(tokenizer, text)
    if not token_ids:
        raise GenerationInputError("the answer is empty: nothing to trace")
    start, end = _resolve_span(span, char_span, offsets, len(token_ids))

    config = model.config
    layer_ids = _resolve_indices(layers, config.num_hidden_layers, "layers")
    head_ids = _resolve_indices(heads, config.num_attention_heads, "heads")
    prompt_len = int(inputs["input_ids"].shape[1])
    answer_ids = torch.tensor([token_ids], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], answer_ids], dim=1)  # [1, L]
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    query_positions = torch.arange(prompt_len + start, prompt_len + end, device=answer_ids.device)  # [S]

    captures = {layer: _LayerCapture(model.model.layers[layer].self_attn, query_positions, grid.positions,
                                     head_ids, average_heads, average_span) for layer in layer_ids}
    # final hidden states at the positions that predict the answer tokens: [1, n, C]
    final = _OutputCapture(model.model.norm, slice(prompt_len - 1, prompt_len - 1 + len(token_ids)), to_cpu=False)
    vision = _vision_captures(model.vision_tower, vision_blocks)
    try:
        with torch.inference_mode():
            model(**full, use_cache=False, logits_to_keep=1)
            logprobs = _answer_logprobs(model, final.value[0], answer_ids[0])
    finally:
        for capture in [*captures.values(), final, *vision.values()]:
            capture.remove()

    attention, other = {}, {}
    for layer, capture in captures.items():
        s, kept = capture.maps.shape[:2]
        attention[layer] = capture.maps.view(s, kept, grid.rows, grid.cols)
        other[layer] = capture.other
    blocks = None
    if vision:
        blocks = {index: patches_to_grid(c.value, model.vision_tower, inputs["image_grid_thw"])
                  for index, c in vision.items()}
    return TraceResult(prompt_type=prompt_type, text=answer, token_ids=list(token_ids), tokens=pieces,
                       offsets=offsets, logprobs=logprobs, grid=grid, span=(start, end),
                       layers=tuple(layer_ids), heads=tuple(head_ids), heads_averaged=average_heads,
                       attention=attention, other_mass=other, span_averaged=average_span,
                       vision_blocks=blocks)


def _vision_captures(tower, vision_blocks) -> dict[int, _OutputCapture]:
    if vision_blocks is False or vision_blocks is None:
        return {}
    modules = [tower.patch_embed, *tower.blocks]  # index 0 = patch embeddings, j + 1 = block j
    indices = _resolve_indices(None if vision_blocks is True else list(vision_blocks), len(modules),
                               "vision_blocks")
    return {index: _OutputCapture(modules[index]) for index in indices}


def _answer_logprobs(model, hidden: torch.Tensor, answer_ids: torch.Tensor) -> list[float]:
    """log p(answer token i | prefix) from the final hidden states [n, C], in chunks of positions."""
    out = []
    for rows in torch.split(torch.arange(hidden.shape[0], device=hidden.device), LOGIT_CHUNK):
        logits = model.lm_head(hidden[rows]).float()  # [chunk, vocab]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, answer_ids[rows, None])[:, 0]
        out.extend(logp.tolist())
    return out

