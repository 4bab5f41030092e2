"""runner.trace: tokens, logprobs, the image grid, attention-to-image maps recomputed from captured
queries and keys (checked against eager attention), and the vision tower's per-block outputs."""
from __future__ import annotations

import re

import pytest
import torch

from model_runner.runner import GenerationInputError
from model_runner.trace import TraceStopped, attention_rows, chars_to_tokens, token_offsets


@pytest.fixture(scope="module")
def traced(runner, page_image):
    """A greedy 12-token answer, every layer and head, two vision outputs."""
    return runner.trace(page_image, "prompt_ocr", max_new_tokens=12, vision_blocks=[0, 2])


@pytest.fixture(scope="module")
def eager_model(tiny_ckpt):
    from model_runner.modeling_dots_ocr import DotsOCRForCausalLM

    return DotsOCRForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32, attn_implementation="eager")


def test_grid_matches_the_prompt_and_the_page(runner, traced, page_image):
    grid = traced.grid
    inputs = runner.processor.page_inputs(page_image, "prompt_ocr").tensors
    ids = inputs["input_ids"][0]
    pads = (ids == runner.processor.image_token_id).nonzero().flatten().tolist()
    assert pads == list(grid.positions)
    assert grid.rows * grid.cols == len(pads)
    assert inputs["image_grid_thw"].tolist() == [[1, grid.h, grid.w]]
    assert grid.model_size == (grid.w * 14, grid.h * 14) == (grid.cols * 28, grid.rows * 28)
    assert grid.original_size == page_image.size
    assert grid.cell_box(0, 0) == (0, 0, 28, 28)
    assert grid.cell_box(grid.rows - 1, grid.cols - 1, original=True)[2:] == pytest.approx(page_image.size)


def test_token_cell_follows_the_vision_towers_patch_order(runner, traced):
    """Merged token k is the 2x2 block of patches 4k..4k+3; its cell is those patches' (row, col) // 2."""
    grid = traced.grid
    row_col = runner.model.vision_tower.patch_row_col_ids(torch.tensor([[grid.t, grid.h, grid.w]]))  # [P, 2]
    blocks = (row_col // grid.merge_size).view(grid.num_tokens, grid.merge_size ** 2, 2)
    assert (blocks == blocks[:, :1]).all()  # the four patches of a token share one cell
    assert [grid.token_cell(k) for k in range(grid.num_tokens)] == [tuple(b) for b in blocks[:, 0].tolist()]


def test_maps_shapes_tokens_and_logprobs(runner, traced, page_image):
    n = len(traced.token_ids)
    assert n == 12 and traced.span == (0, 12)
    assert traced.layers == (0, 1) and traced.heads == (0, 1, 2, 3)
    for layer in traced.layers:
        assert traced.attention[layer].shape == (12, 4, traced.grid.rows, traced.grid.cols)
        assert traced.other_mass[layer].shape == (12, 4)
    assert len(traced.tokens) == len(traced.offsets) == len(traced.logprobs) == n
    assert "".join(traced.tokens) == traced.text
    assert traced.heatmap().shape == (traced.grid.rows, traced.grid.cols)
    # the same answer as the runner's own greedy decoding, and the scores generate saw
    assert traced.text == runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=12).text
    inputs = runner.processor.page_inputs(page_image, "prompt_ocr").tensors
    with torch.inference_mode():
        out = runner.model.generate(**inputs, max_new_tokens=12, do_sample=False, temperature=None, top_p=None,
                                    top_k=None, output_scores=True, return_dict_in_generate=True)
    expected = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, traced.token_ids)]
    assert traced.logprobs == pytest.approx(expected, abs=1e-4)


def test_rows_sum_to_one_over_all_keys(traced):
    for layer in traced.layers:
        total = traced.attention[layer].sum(dim=(-2, -1)) + traced.other_mass[layer]  # [S, H]
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


def test_attention_rows_are_causal_and_normalised():
    torch.manual_seed(0)
    query, key = torch.randn(4, 3, 8), torch.randn(2, 10, 8)  # GQA: 4 query heads, 2 key heads
    probs = attention_rows(query, key, torch.tensor([2, 5, 9]), scaling=8 ** -0.5)
    assert probs.shape == (4, 3, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 3))
    assert (probs[:, 0, 3:] == 0).all() and (probs[:, 1, 6:] == 0).all() and (probs[:, 0, :3] > 0).all()
    # head 3 reads key head 1 (repeat_kv order), head 0 key head 0
    manual = torch.softmax((query[3, 2] @ key[1].T) * 8 ** -0.5, -1)
    torch.testing.assert_close(probs[3, 2], manual)


