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



class SoftForced(ForcedTokens):
    """Greedy emits ``ids[step]`` (the last one from then on) with a probability that changes
    from step to step (a margin of 2..6 over a flat rest), so that the confidences of the cells
    of a layout answer differ from 1 and from each other."""

    def __init__(self, model, ids):
        super().__init__(model, lambda step: ids[min(step, len(ids) - 1)])

    def __call__(self, module, inputs, output):
        forced = torch.zeros_like(output)
        forced[:, -1, self.next_token(self.step)] = 2.0 + self.step % 5
        self.step += 1
        return forced


def plain_token_ids(runner, count):
    """Ordinary (non-special) token ids of the tiny vocabulary; the first one is a space, so that
    the streamer (which emits text at word boundaries) has something to emit."""
    tokenizer = runner.processor.tokenizer
    special = set(tokenizer.all_special_ids) | set(runner.generator.eos_ids)
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


class ScriptedHandle:
    """A stand-in for a generation handle (model_runner.generation.GenerationHandle) that "says"
    ``answer``, seven characters a piece and no token records, after the runner's real input
    preparation (so the page geometry, the prompt checks and the statistics are real)."""

    def __init__(self, runner, request, stats, answer: str):
        from model_runner.generation import GenerationStats

        self.request = request
        self.stats = stats if stats is not None else GenerationStats()
        self.inputs = runner.generator.prepare(request.prompt)
        self.stats.original_size, self.stats.model_size = self.inputs.original_size, self.inputs.model_size
        self.stats.prompt_tokens = self.inputs.prompt_tokens
        self.stats.finish_reason = "eos"
        self._answer = answer

    def pieces(self):
        from model_runner.decoding import Piece

        return (Piece(self._answer[i:i + 7]) for i in range(0, len(self._answer), 7))

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


def script_answer(runner, monkeypatch, answer: str) -> None:
    """Make ``runner`` answer every request with ``answer`` (``ScriptedHandle``)."""
    monkeypatch.setattr(runner, "start", lambda request, stats=None: ScriptedHandle(runner, request, stats, answer))


class StartSpy:
    """Records the ``GenerationRequest`` of every ``runner.start`` (``requests``); ``change`` holds
    fields to replace in each before it runs (e.g. ``{"max_new_tokens": 2}`` to keep a test short)."""

    def __init__(self, runner, monkeypatch):
        self.requests: list = []
        self.change: dict = {}
        original = runner.start

        def start(request, stats=None):
            import dataclasses

            self.requests.append(request)
            if self.change:
                request = dataclasses.replace(request, **self.change)
            return original(request, stats)

        monkeypatch.setattr(runner, "start", start)

    @property
    def last(self):
        return self.requests[-1]
