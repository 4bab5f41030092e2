"""The repetition guard: the stop check that ends a looping answer (the same table row, the same
line, over and over), which the released model writes on some pages."""
from __future__ import annotations

import torch
from transformers import StoppingCriteria

__all__ = ["RepetitionGuard"]


class RepetitionGuard(StoppingCriteria):
    """Stops a generation that loops: the last ``window`` tokens are an exact repetition with some
    period ``p <= max_period`` (so the span repeats at least ``window / max_period`` times).

    Real tables with many empty cells repeat ``<td></td>`` for a while, so the window is long
    (hundreds of tokens) and the repetition must be exact. Kept incremental: for every period p a
    counter of consecutive tokens equal to the token p positions earlier, updated with one
    vectorised comparison per step, so the cost per token does not grow with the window. A
    transformers ``StoppingCriteria`` (``model.generate(stopping_criteria=[guard])`` works too);
    the decoding loop calls it with one row's ids after each of its tokens.
    """

    def __init__(self, window: int = 512, max_period: int = 128):
        if window <= 0:
            raise ValueError("window must be positive (disable the guard instead)")
        self.window = window
        self.max_period = max(1, min(max_period, window // 2))
        self._runs: torch.Tensor | None = None  # [batch, max_period] int32
        self._needed: torch.Tensor | None = None  # [max_period]: window - p

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
        return (self._runs >= self._needed).any(dim=-1)
