"""Per-request token choice, the same on every decoding path (plain, batched, fast).

Each request owns a ``TokenChooser``: its sampling settings, its own ``torch.Generator`` (seeded
from the request's ``seed``, else from the OS's entropy, so that requests never share random
state and the global torch RNG is never used), and the state its penalties need. Per step, on the
request's row of next-token logits (float32):

1. log-probabilities for the answer are read from the **raw** logits (``log_softmax``, before any
   penalty or temperature), as vLLM reports them by default and as a plain forward pass gives them;
2. ``repetition_penalty`` (HF / vLLM meaning): every token id seen in the prompt or the answer has
   its logit divided by the penalty when positive, multiplied by it when negative; 1.0 is off;
3. ``frequency_penalty`` / ``presence_penalty`` (OpenAI meaning), over the generated tokens only:
   ``logit -= count * frequency_penalty + (count > 0) * presence_penalty``; 0 is off;
4. temperature 0: greedy (argmax); otherwise temperature, then top-k, then top-p (nucleus, at
   least one token), then ``torch.multinomial`` with the request's generator.

``Piece`` and ``TokenRecord`` are what a generation's pieces are made of (model_runner.generation).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from typing import Sequence

import torch

from .defaults import DEFAULT_TEMPERATURE, DEFAULT_TOP_P

MAX_LOGPROBS = 5

__all__ = ["GenerationInputError", "DecodingOptions", "TokenChooser", "TokenRecord", "Piece", "MAX_LOGPROBS",
           "apply_penalties", "sample_next_token", "choose_tokens", "answer_offsets"]


class GenerationInputError(ValueError):
    """A request the model cannot run (bad prompt type, bad bbox, impossible geometry, bad
    decoding options). The message is meant for the client."""


# ---------------------------------------------------------------------------------------------
# What the caller gets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRecord:
    """One generated token: its id, its text (the token decoded alone; a character split over
    several tokens shows as U+FFFD in each), its log-probability under the raw model
    distribution (None when the request did not ask for logprobs) and up to k alternatives
    ``(id, text, logprob)``, most likely first (the chosen token is among them when it ranks).
    ``start``, ``end``: the characters ``[start, end)`` of the answer this token completed (empty
    for a token that only began a character spelled over several tokens; see ``answer_offsets``)."""

    id: int
    text: str
    logprob: float | None = None
    top: tuple[tuple[int, str, float], ...] = ()
    start: int = 0
    end: int = 0


@dataclass(frozen=True)
class Piece:
    """A step of the answer: the text that became printable with these tokens (may be empty:
    the streamer holds back incomplete words and characters) and the tokens themselves."""

    text: str
    tokens: tuple[TokenRecord, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def answer_offsets(tokens: Sequence[TokenRecord]) -> list[tuple[int, int]]:
    """Each token's ``[start, end)`` characters in the answer: its own span, or for a token that
    only began a character, the span of the token that completed it (as decoding the ids again
    with ``model_runner.trace.token_offsets`` gives them). A token whose character never completed
    (the eos) keeps its empty span."""
    spans = [(token.start, token.end) for token in tokens]
    pending: list[int] = []
    for index, (start, end) in enumerate(spans):
        if start == end:
            pending.append(index)
            continue
        for waiting in pending:
            spans[waiting] = (start, end)
        pending = []
    return spans


@dataclass(frozen=True)
class DecodingOptions:
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0  # 0: no top-k cut (no route sets one; for callers of the runner)
    seed: int | None = None
    logprobs: int | None = None  # None: off; k in 0..5: the chosen token's logprob + k alternatives
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def validate(self) -> "DecodingOptions":
        if not (self.temperature >= 0) or not (0 < self.top_p <= 1):
            raise GenerationInputError("temperature must be >= 0 and top_p in (0, 1]")
        if self.top_k < 0:
            raise GenerationInputError("top_k must be >= 0")
        if self.seed is not None and not 0 <= int(self.seed) < 2**64:
            raise GenerationInputError("seed must be an integer in [0, 2**64)")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise GenerationInputError(f"logprobs must be between 0 and {MAX_LOGPROBS}")
        if not (self.repetition_penalty > 0):
            raise GenerationInputError("repetition_penalty must be > 0 (1.0 is off)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise GenerationInputError(f"{name} must be between -2.0 and 2.0")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


# ---------------------------------------------------------------------------------------------
# Logit processing
# ---------------------------------------------------------------------------------------------


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None,
                    repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                    presence_penalty: float = 0.0) -> torch.Tensor:
    """logits [..., V] float; seen [..., V] bool (ids in prompt or answer; for the repetition
    penalty); counts [..., V] float (occurrences in the answer; for the other two). Returns new
    logits, the input untouched."""
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if counts is not None and (frequency_penalty != 0.0 or presence_penalty != 0.0):
        logits = logits - counts * frequency_penalty - (counts > 0).to(logits.dtype) * presence_penalty
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sampled token per row of ``logits`` [B, V] (float32): temperature, then top-k, then
    nucleus (top-p; the smallest set of most likely tokens whose probability reaches top_p, at
    least one token), then ``torch.multinomial``. The same rules, in the same order, as
    transformers' warpers, without the sort when top_p is 1. Returns [B] long."""
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