def test_recomputed_attention_equals_eager_attention(runner, traced, eager_model, page_image):
    """The runner runs SDPA; eager attention with output_attentions gives the reference rows."""
    assert runner.attn_implementation[0] == "sdpa"
    inputs = runner.processor.page_inputs(page_image, "prompt_ocr").tensors
    answer = torch.tensor([traced.token_ids])
    ids = torch.cat([inputs["input_ids"], answer], dim=1)
    with torch.inference_mode():
        out = eager_model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                          image_grid_thw=inputs["image_grid_thw"], use_cache=False, output_attentions=True)
    prompt, grid = inputs["input_ids"].shape[1], traced.grid
    image = slice(grid.first_position, grid.first_position + grid.num_tokens)
    for layer in traced.layers:
        rows = out.attentions[layer][0, :, prompt:prompt + 12]  # [H, S, L]
        expected = rows[..., image].transpose(0, 1).reshape(12, 4, grid.rows, grid.cols)
        torch.testing.assert_close(traced.attention[layer], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(traced.other_mass[layer], rows.sum(-1).T - rows[..., image].sum(-1).T,
                                   atol=1e-5, rtol=1e-4)
        assert expected.std() > 1e-4  # not a uniform map: the comparison means something


def test_span_heads_and_averaging(runner, page_image):
    text = "Hello world, a page of text"
    whole = runner.trace(page_image, "prompt_ocr", text=text)
    n = len(whole.token_ids)
    assert whole.text == text and whole.span == (0, n) and n > 5
    part = runner.trace(page_image, "prompt_ocr", text=text, layers=[-1], heads=[1, 3], span=(2, 5))
    assert part.layers == (1,) and part.heads == (1, 3) and part.span == (2, 5)
    assert part.attention[1].shape == (3, 2, part.grid.rows, part.grid.cols)
    torch.testing.assert_close(part.attention[1], whole.attention[1][2:5, [1, 3]], atol=1e-6, rtol=0)
    mean = runner.trace(page_image, "prompt_ocr", text=text, layers=[0], average_heads=True)
    assert mean.attention[0].shape == (n, 1, mean.grid.rows, mean.grid.cols)
    torch.testing.assert_close(mean.attention[0][:, 0], whole.attention[0].mean(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(mean.heatmap(), whole.attention[0].mean(dim=(0, 1)), atol=1e-6, rtol=0)
    torch.testing.assert_close(whole.heatmap(layers=[1], tokens=[3]), whole.attention[1][3].mean(0))


def test_char_span_selects_the_tokens_of_those_characters(runner, page_image):
    text = "Title: Hello world"
    result = runner.trace(page_image, "prompt_ocr", text=text, layers=[0], char_span=(13, 18))
    start, end = result.span
    covered = text[result.offsets[start][0]:result.offsets[end - 1][1]]
    assert "world" in covered and "Title" not in covered
    assert result.attention[0].shape[0] == end - start


def test_token_offsets_handle_characters_split_across_tokens(runner):
    tokenizer = runner.processor.tokenizer
    text = "表格 é ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # the tiny byte-level vocabulary splits the CJK characters
    decoded, pieces, offsets = token_offsets(tokenizer, ids)
    assert decoded == text == "".join(pieces)
    first_char = [i for i, (a, b) in enumerate(offsets) if (a, b) == (0, 1)]
    assert len(first_char) > 1  # the bytes of 表 share its span
    second_char = [i for i, span in enumerate(offsets) if span == (1, 2)]
    assert second_char[0] == first_char[-1] + 1
    assert chars_to_tokens(offsets, 1, 2) == (second_char[0], second_char[-1] + 1)
    assert chars_to_tokens(offsets, 0, 2) == (0, second_char[-1] + 1)


def test_vision_blocks_on_the_patch_grid(runner, traced, page_image):
    grid = traced.grid
    inputs = runner.processor.page_inputs(page_image, "prompt_ocr").tensors
    tower = runner.model.vision_tower
    with torch.inference_mode():
        hidden = tower(inputs["pixel_values"], inputs["image_grid_thw"], output_hidden_states=True).hidden_states
    row_col = tower.patch_row_col_ids(inputs["image_grid_thw"])
    assert set(traced.vision_blocks) == {0, 2}
    for index, block in traced.vision_blocks.items():
        assert block.shape == (1, grid.h, grid.w, hidden[index].shape[-1])
        torch.testing.assert_close(block[0, row_col[:, 0], row_col[:, 1]], hidden[index])


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": [2]}, "layers must be integers"),
    ({"heads": [4]}, "heads must be integers"),
    ({"heads": []}, "heads must not be empty"),
    ({"span": (3, 3)}, "span [3, 3)"),
    ({"span": (0, 99)}, "the answer has"),
    ({"span": (0, 1), "char_span": (0, 1)}, "not both"),
    ({"char_span": (50, 60)}, "outside the answer"),
    ({"text": ""}, "the answer is empty"),
])
def test_bad_requests_are_input_errors(runner, page_image, kwargs, message):
    kwargs = {"text": "Hello world", **kwargs}
    with pytest.raises(GenerationInputError, match=re.escape(message)):
        runner.trace(page_image, "prompt_ocr", **kwargs)


def test_should_stop_ends_the_generated_answer(runner, page_image):
    """``should_stop`` is polled at each generated token; once true, generation ends and nothing is traced."""
    polls = []

    def stop_after_three() -> bool:
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(TraceStopped):
        runner.trace(page_image, "prompt_layout_only_en", max_new_tokens=500, layers=[-1],
                     should_stop=stop_after_three)
    # the decoding engine polls it when the request joins and before each decoding step: true at the
    # third poll, so generation ended after two tokens
    assert len(polls) == 3
    # a given text is not generated, so there is nothing to stop
    traced = runner.trace(page_image, "prompt_ocr", text="Hello", layers=[-1], should_stop=lambda: True)
    assert traced.text == "Hello"
