"""/ocr per-request answers: Ollama's statistics, done_reason, seeds, logprobs and the
layout cells' confidence. In-process (Flask test client) on the tiny checkpoint."""
import json
import math

import pytest
import torch

from forcing import ForcedTokens, SoftForced, plain_token_ids
from model_runner.runner import ModelRunner
from server import create_app

STATISTICS = ["done_reason", "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
              "eval_count", "eval_duration"]


@pytest.fixture()
def page_path(page_image, tmp_path):
    path = tmp_path / "page.png"
    page_image.save(path)
    return str(path)


def _ocr(client, **body):
    body.setdefault("max_new_tokens", 8)
    body.setdefault("temperature", 0)
    body.setdefault("prompt_type", "prompt_ocr")
    response = client.post("/ocr", json=body)
    assert response.status_code == 200, response.get_json()
    return response


def _stream(client, **body):
    text = _ocr(client, stream=True, **body).get_data(as_text=True)
    return [json.loads(line) for line in text.splitlines()]


def _assert_sane(stats):
    assert stats["done_reason"] in ("stop", "length", "repetition")
    for name in STATISTICS[1:]:
        assert isinstance(stats[name], int) and stats[name] >= 0, name
    assert stats["prompt_eval_count"] > 0 and stats["eval_count"] > 0
    parts = stats["load_duration"] + stats["prompt_eval_duration"] + stats["eval_duration"]
    assert 0 < parts <= stats["total_duration"]


# -- statistics ---------------------------------------------------------------------------------


def test_statistics_plain_and_streamed(client, page_path, runner, page_image):
    plain = _ocr(client, image=page_path, max_new_tokens=10, logprobs=True).get_json()
    _assert_sane(plain)
    assert plain["eval_count"] == len(plain["logprobs"])  # one record per generated token
    prompt = runner.processor.page_inputs(page_image, "prompt_ocr").tensors["input_ids"]
    assert plain["prompt_eval_count"] == prompt.shape[1]
    lines = _stream(client, image=page_path, max_new_tokens=10, logprobs=True)
    last = lines[-1]
    _assert_sane(last)
    assert all(name not in line for line in lines[:-1] for name in STATISTICS)
    streamed = [t for line in lines for t in line.get("logprobs", [])]
    assert last["eval_count"] == len(streamed) == plain["eval_count"]
    assert [t["id"] for t in streamed] == [t["id"] for t in plain["logprobs"]]
    assert last["prompt_eval_count"] == plain["prompt_eval_count"]


def test_done_reason_length_and_stop(client, page_path, runner):
    ids = plain_token_ids(runner, 20)
    with ForcedTokens(runner.model, lambda step: ids[step % len(ids)]):
        body = _ocr(client, image=page_path, max_new_tokens=5).get_json()
    assert body["done_reason"] == "length" and body["eval_count"] == 5
    eos = sorted(runner.generator.eos_ids)[0]
    with ForcedTokens(runner.model, lambda step: eos if step == 3 else ids[step]):
        lines = _stream(client, image=page_path, max_new_tokens=50)
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == 4


def test_done_reason_repetition(tiny_ckpt, page_path):
    looping = ModelRunner(tiny_ckpt, device="cpu", dtype="float32", repetition_window=40,
                          repetition_max_period=8).load()
    client = create_app({}, runner=looping).test_client()
    cycle = plain_token_ids(looping, 3)
    with ForcedTokens(looping.model, lambda step: cycle[step % 3]):
        body = _ocr(client, image=page_path, max_new_tokens=300).get_json()
    assert body["done_reason"] == "repetition" and 40 <= body["eval_count"] < 60


# -- seeds --------------------------------------------------------------------------------------


def _sampled(client, page_path, **extra):
    body = _ocr(client, image=page_path, temperature=1.0, max_new_tokens=16, logprobs=True, **extra).get_json()
    return tuple(t["id"] for t in body["logprobs"]), body


def test_same_seed_same_text_and_seeds_differ(client, page_path):
    first, body = _sampled(client, page_path, seed=1234)
    again, body_again = _sampled(client, page_path, seed=1234)
    assert first == again and body["response"] == body_again["response"]
    assert body["seed"] == 1234
    assert len({_sampled(client, page_path, seed=seed)[0] for seed in (1, 2, 3, 4)}) > 1


def test_unseeded_requests_do_not_use_the_global_rng(client, page_path):
    runs = []
    for _ in range(3):
        torch.manual_seed(0)
        ids, body = _sampled(client, page_path)
        assert "seed" not in body
        runs.append(ids)
    assert len(set(runs)) > 1


def test_interleaved_seeded_streams_do_not_disturb_each_other(tiny_ckpt, page_path):
    batched = ModelRunner(tiny_ckpt, device="cpu", dtype="float32", max_batch_size=2).load()
    client = create_app({"max_batch_size": 2}, runner=batched).test_client()
    body = dict(image=page_path, prompt_type="prompt_ocr", temperature=1.0, max_new_tokens=12, logprobs=True)

    def ids(lines):
        return [t["id"] for line in lines for t in line.get("logprobs", [])]

    alone = {seed: ids(_stream(client, **{**body, "seed": seed})) for seed in (5, 6)}
    streams = {seed: client.post("/ocr", json={**body, "seed": seed, "stream": True}, buffered=False)
               for seed in (5, 6)}
    iterators = {seed: iter(response.response) for seed, response in streams.items()}
    lines = {5: [], 6: []}
    open_streams = set(iterators)
    while open_streams:  # one line of each in turn
        for seed in sorted(open_streams):
            chunk = next(iterators[seed], None)
            if chunk is None:
                open_streams.discard(seed)
                continue
            lines[seed].extend(json.loads(line) for line in chunk.decode().splitlines())
    for response in streams.values():
        response.close()
    assert {seed: ids(found) for seed, found in lines.items()} == alone