class TokenChooser:
    """One request's token choice (see the module docstring). ``prompt_ids`` [L] long, on the
    logits' device. Not thread-safe: the decoding loop's thread alone calls it."""

    def __init__(self, options: DecodingOptions, vocab_size: int, device: torch.device,
                 prompt_ids: torch.Tensor | None = None):
        self.options = options
        self.seed = int(options.seed) if options.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        self.seen = self.counts = None
        if options.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids is not None:
                self.seen[prompt_ids.to(device).reshape(-1)] = True
        if options.frequency_penalty != 0.0 or options.presence_penalty != 0.0:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to adjust: rows like this are chosen together, in one argmax."""
        return self.options.greedy and not self.options.penalised

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] float32 (already masked for min_new_tokens) -> the token, [1] long, on device."""
        o = self.options
        scores = apply_penalties(logits, self.seen, self.counts, o.repetition_penalty, o.frequency_penalty,
                                 o.presence_penalty).unsqueeze(0)
        if o.greedy:
            return scores.argmax(dim=-1)
        return sample_next_token(scores, o.temperature, o.top_p, o.top_k, self.generator)

    def observe(self, token: torch.Tensor) -> None:
        """Record the token just chosen ([1] long, device) for the penalties."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


def choose_tokens(choosers: list[TokenChooser], logits: torch.Tensor, want: list[int | None]):
    """The next token of every row: logits [B, V] float32 (rows in ``choosers`` order), ``want``
    the logprobs k per row (None: off). Plain-greedy rows share one argmax; every other row is
    chosen with its own chooser (its generator, its penalties).

    Returns (tokens [B] long on device, logprob payload or None, errors). ``errors`` maps a row
    to the exception its own choice raised (that row's token is a placeholder). The payload, one
    float32 tensor on device, is [B, 1 + 2 * kmax]: per row the chosen token's raw logprob, then
    the top kmax logprobs and their ids (as floats; exact below 2**24); rows that asked for fewer
    use a prefix. Nothing is read back to the host here, so the caller syncs once per step.
    """
    greedy = logits.argmax(dim=-1)  # [B]; the answer of every plain-greedy row
    errors: dict[int, BaseException] = {}
    if all(c.plain_greedy for c in choosers):
        tokens = greedy
    else:
        picked = []
        for i, chooser in enumerate(choosers):
            token = greedy[i:i + 1]
            if not chooser.plain_greedy:
                try:
                    token = chooser.choose(logits[i])
                    chooser.observe(token)
                except Exception as exc:  # noqa: BLE001 - this row's failure alone
                    errors[i] = exc
                    token = greedy[i:i + 1]
            picked.append(token)
        tokens = torch.cat(picked)
    kmax = max((k for k in want if k is not None), default=None)
    if kmax is None:
        return tokens, None, errors
    logprobs = torch.log_softmax(logits, dim=-1)  # raw distribution (see the module docstring)
    parts = [logprobs.gather(1, tokens.unsqueeze(1))]  # [B, 1]
    if kmax > 0:
        top = torch.topk(logprobs, kmax, dim=-1)
        parts += [top.values, top.indices.to(torch.float32)]
    return tokens, torch.cat(parts, dim=1), errors


# ---------------------------------------------------------------------------------------------
# Tokens -> pieces (on the consumer's thread, off the decoding loop)
# ---------------------------------------------------------------------------------------------


class PieceAssembler:
    """Turns one request's tokens into ``Piece`` objects. The text comes from tokenizers'
    ``DecodeStream``: constant work per token (it keeps only the few tokens of a character still
    being spelled), released as soon as it is valid UTF-8. transformers' ``TextStreamer``, used
    before, decodes everything since the last newline on every token (quadratic in a long line)
    and held text back to word boundaries; with many requests decoding on a 2-core machine that
    per-token work took the GIL from the batch's decoding loop. The joined text equals
    ``tokenizer.decode(ids, skip_special_tokens=True)``: ``end()`` adds what ``DecodeStream``
    still holds (an unfinished byte sequence, which ``decode`` writes as U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._stream = None  # made at the first token
        self._ids: list[int] = []
        self._released = 0  # characters handed out so far
        self._texts: dict[int, str] = {}  # token text cache (alternatives repeat a lot)

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def record(self, token_id: int, payload: list[float] | None, k: int | None, span: tuple[int, int] = (0, 0)
               ) -> TokenRecord:
        """payload: the row of ``choose_tokens``' logprob payload (None when off); span: the
        characters of the answer the token completed."""
        if payload is None or k is None:
            return TokenRecord(token_id, self.token_text(token_id), start=span[0], end=span[1])
        kmax = (len(payload) - 1) // 2
        values, ids = payload[1:1 + kmax], payload[1 + kmax:]
        top = tuple((int(ids[j]), self.token_text(int(ids[j])), float(values[j])) for j in range(k))
        return TokenRecord(token_id, self.token_text(token_id), float(payload[0]), top, span[0], span[1])

    def add(self, token_id: int, payload: list[float] | None = None, k: int | None = None) -> Piece:
        if self._stream is None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)
        self._ids.append(token_id)
        # backend_tokenizer: the tokenizers.Tokenizer under transformers' fast tokenizer
        text = self._stream.step(self.tokenizer.backend_tokenizer, token_id) or ""
        start = self._released
        self._released += len(text)
        return Piece(text, (self.record(token_id, payload, k, (start, self._released)),))

    def end(self) -> str:
        """The text still held back (an unfinished character at the end of the answer)."""
        whole = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        text = whole[self._released:]
        self._released = len(whole)
        return text
