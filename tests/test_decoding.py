"""model_runner.decoding on its own (no model): per-request generators and seeds, the logprob
payload of ``choose_tokens``, per-row errors, option validation."""
import math

import pytest
import torch

from model_runner.decoding import DecodingOptions, GenerationInputError, TokenChooser, choose_tokens

VOCAB = 50
CPU = torch.device("cpu")


def _logits(rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def _sample(chooser: TokenChooser, steps: int = 20) -> list[int]:
    out = []
    for step in range(steps):
        tokens, _, errors = choose_tokens([chooser], _logits(seed=step), [None])
        assert not errors
        out.append(int(tokens[0]))
    return out


def _sampler(seed=None, **options) -> TokenChooser:
    return TokenChooser(DecodingOptions(temperature=1.0, seed=seed, **options), VOCAB, CPU)


def test_same_seed_same_tokens_and_different_seeds_differ():
    assert _sample(_sampler(7)) == _sample(_sampler(7))
    assert len({tuple(_sample(_sampler(seed))) for seed in range(4)}) > 1


def test_interleaved_choosers_do_not_disturb_each_other():
    alone_a, alone_b = _sample(_sampler(1)), _sample(_sampler(2))
    a, b = _sampler(1), _sampler(2)
    together_a, together_b = [], []
    for step in range(20):
        tokens, _, _ = choose_tokens([a, b], torch.cat([_logits(seed=step)] * 2), [None, None])
        together_a.append(int(tokens[0]))
        together_b.append(int(tokens[1]))
    assert (together_a, together_b) == (alone_a, alone_b)


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
    logits = _logits(rows=3, seed=5)
    greedy = TokenChooser(DecodingOptions(temperature=0, logprobs=3), VOCAB, CPU)
    sampled = _sampler(11, logprobs=0)
    off = TokenChooser(DecodingOptions(temperature=0), VOCAB, CPU)
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


def test_no_logprobs_no_payload_and_plain_greedy_is_argmax():
    logits = _logits(rows=2, seed=9)
    choosers = [TokenChooser(DecodingOptions(temperature=0), VOCAB, CPU) for _ in range(2)]
    tokens, payload, errors = choose_tokens(choosers, logits, [None, None])
    assert payload is None and not errors
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()


def test_a_failing_row_fails_alone():
    class Broken(TokenChooser):
        def choose(self, logits):
            raise RuntimeError("this row only")

    logits = _logits(rows=2, seed=4)
    broken = Broken(DecodingOptions(temperature=1.0, seed=1), VOCAB, CPU)
    fine = _sampler(1)
    tokens, _, errors = choose_tokens([broken, fine], logits, [None, None])
    assert list(errors) == [0] and "this row only" in str(errors[0])
    assert tokens.shape == (2,)


@pytest.mark.parametrize("options", [dict(seed=-1), dict(seed=2**64), dict(logprobs=6), dict(logprobs=-1),
                                     dict(temperature=-0.1), dict(top_p=0), dict(repetition_penalty=0)])
def test_bad_options_are_input_errors(options):
    with pytest.raises(GenerationInputError):
        DecodingOptions(**options).validate()
