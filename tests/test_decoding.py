"""model_runner.decoding on hand-made logits: greedy, top-p, per-request seeds, logprobs, penalties,
option validation, and one row's failure staying with that row. No model needed."""
import math

import pytest
import torch

from model_runner.decoding import (DecodingOptions, GenerationInputError, PieceAssembler, TokenChooser,
                                   apply_penalties, choose_tokens, sample_next_token)

CPU = torch.device("cpu")
VOCAB = 16


def _chooser(**options) -> TokenChooser:
    return TokenChooser(DecodingOptions(**options).validate(), VOCAB, CPU)


def _logits(seed: int, rows: int = 1) -> torch.Tensor:
    """Random but fixed logits [rows, VOCAB], spread enough that sampling varies."""
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def _draws(chooser: TokenChooser, logits: torch.Tensor, count: int) -> list[int]:
    return [int(chooser.choose(logits)) for _ in range(count)]


# -- greedy ---------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax_and_uses_no_randomness():
    logits = _logits(1, rows=4)
    chooser = _chooser(temperature=0)
    state = chooser.generator.get_state()
    assert chooser.plain_greedy
    assert [int(chooser.choose(row)) for row in logits] == logits.argmax(-1).tolist()
    assert torch.equal(chooser.generator.get_state(), state)
    tokens, payload, errors = choose_tokens([_chooser(temperature=0) for _ in range(4)], logits, [None] * 4)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert payload is None and errors == {}


