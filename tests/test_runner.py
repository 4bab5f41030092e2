"""ModelRunner: streaming, the non-streaming loop over it, cancellation, errors, the repetition
guard, dtypes. All on the tiny random checkpoint, CPU."""
import threading
import time

import pytest
import torch

from forcing import FailsAtStep, ForcedTokens, aperiodic, plain_token_ids
from model_runner.loading import resolve_dtype
from model_runner.runner import GenerationInputError, GenerationStats, ModelRunner, RepetitionGuard


def _generation_threads():
    return [t for t in threading.enumerate() if t.name == "dots-ocr-generate" and t.is_alive()]


def test_stream_joined_equals_generate(runner, page_image):
    stats = GenerationStats()
    pieces = list(runner.stream(page_image, "prompt_ocr", temperature=0, max_new_tokens=24, stats=stats))
    result = runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=24)
    assert "".join(pieces) == result.text
    assert result.finish_reason == stats.finish_reason
    assert stats.finish_reason in ("eos", "length")
    assert stats.new_tokens == result.stats.new_tokens > 0
    assert stats.model_size[0] % 28 == 0 and stats.model_size[1] % 28 == 0


def _held_after_first_token(ids, first_step: int):
    """A next_token for ForcedTokens whose decoding waits at ``first_step`` (the step after a run's
    first token) until ``.first_read`` is set: the reader surely takes the first token alone."""
    first_read = threading.Event()

    def next_token(step):
        if step == first_step and not first_read.wait(20):
            raise RuntimeError("the reader never took the first token")
        return ids[step % len(ids)]

    next_token.first_read = first_read
    return next_token


def test_a_wake_interval_gives_the_same_answer_in_fewer_pieces(runner, page_image):
    """``wake_interval_s``: the tokens decoded meanwhile come together, the first one at once; the
    tokens, text and statistics are those of a per-token stream."""
    ids = plain_token_ids(runner, 60)
    next_token = _held_after_first_token(ids, 61)  # steps 0-59: the first run; 60: the second's prefill
    with ForcedTokens(runner.model, next_token):
        each_stats, long_stats = GenerationStats(), GenerationStats()
        each = list(runner.stream_pieces(page_image, "prompt_ocr", temperature=0, max_new_tokens=60,
                                         stats=each_stats))
        started = time.perf_counter()
        first_at = None
        gathered = []
        for piece in runner.stream_pieces(page_image, "prompt_ocr", temperature=0, max_new_tokens=60,
                                          stats=long_stats, wake_interval_s=30.0):
            first_at = first_at or time.perf_counter() - started
            gathered.append(piece)
            next_token.first_read.set()
    total = time.perf_counter() - started
    assert total < 30  # the end of the answer wakes the reader, not the 30 s interval
    assert [t.id for p in gathered for t in p.tokens] == [t.id for p in each for t in p.tokens] == ids[:60]
    assert "".join(p.text for p in gathered) == "".join(p.text for p in each)
    # the first token at once, then the other 59 when the answer ended (and a held-back tail)
    assert len(gathered[0].tokens) == 1 and len(gathered[1].tokens) == 59 and len(gathered) <= 3
    assert long_stats.new_tokens == each_stats.new_tokens == 60 and long_stats.finish_reason == "length"
    assert 0 < long_stats.ttft_s <= first_at  # when the loop chose the token, not when the reader woke
    with pytest.raises(GenerationInputError, match="wake_interval_s"):
        next(runner.stream_pieces(page_image, "prompt_ocr", wake_interval_s=-1))


@pytest.mark.slow
def test_a_reader_behind_collects_the_rest_without_waiting(runner, page_image, monkeypatch):
    """A full piece (``MAX_TOKENS_PER_PIECE`` tokens) means more may be waiting: the next piece is
    collected at once, not after another wake interval."""
    import model_runner.generation as generation

    monkeypatch.setattr(generation, "MAX_TOKENS_PER_PIECE", 4)
    ids = plain_token_ids(runner, 30)
    release, waiting = threading.Event(), threading.Event()
    held = _held_after_first_token(ids, 1)
    interval = 1.0

    def next_token(step):
        if step == 12:  # the prefill chose token 1 (step 0): 12 tokens, then the loop waits here
            waiting.set()
            release.wait(30)
        return held(step)

    with ForcedTokens(runner.model, next_token):
        pieces = runner.stream_pieces(page_image, "prompt_ocr", temperature=0, max_new_tokens=20,
                                      wake_interval_s=interval)
        try:
            assert len(next(pieces).tokens) == 1  # the first token at once
            read_at = time.perf_counter()
            held.first_read.set()
            assert waiting.wait(30)  # 11 more tokens wait for the reader
            time.sleep(max(0.0, read_at + interval - time.perf_counter()))  # until its next collection is due
            started = time.perf_counter()
            sizes = [len(next(pieces).tokens) for _ in range(3)]
            elapsed = time.perf_counter() - started
        finally:
            release.set()
            pieces.close()
    assert sizes == [4, 4, 3]
    assert elapsed < 0.75 * interval  # back to back: no wait of an interval after a full piece


def test_greedy_is_deterministic_and_sampling_runs(runner, page_image):
    a = runner.generate(page_image, "prompt_layout_all_en", temperature=0, max_new_tokens=16).text
    b = runner.generate(page_image, "prompt_layout_all_en", temperature=0, max_new_tokens=16).text
    assert a == b
    torch.manual_seed(0)
    sampled = runner.generate(page_image, "prompt_ocr", temperature=1.0, top_p=0.9, max_new_tokens=16)
    assert sampled.finish_reason in ("eos", "length")


