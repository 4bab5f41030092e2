"""The processor: prompt rendering, pad expansion, pixels identical to transformers' processor."""
import json

import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from model_runner.processing import IMAGE_PAD, load_processor
from model_runner.prompts import prompt_text, system_text


def test_render_prompt_matches_the_evaluated_format(tiny_ckpt):
    processor = load_processor(tiny_ckpt)
    assert processor.render_prompt("P") == "<|user|><|img|><|imgpad|><|endofimg|>P<|endofuser|><|assistant|>"
    two = processor.render_prompt("P", n_images=2)
    assert two == "<|user|>" + "<|img|><|imgpad|><|endofimg|>" * 2 + "P<|endofuser|><|assistant|>"
    assert processor.render_prompt("P", system=None) == processor.render_prompt("P")


def test_render_prompt_with_a_system_turn(tiny_ckpt):
    processor = load_processor(tiny_ckpt)
    assert processor.render_prompt("Q?", system="You are a helpful assistant.") == (
        "<|system|>You are a helpful assistant.<|endofsystem|>\n"
        "<|user|><|img|><|imgpad|><|endofimg|>Q?<|endofuser|><|assistant|>")


def _upstream_messages(prompt, system=None):
    """The message shape upstream's vLLM client sends (dots_ocr / dots_mocr model/inference.py)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": f"<|img|><|imgpad|><|endofimg|>{prompt}"},
    ]})
    return messages


@pytest.mark.parametrize("prompt_type", ["prompt_ocr", "prompt_general"])
def test_render_chat_of_upstream_messages_equals_render_prompt(tiny_family_ckpt, prompt_type):
    processor = load_processor(tiny_family_ckpt)
    question = "What does the sign say?" if prompt_type == "prompt_general" else None
    prompt, system = prompt_text(prompt_type, question=question), system_text(prompt_type)
    rendered = processor.render_chat(_upstream_messages(prompt, system))
    assert rendered == processor.render_prompt(prompt, system=system)
    if system:
        assert rendered.startswith("<|system|>You are a helpful assistant.<|endofsystem|>\n<|user|>")


def test_render_chat_uses_the_checkpoint_template(tiny_ckpt):
    processor = load_processor(tiny_ckpt)
    template = json.loads((tiny_ckpt / "chat_template.json").read_text())["chat_template"]
    assert processor.chat_template == template
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": [{"type": "text", "text": "U2"}]}]
    assert processor.render_chat(chat) == (
        "<|system|>S<|endofsystem|>\n<|user|>U1<|endofuser|><|assistant|>A1<|endofassistant|>"
        "<|user|>U2<|endofuser|><|assistant|>")


def test_render_chat_flattens_parts_as_vllm_does(tiny_ckpt):
    processor = load_processor(tiny_ckpt)
    # An image whose placeholder the text lacks goes in front, followed by a newline; text parts
    # are joined with newlines.
    parts = [{"type": "image"}, {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert processor.render_chat([{"role": "user", "content": parts}]) == (
        "<|user|><|img|><|imgpad|><|endofimg|>\na\nb<|endofuser|><|assistant|>")
    two = [{"type": "image_url", "image_url": {"url": "x"}}, {"image": "y"}, {"type": "text", "text": "Q"}]
    assert processor.render_chat([{"role": "user", "content": two}]).count(IMAGE_PAD) == 2


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "tool", "content": "x"}], "role"),
    (["x"], "object"),
    ([{"role": "user", "content": 5}], "string or a list"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported content part"),
    ([{"role": "user", "content": ["text"]}], "content part must be an object"),
    ([{"role": "system", "content": [{"type": "image"}]}], "only user messages may hold images"),
])
def test_render_chat_refuses_malformed_messages(tiny_ckpt, messages, match):
    processor = load_processor(tiny_ckpt)
    with pytest.raises(ValueError, match=match):
        processor.render_chat(messages)


def test_render_chat_expands_pads_like_render_prompt(tiny_ckpt, page_image):
    processor = load_processor(tiny_ckpt)
    prompt = prompt_text("prompt_general", question="Read it.")
    system = system_text("prompt_general")
    by_chat = processor(text=processor.render_chat(_upstream_messages(prompt, system)), images=[page_image])
    by_prompt = processor(text=processor.render_prompt(prompt, system=system), images=[page_image])
    assert torch.equal(by_chat["input_ids"], by_prompt["input_ids"])
    pad_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    grid = by_chat["image_grid_thw"]
    assert int((by_chat["input_ids"] == pad_id).sum()) == int(grid.prod(dim=1).sum()) // 4


def test_one_pad_per_image_token(tiny_ckpt, page_image):
    processor = load_processor(tiny_ckpt)
    small = Image.new("RGB", (56, 84), "gray")
    batch = processor(text=processor.render_prompt(prompt_text("prompt_ocr"), n_images=2),
                      images=[page_image, small])
    grid = batch["image_grid_thw"]
    expected = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()) // 4
    pad_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert int((batch["input_ids"] == pad_id).sum()) == expected
    assert batch["pixel_values"].shape == (int((grid[:, 1] * grid[:, 2]).sum()), 3 * 14 * 14)
    # special tokens stay single tokens
    ids = batch["input_ids"][0].tolist()
    for token in ("<|user|>", "<|img|>", "<|endofimg|>", "<|endofuser|>", "<|assistant|>"):
        assert processor.tokenizer.convert_tokens_to_ids(token) in ids


def test_pixels_match_transformers_pil_image_processor(tiny_ckpt):
    """Our processor's pixel_values equal transformers' reference (PIL) Qwen2-VL image processor
    configured from the same preprocessor_config.json, on an image already at model size."""
    processor = load_processor(tiny_ckpt)
    reference = Qwen2VLImageProcessorPil.from_pretrained(tiny_ckpt)
    generator = torch.Generator().manual_seed(0)
    array = torch.randint(0, 256, (112, 196, 3), generator=generator, dtype=torch.uint8).numpy()
    image = Image.fromarray(array)
    ours = processor.image_processor(images=[image], return_tensors="pt")
    ref = reference(images=[image], return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["image_grid_thw"].tolist() == [[1, 8, 14]]
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"].to(torch.float32), atol=1e-5, rtol=1e-5)


def test_patch_layout_follows_model_md(tiny_ckpt):
    """Row order: 2x2 blocks row-major, inside a block TL, TR, BL, BR; a row is [c][y][x]."""
    processor = load_processor(tiny_ckpt)
    ip = processor.image_processor
    array = torch.randint(0, 256, (56, 84, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    out = ip(images=[Image.fromarray(array.numpy())], return_tensors="pt")["pixel_values"]
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    normalized = (array.permute(2, 0, 1).float() / 255 - mean) / std  # [3, 56, 84]
    rows = []
    for block_r in range(2):
        for block_c in range(3):
            for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
                r, c = block_r * 2 + dr, block_c * 2 + dc
                rows.append(normalized[:, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].reshape(-1))
    torch.testing.assert_close(out, torch.stack(rows), atol=1e-5, rtol=1e-5)


def test_prompt_texts_are_the_trained_strings():
    assert prompt_text("prompt_ocr") == "Extract the text content from this image."
    grounding = prompt_text("prompt_grounding_ocr", [163, 241, 1536, 705])
    assert grounding.endswith("Bounding Box:\n[163, 241, 1536, 705]")
    assert prompt_text("prompt_layout_all_en").startswith("Please output the layout information from the PDF image")