def test_top_k_one_and_tiny_temperature_are_greedy():
    logits = _logits(2, rows=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next_token(logits, 1.0, 1.0, top_k=1, generator=generator).tolist() == logits.argmax(-1).tolist()
        assert sample_next_token(logits, 1e-4, generator=generator).tolist() == logits.argmax(-1).tolist()


# -- top-p ----------------------------------------------------------------------------------------


# probabilities 0.5, 0.3, 0.15, 0.05 (token 0 most likely)
NUCLEUS = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()


@pytest.mark.parametrize("top_p, kept", [(0.4, {0}), (0.5, {0}), (0.7, {0, 1}), (0.8, {0, 1}),
                                         (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    generator = torch.Generator().manual_seed(0)
    drawn = {int(sample_next_token(NUCLEUS, 1.0, top_p, generator=generator)) for _ in range(400)}
    # 400 draws from at most four tokens, the least likely kept one at >= 5 %: each kept token shows up
    # (the seed is fixed, so this is deterministic, not a statistical bet)
    assert drawn == kept


def test_top_p_renormalises_over_the_kept_tokens():
    generator = torch.Generator().manual_seed(3)
    drawn = [int(sample_next_token(NUCLEUS, 1.0, 0.7, generator=generator)) for _ in range(2000)]
    share = drawn.count(0) / len(drawn)
    assert abs(share - 0.5 / 0.8) < 0.05  # 0.625 within 2000 draws (fixed seed)


# -- seeds ----------------------------------------------------------------------------------------


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = _logits(4)[0]
    a = _draws(_chooser(temperature=1.0, seed=7), logits, 40)
    b = _draws(_chooser(temperature=1.0, seed=7), logits, 40)
    c = _draws(_chooser(temperature=1.0, seed=8), logits, 40)
    assert a == b
    assert a != c
    assert len(set(a)) > 3  # it really samples


def test_without_seed_each_request_draws_its_own():
    first, second = _chooser(temperature=1.0), _chooser(temperature=1.0)
    assert first.seed != second.seed
    logits = _logits(5)[0]
    assert _draws(first, logits, 40) != _draws(second, logits, 40)


def test_requests_never_share_random_state():
    """A seeded request's tokens do not depend on what other requests (seeded the same, seeded
    otherwise, or unseeded) sample in between, nor on the global torch RNG, which stays untouched."""
    logits = _logits(6, rows=3)
    alone = _draws(_chooser(temperature=0.9, top_p=0.95, seed=11), logits[0], 30)

    mine = _chooser(temperature=0.9, top_p=0.95, seed=11)
    twin, stranger = _chooser(temperature=0.9, seed=11), _chooser(temperature=1.3)
    interleaved = []
    for step in range(30):
        _draws(twin, logits[1], step % 3)
        torch.rand(5)  # someone else uses the global RNG
        _draws(stranger, logits[2], 2)
        interleaved.append(int(mine.choose(logits[0])))
    assert interleaved == alone

    # the same inside choose_tokens, whatever the batch around the row is
    global_state = torch.get_rng_state()
    batched, ours = [], _chooser(temperature=0.9, top_p=0.95, seed=11)
    others = [_chooser(temperature=1.0), _chooser(temperature=0), _chooser(temperature=0.5, seed=11)]
    for step in range(30):
        rows = [others[step % 3], ours, others[(step + 1) % 3]]
        tokens, _, errors = choose_tokens(rows, logits[[2, 0, 1]], [None, None, None])
        assert errors == {}
        batched.append(int(tokens[1]))
    assert batched == alone
    assert torch.equal(torch.get_rng_state(), global_state)  # choosers never touch the global RNG


# -- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = _logits(7, rows=3)
    choosers = [_chooser(temperature=0), _chooser(temperature=0, repetition_penalty=3.0), _chooser(temperature=0)]
    choosers[1].seen[logits[1].argmax()] = True  # penalised: it picks another token
    tokens, payload, errors = choose_tokens(choosers, logits, [2, 0, None])
    assert errors == {}
    expected = torch.log_softmax(logits, dim=-1)
    assert payload.shape == (3, 1 + 2 * 2)  # chosen logprob, then the top 2 values and ids
    assert tokens[1] != logits[1].argmax()
    for row in range(3):
        torch.testing.assert_close(payload[row, 0], expected[row, tokens[row]])
        top = torch.topk(expected[row], 2)
        torch.testing.assert_close(payload[row, 1:3], top.values)
        assert payload[row, 3:5].long().tolist() == top.indices.tolist()


class _Tokenizer:
    """What PieceAssembler.record needs: decode one id."""

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        return "".join(f"<{int(i)}>" for i in ids)


def test_piece_assembler_records_the_asked_number_of_alternatives():
    logits = _logits(8, rows=1)
    tokens, payload, _ = choose_tokens([_chooser(temperature=0)], logits, [3])
    assembler = PieceAssembler(_Tokenizer())
    record = assembler.record(int(tokens[0]), payload[0].tolist(), 2)
    expected = torch.log_softmax(logits[0], -1)
    assert record.id == int(logits.argmax()) and record.text == f"<{record.id}>"
    assert record.logprob == pytest.approx(float(expected.max()), abs=1e-6)
    assert [t[0] for t in record.top] == torch.topk(expected, 2).indices.tolist()
    assert [t[2] for t in record.top] == pytest.approx(torch.topk(expected, 2).values.tolist(), abs=1e-6)
    assert assembler.record(5, None, None).logprob is None


# -- penalties ------------------------------------------------------------------------------------


def test_penalties_on_a_hand_made_vector():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0])
    original = logits.clone()
    seen = torch.tensor([True, True, False, False, True])
    counts = torch.tensor([0.0, 2.0, 1.0, 0.0, 3.0])
    # repetition penalty 2: seen positives halve, seen negatives double, unseen stay
    assert apply_penalties(logits, seen, None, repetition_penalty=2.0).tolist() == [1.0, -2.0, 0.5, -3.0, 0.5]
    # frequency 0.5 * count, presence 0.25 once for any count > 0
    assert apply_penalties(logits, None, counts, frequency_penalty=0.5, presence_penalty=0.25).tolist() == \
        pytest.approx([2.0, -2.25, -0.25, -3.0, -0.75])
    # all three: repetition first, then the OpenAI pair
    assert apply_penalties(logits, seen, counts, 2.0, 0.5, 0.25).tolist() == \
        pytest.approx([1.0, -3.25, -0.25, -3.0, -1.25])
    # negative values reward instead; 1.0 / 0.0 change nothing
    assert apply_penalties(logits, None, counts, frequency_penalty=-1.0).tolist() == [2.0, 1.0, 1.5, -3.0, 4.0]
    assert torch.equal(apply_penalties(logits, seen, counts), logits)
    assert torch.equal(logits, original)  # the input is never modified


def test_chooser_tracks_prompt_and_answer_for_penalties():
    prompt = torch.tensor([3, 5])
    chooser = TokenChooser(DecodingOptions(temperature=0, repetition_penalty=1.5, presence_penalty=0.2).validate(),
                           8, CPU, prompt_ids=prompt)
    assert not chooser.plain_greedy
    assert chooser.seen.nonzero().flatten().tolist() == [3, 5]
    logits = torch.tensor([0.0, 1.0, 0.0, 1.4, 0.0, 0.0, 0.0, 0.0])
    # token 3 (1.4, in the prompt) becomes 1.4 / 1.5 < 1.0, so token 1 wins
    first = chooser.choose(logits)
    assert int(first) == 1
    chooser.observe(first)
    assert chooser.seen[1] and chooser.counts[1] == 1
    # now token 1 is penalised too: 1.0 / 1.5 - 0.2 < 1.4 / 1.5, so token 3 wins
    assert int(chooser.choose(logits)) == 3


# -- options and failures -------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                     dict(seed=-1), dict(seed=2**64), dict(logprobs=6), dict(logprobs=-1),
                                     dict(repetition_penalty=0.0), dict(frequency_penalty=2.5),
                                     dict(presence_penalty=-2.5), dict(temperature=float("nan"))])