def test_length_finish_reason_and_token_budget(runner, page_image):
    ids = plain_token_ids(runner, 50)
    with ForcedTokens(runner.model, lambda step: ids[step % len(ids)]):
        result = runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=7)
    assert result.stats.new_tokens == 7
    assert result.finish_reason == "length"


def test_eos_finish_reason(runner, page_image):
    eos = sorted(runner.generator.eos_ids)[-1]  # <|endofassistant|> also ends generation
    ids = plain_token_ids(runner, 3)
    with ForcedTokens(runner.model, lambda step: eos if step == 3 else ids[step]):
        result = runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=50)
    assert result.finish_reason == "eos"
    assert result.stats.new_tokens == 4


def test_cancel_stops_the_thread(runner, page_image):
    ids = plain_token_ids(runner, 50)
    stats = GenerationStats()
    with ForcedTokens(runner.model, aperiodic(ids)):
        stream = runner.stream(page_image, "prompt_ocr", temperature=0, max_new_tokens=5000, stats=stats)
        next(stream)
        assert _generation_threads(), "generation should be running"
        started = time.perf_counter()
        stream.close()
        closed_in = time.perf_counter() - started
    assert not _generation_threads()
    assert stats.finish_reason == "cancelled"
    assert stats.new_tokens < 5000
    assert closed_in < 5
    # the runner is free for the next request
    assert runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=3).stats.new_tokens <= 3


def test_should_stop_cancels(runner, page_image):
    ids = plain_token_ids(runner, 50)
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 5

    with ForcedTokens(runner.model, aperiodic(ids)):
        result = runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=500,
                                 should_stop=should_stop)
    assert result.finish_reason == "cancelled"
    assert result.stats.new_tokens < 20


def test_exception_in_generation_reaches_the_caller(runner, page_image):
    with FailsAtStep(runner.model, 3, "boom inside decoding"):
        with pytest.raises(RuntimeError, match="boom inside decoding"):
            list(runner.stream(page_image, "prompt_ocr", temperature=0, max_new_tokens=50))
    assert not _generation_threads()


def test_repetition_guard_stops_a_looping_model(tiny_ckpt, page_image):
    looping = ModelRunner(tiny_ckpt, device="cpu", dtype="float32", repetition_window=60,
                          repetition_max_period=16).load()
    ids = plain_token_ids(looping, 50)
    cycle = ids[:3]
    with ForcedTokens(looping.model, lambda step: cycle[step % 3]):
        result = looping.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=400)
    assert result.finish_reason == "repetition"
    assert 60 <= result.stats.new_tokens < 80


def test_repetition_guard_leaves_a_normal_model_alone(tiny_ckpt, page_image):
    guarded = ModelRunner(tiny_ckpt, device="cpu", dtype="float32", repetition_window=60,
                          repetition_max_period=16).load()
    ids = plain_token_ids(guarded, 50)
    with ForcedTokens(guarded.model, aperiodic(ids)):
        result = guarded.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=150)
    assert result.finish_reason == "length"
    assert result.stats.new_tokens == 150


def test_repetition_guard_unit():
    guard = RepetitionGuard(window=512, max_period=128)
    # a genuine table: 100 empty cells (3 tokens each, 300 tokens) then text again -> never fires
    prompt = list(range(1000, 1200))
    table = prompt + [7, 8, 9] * 100 + list(range(300, 340))
    fired = [bool(guard(torch.tensor([table[:n]]), None)) for n in range(len(prompt) + 1, len(table) + 1)]
    assert not any(fired)
    guard = RepetitionGuard(window=512, max_period=128)
    loop = prompt + list(range(2000, 2040)) * 30  # a 40-token span repeated over and over
    fired_at = next(n for n in range(len(prompt) + 1, len(loop) + 1) if bool(guard(torch.tensor([loop[:n]]), None)))
    assert fired_at - len(prompt) == 512


def test_bf16_and_fp32_both_run(tiny_ckpt, page_image):
    bf16 = ModelRunner(tiny_ckpt, device="cpu", dtype="bfloat16").load()
    assert bf16.model.dtype == torch.bfloat16
    result = bf16.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=5)
    assert result.stats.new_tokens >= 1
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_grounding_maps_bbox_into_the_prompt(runner, page_image, rendered_prompt):
    runner.generate(page_image, "prompt_grounding_ocr", bbox=[0, 0, 220, 300], temperature=0, max_new_tokens=2)
    width, height = runner.processor.model_input_size(*page_image.size)
    assert rendered_prompt["prompt"].endswith(f"Bounding Box:\n[0, 0, {width}, {height}]")


def test_bad_requests_are_input_errors(runner, page_image):
    from PIL import Image

    with pytest.raises(GenerationInputError):
        runner.generate(page_image, "prompt_nope", max_new_tokens=2)
    with pytest.raises(GenerationInputError):
        runner.generate(page_image, "prompt_grounding_ocr", max_new_tokens=2)
    with pytest.raises(GenerationInputError, match="aspect ratio"):
        runner.generate(Image.new("RGB", (4020, 20)), "prompt_ocr", max_new_tokens=2)
    # tiny images are scaled up, not rejected
    assert runner.generate(Image.new("RGB", (10, 10), "white"), "prompt_ocr", temperature=0,
                           max_new_tokens=2).stats.model_size == (56, 56)