# -- logprobs -----------------------------------------------------------------------------------


def test_logprobs_shape_order_and_values(client, page_path, runner, page_image):
    body = _ocr(client, image=page_path, max_new_tokens=12, logprobs=True, top_logprobs=3).get_json()
    tokens = body["logprobs"]
    assert len(tokens) == body["eval_count"] == 12 or body["done_reason"] == "stop"
    for token in tokens:
        assert set(token) == {"token", "id", "logprob", "top_logprobs"}
        assert token["logprob"] <= 0 and math.exp(token["logprob"]) <= 1
        top = token["top_logprobs"]
        assert len(top) == 3
        values = [alt["logprob"] for alt in top]
        assert values == sorted(values, reverse=True)
        assert top[0]["id"] == token["id"]  # greedy: the chosen token is the most likely
        assert top[0]["logprob"] == pytest.approx(token["logprob"], abs=1e-6)
    # the same numbers as a plain forward pass (transformers' generate scores) on the same prefix
    inputs = runner.processor.page_inputs(page_image, "prompt_ocr").tensors
    with torch.inference_mode():
        out = runner.model.generate(**inputs, max_new_tokens=len(tokens), do_sample=False, temperature=None,
                                    top_p=None, top_k=None, output_scores=True, return_dict_in_generate=True)
    expected = [torch.log_softmax(s[0].float(), -1)[t["id"]].item() for s, t in zip(out.scores, tokens)]
    assert [t["logprob"] for t in tokens] == pytest.approx(expected, abs=1e-4)


def test_logprobs_not_asked_not_given(client, page_path):
    body = _ocr(client, image=page_path).get_json()
    assert "logprobs" not in body
    assert all("logprobs" not in line for line in _stream(client, image=page_path))


# -- layout confidence --------------------------------------------------------------------------


def _layout_answer(runner, page_image):
    model_w, model_h = runner.processor.model_input_size(*page_image.size)
    cells = [{"bbox": [0, 0, model_w, model_h // 3], "category": "Title", "text": "Hello wörld"},
             {"bbox": [0, model_h // 3, model_w, model_h // 2], "category": "Picture"},
             {"bbox": [0, model_h // 2, model_w, model_h], "category": "Text", "text": "Second line, ünïcode"}]
    return json.dumps(cells, ensure_ascii=False)


@pytest.mark.parametrize("stream", [False, True])
def test_every_layout_cell_gets_its_confidence(client, runner, page_path, page_image, stream):
    answer = _layout_answer(runner, page_image)
    tokenizer = runner.processor.tokenizer
    eos = sorted(runner.generator.eos_ids)[0]
    ids = tokenizer.encode(answer, add_special_tokens=False) + [eos]
    request = dict(image=page_path, prompt_type="prompt_layout_all_en", postprocess=True, logprobs=True,
                   max_new_tokens=len(ids) + 5)
    with SoftForced(runner.model, ids):
        if stream:
            lines = _stream(client, **request)
            body = lines[-1]
            records = [t for line in lines for t in line.get("logprobs", [])]
            body["response"] = "".join(line["response"] for line in lines)
        else:
            body = _ocr(client, **request).get_json()
            records = body["logprobs"]
    assert body["response"] == answer and body["done_reason"] == "stop"
    assert [t["id"] for t in records] == ids
    # each token's characters: the growth of the decoded prefix; a token that only starts a
    # multi-byte character shares the span of the token that completes it (README's rule)
    spans, previous = [], 0
    for n in range(1, len(ids) + 1):
        length = len(tokenizer.decode(ids[:n], skip_special_tokens=True).rstrip("\ufffd"))
        spans.append((previous, length))
        previous = max(previous, length)
    for i in reversed(range(len(spans) - 1)):
        if spans[i][0] == spans[i][1] and ids[i] != eos:
            spans[i] = spans[i + 1]

    def expected(start, end):
        probs = [math.exp(t["logprob"]) for t, (a, b) in zip(records, spans) if a < b and a < end and b > start]
        return {"min": pytest.approx(min(probs), abs=1e-5), "mean": pytest.approx(sum(probs) / len(probs), abs=1e-5)}

    layout = body["layout"]
    assert [c["category"] for c in layout] == ["Title", "Picture", "Text"]
    for cell in layout:
        assert set(cell["confidence"]) == {"min", "mean"}
        assert 0 < cell["confidence"]["min"] <= cell["confidence"]["mean"] <= 1
    title = answer.index("Hello wörld")
    assert layout[0]["confidence"] == expected(title, title + len("Hello wörld"))
    picture = answer.index('{"bbox": [0, ' + str(runner.processor.model_input_size(*page_image.size)[1] // 3))
    assert layout[1]["confidence"] == expected(picture, answer.index("}", picture) + 1)
    second = answer.index("Second line")
    assert layout[2]["confidence"] == expected(second, second + len("Second line, ünïcode"))
    assert layout[0]["confidence"] != layout[2]["confidence"]


def test_confidence_without_logprobs_in_the_answer(client, runner, page_path, page_image):
    answer = _layout_answer(runner, page_image)
    ids = runner.processor.tokenizer.encode(answer, add_special_tokens=False) + [sorted(runner.generator.eos_ids)[0]]
    with SoftForced(runner.model, ids):
        body = _ocr(client, image=page_path, prompt_type="prompt_layout_all_en", postprocess=True,
                    max_new_tokens=len(ids) + 5).get_json()
    assert "logprobs" not in body
    assert all(0 < cell["confidence"]["min"] <= 1 for cell in body["layout"])