def test_bad_options_are_input_errors(options):
    with pytest.raises(GenerationInputError):
        DecodingOptions(**options).validate()


def test_one_rows_failure_stays_with_that_row():
    class Broken(TokenChooser):
        def choose(self, logits):
            raise RuntimeError("this row's sampler broke")

    logits = _logits(9, rows=3)
    broken = Broken(DecodingOptions(temperature=1.0), VOCAB, CPU)
    seeded = _chooser(temperature=1.0, seed=1)
    tokens, payload, errors = choose_tokens([_chooser(temperature=0), broken, seeded], logits, [1, None, 1])
    assert list(errors) == [1] and "broke" in str(errors[1])
    assert int(tokens[0]) == int(logits[0].argmax())
    assert int(tokens[2]) == _draws(_chooser(temperature=1.0, seed=1), logits[2], 1)[0]
    assert payload.shape == (3, 3)


# -- from the observability work: the global RNG, and the payload's layout ----------

_VOCAB = 50
_CPU = torch.device("cpu")


def _seeded_logits(rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, _VOCAB, generator=torch.Generator().manual_seed(seed))


def _sample(chooser: TokenChooser, steps: int = 20) -> list[int]:
    out = []
    for step in range(steps):
        tokens, _, errors = choose_tokens([chooser], _seeded_logits(seed=step), [None])
        assert not errors
        out.append(int(tokens[0]))
    return out


def _sampler(seed=None, **options) -> TokenChooser:
    return TokenChooser(DecodingOptions(temperature=1.0, seed=seed, **options), _VOCAB, _CPU)


def test_without_seed_the_global_rng_is_neither_used_nor_enough():
    state = torch.random.get_rng_state()
    runs = []
    for _ in range(4):
        torch.manual_seed(0)  # would make every run the same if the choosers used the global RNG
        chooser = _sampler()
        assert 0 <= chooser.seed < 2**63
        runs.append(tuple(_sample(chooser)))
    assert len(set(runs)) > 1
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    _sample(_sampler(3))
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.random.set_rng_state(state)


def test_logprob_payload_shape_values_and_order():
    logits = _seeded_logits(rows=3, seed=5)
    greedy = TokenChooser(DecodingOptions(temperature=0, logprobs=3), _VOCAB, _CPU)
    sampled = _sampler(11, logprobs=0)
    off = TokenChooser(DecodingOptions(temperature=0), _VOCAB, _CPU)
    tokens, payload, errors = choose_tokens([greedy, sampled, off], logits, [3, 0, None])
    assert not errors and payload.shape == (3, 1 + 2 * 3)
    reference = torch.log_softmax(logits, dim=-1)
    for row in range(3):
        assert payload[row, 0].item() == pytest.approx(reference[row, tokens[row]].item(), abs=1e-6)
        assert payload[row, 0].item() <= 0
    top_values, top_ids = payload[0, 1:4], payload[0, 4:7].long()
    assert top_values.tolist() == sorted(top_values.tolist(), reverse=True)
    assert top_ids[0] == tokens[0] == logits[0].argmax()  # greedy: the chosen token ranks first
    assert top_values[0].item() == payload[0, 0].item()
    assert math.fsum(math.exp(v) for v in reference[0].tolist()) == pytest.approx(1.0)


def test_piece_assembler_text_equals_decode_with_constant_work_per_token(runner):
    """Random ids (broken UTF-8 included): the pieces and the held-back tail join to exactly
    ``tokenizer.decode``; a piece never repeats text already released."""
    tokenizer = runner.processor.tokenizer
    rng = torch.Generator().manual_seed(7)
    for length in (1, 2, 17, 300):
        ids = torch.randint(0, len(tokenizer), (length,), generator=rng).tolist()
        assembler = PieceAssembler(tokenizer)
        pieces = [assembler.add(i) for i in ids]
        assert [p.tokens[0].id for p in pieces] == ids
        text = "".join(p.text for p in pieces) + assembler.end()
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        assert assembler.end() == ""
