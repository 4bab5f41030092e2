"""Make the tiny model say what a test needs: a forward hook on ``lm_head`` that turns greedy
decoding into a chosen token sequence (loops, eos at a given step, long non-periodic text)."""
from __future__ import annotations

import torch


class ForcedTokens:
    """A forward hook on lm_head that makes greedy decoding emit ``next_token(step)``."""

    def __init__(self, model, next_token):
        self.model = model
        self.next_token = next_token
        self.step = 0

    def __call__(self, module, inputs, output):
        forced = torch.full_like(output, -1e4)
        forced[:, -1, self.next_token(self.step)] = 1e4
        self.step += 1
        return forced

    def __enter__(self):
        self.handle = self.model.lm_head.register_forward_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def plain_token_ids(runner, count):
    """Ordinary (non-special) token ids of the tiny vocabulary; the first one is a space, so that
    the streamer (which emits text at word boundaries) has something to emit."""
    tokenizer = runner.processor.tokenizer
    special = set(tokenizer.all_special_ids) | set(runner._eos_ids())
    space = tokenizer.convert_tokens_to_ids("\u0120")  # byte-level BPE's space
    others = [i for i in range(40, 40 + count + len(special)) if i not in special and i != space]
    return [space] + others[:count - 1]


def aperiodic(ids):
    """A token sequence with no period under 350 steps (the repetition guard looks for periods
    of at most 128)."""
    return lambda step: ids[(step * step + step // 7) % len(ids)]


class FailsAtStep:
    """A forward hook on lm_head that raises ``RuntimeError(message)`` on its ``step``-th call
    (1 = the prefill), to test how an error inside generation travels."""

    def __init__(self, model, step: int, message: str):
        self.model = model
        self.step = step
        self.message = message
        self.calls = 0

    def __call__(self, module, inputs, output):
        self.calls += 1
        if self.calls == self.step:
            raise RuntimeError(self.message)

    def __enter__(self):
        self.handle = self.model.lm_head.register_forward_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
