"""The dots.ocr model code on the tiny random checkpoint (CPU, fast)."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_runner.modeling_dots_ocr import (
    CheckpointError,
    DotsOCRConfig,
    DotsOCRForCausalLM,
    DotsVisionTransformer,
)
from model_runner.tiny import OFFICIAL_CONFIG, build_tiny_checkpoint

TINY_LLM_LAYERS = 2
TINY_VISION_BLOCKS = 2


# ------------------------------------------------------------------------------------------------
# fixtures (module scoped; tests/conftest.py belongs to someone else)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("modeling") / "DotsOCR", seed=0, shards=2)


@pytest.fixture(scope="module")
def single_ckpt(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("modeling") / "DotsOCRsingle", seed=0, shards=1)


@pytest.fixture(scope="module")
def model(sharded_ckpt) -> DotsOCRForCausalLM:
    return DotsOCRForCausalLM.from_pretrained(sharded_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(sharded_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sharded_ckpt)


@pytest.fixture(scope="module")
def image_processor(sharded_ckpt):
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor.from_pretrained(sharded_ckpt)


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="module")
def images():
    return [_image(84, 56, seed=1), _image(56, 112, seed=2)]


def _vision_inputs(image_processor, images):
    out = image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _prompt(tokenizer, grid_thw, text="Extract the text content from this image.<|assistant|>"):
    pieces = ["<|img|>" + "<|imgpad|>" * (int(t * h * w) // 4) + "<|endofimg|>" for t, h, w in grid_thw.tolist()]
    return tokenizer("".join(pieces) + text, return_tensors="pt")


# ------------------------------------------------------------------------------------------------
# the tiny checkpoint itself
# ------------------------------------------------------------------------------------------------


def _expected_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the released checkpoint's tensors, for the tiny sizes."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(TINY_LLM_LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })  # fmt: skip
    v = config["vision_config"]
    embed, v_inter, patch = v["embed_dim"], v["intermediate_size"], v["patch_size"]
    merged = embed * v["spatial_merge_size"] ** 2
    shapes.update({
        "vision_tower.patch_embed.patchifier.proj.weight": (embed, v["num_channels"], patch, patch),
        "vision_tower.patch_embed.patchifier.proj.bias": (embed,),
        "vision_tower.patch_embed.patchifier.norm.weight": (embed,),
        "vision_tower.post_trunk_norm.weight": (embed,),
        "vision_tower.merger.ln_q.weight": (embed,), "vision_tower.merger.ln_q.bias": (embed,),
        "vision_tower.merger.mlp.0.weight": (merged, merged), "vision_tower.merger.mlp.0.bias": (merged,),
        "vision_tower.merger.mlp.2.weight": (v["hidden_size"], merged),
        "vision_tower.merger.mlp.2.bias": (v["hidden_size"],),
    })  # fmt: skip
    for j in range(TINY_VISION_BLOCKS):
        p = f"vision_tower.blocks.{j}."
        shapes.update({
            p + "norm1.weight": (embed,), p + "attn.qkv.weight": (3 * embed, embed),
            p + "attn.proj.weight": (embed, embed), p + "norm2.weight": (embed,),
            p + "mlp.fc1.weight": (v_inter, embed), p + "mlp.fc3.weight": (v_inter, embed),
            p + "mlp.fc2.weight": (embed, v_inter),
        })  # fmt: skip
    return shapes


def test_tiny_checkpoint_has_official_layout(sharded_ckpt, tokenizer):
    from safetensors import safe_open

    config = json.loads((sharded_ckpt / "config.json").read_text())
    assert list(config) == list(OFFICIAL_CONFIG)
    assert list(config["vision_config"]) == list(OFFICIAL_CONFIG["vision_config"])
    assert config["num_hidden_layers"] == TINY_LLM_LAYERS
    assert config["vision_config"]["num_hidden_layers"] == TINY_VISION_BLOCKS
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] >= len(tokenizer)

    index = json.loads((sharded_ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2
    assert not (sharded_ckpt / "model.safetensors").exists()
    expected = _expected_tensor_shapes(config)
    assert set(index["weight_map"]) == set(expected)
    for shard in shards:
        with safe_open(str(sharded_ckpt / shard), framework="pt") as handle:
            for name in handle.keys():
                assert index["weight_map"][name] == shard
                tensor = handle.get_tensor(name)
                assert tensor.dtype == torch.bfloat16 and tuple(tensor.shape) == expected[name], name

    # special tokens: single tokens, official order, ids wired into config / generation config
    added = json.loads((sharded_ckpt / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    contents = [added[k]["content"] for k in sorted(added, key=int)]
    assert contents[0] == "<|endoftext|>" and contents[22:25] == ["<|imgpad|>", "<|img|>", "<|endofimg|>"]
    first = int(min(added, key=int))
    assert [int(k) for k in sorted(added, key=int)] == list(range(first, first + 45))
    for token_id, entry in added.items():
        assert tokenizer.convert_tokens_to_ids(entry["content"]) == int(token_id)
        assert tokenizer(entry["content"])["input_ids"] == [int(token_id)]
    ids = tokenizer("<|img|><|imgpad|><|imgpad|><|endofimg|> hello<|assistant|>")["input_ids"]
    assert ids[:4] == [tokenizer.convert_tokens_to_ids(t)
                       for t in ("<|img|>", "<|imgpad|>", "<|imgpad|>", "<|endofimg|>")]
    assert config["image_token_id"] == tokenizer.convert_tokens_to_ids("<|imgpad|>")
    assert config["video_token_id"] == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert tokenizer.pad_token == "[PAD]" and tokenizer.eos_token == "<|endoftext|>"
    generation = json.loads((sharded_ckpt / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.convert_tokens_to_ids(t)
                                          for t in ("<|endoftext|>", "<|endofassistant|>")]
    sentence = "Tables in HTML, formulas in LaTeX."
    assert tokenizer.decode(tokenizer(sentence)["input_ids"]) == sentence


def test_tiny_checkpoint_is_deterministic_per_seed(sharded_ckpt, tmp_path):
    again = build_tiny_checkpoint(tmp_path / "again", seed=0, shards=2)
    other = build_tiny_checkpoint(tmp_path / "other", seed=1, shards=2)
    files = sorted(p.name for p in sharded_ckpt.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (sharded_ckpt / name).read_bytes() == (again / name).read_bytes(), name
    weights = [n for n in files if n.endswith(".safetensors")]
    assert all((sharded_ckpt / n).read_bytes() != (other / n).read_bytes() for n in weights)
    assert (sharded_ckpt / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def test_sharded_and_single_file_checkpoints_give_identical_logits(model, single_ckpt, tokenizer, image_processor,
                                                                   images):
    single = DotsOCRForCausalLM.from_pretrained(single_ckpt, dtype=torch.float32)
    assert (single_ckpt / "model.safetensors").exists() and not (single_ckpt / "model.safetensors.index.json").exists()
    pixel_values, grid = _vision_inputs(image_processor, images[:1])
    enc = _prompt(tokenizer, grid)
    with torch.no_grad():
        a = model(**enc, pixel_values=pixel_values, image_grid_thw=grid).logits
        b = single(**enc, pixel_values=pixel_values, image_grid_thw=grid).logits
    assert torch.equal(a, b)
    assert a.shape == (1, enc["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(a).all() and a.std() > 0.1  # not a degenerate random model


def _copy(ckpt: Path, dest: Path) -> Path:
    shutil.copytree(ckpt, dest)
    return dest


def _edit_shard(folder: Path, edit) -> None:
    """Apply ``edit(tensors: dict, weight_map: dict, shard_name)`` to the first shard and rewrite shard + index."""
    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(str(folder / shard))
    edit(tensors, index["weight_map"], shard)
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def test_missing_tensor_is_reported_by_name(sharded_ckpt, tmp_path):
    folder = _copy(sharded_ckpt, tmp_path / "missing")
    removed = []

    def drop_one(tensors, weight_map, shard):
        name = sorted(tensors)[0]
        removed.append(name)
        del tensors[name]
        del weight_map[name]

    _edit_shard(folder, drop_one)
    with pytest.raises(CheckpointError, match="missing") as info:
        DotsOCRForCausalLM.from_pretrained(folder)
    assert removed[0] in str(info.value)


def test_unexpected_tensor_is_reported_by_name(sharded_ckpt, tmp_path):
    folder = _copy(sharded_ckpt, tmp_path / "unexpected")

    def add_one(tensors, weight_map, shard):
        tensors["vision_tower.blocks.0.attn.extra_scale"] = torch.ones(3, dtype=torch.bfloat16)
        weight_map["vision_tower.blocks.0.attn.extra_scale"] = shard

    _edit_shard(folder, add_one)
    with pytest.raises(CheckpointError, match="unexpected") as info:
        DotsOCRForCausalLM.from_pretrained(folder)
    assert "vision_tower.blocks.0.attn.extra_scale" in str(info.value)


def test_shape_mismatch_is_reported_by_name(sharded_ckpt, tmp_path):
    folder = _copy(sharded_ckpt, tmp_path / "shape")
    changed = []

    def reshape_one(tensors, weight_map, shard):
        name = next(n for n in sorted(tensors) if tensors[n].dim() == 2)
        changed.append(name)
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1], dtype=torch.bfloat16)

    _edit_shard(folder, reshape_one)
    with pytest.raises(CheckpointError, match="shape") as info:
        DotsOCRForCausalLM.from_pretrained(folder)
    assert changed[0] in str(info.value)


def test_non_persistent_buffers_are_recomputed_closed_form(model):
    llm_head_dim = model.config.hidden_size // model.config.num_attention_heads
    k = torch.arange(llm_head_dim // 2, dtype=torch.float64)
    llm_expected = (1e6 ** (-2 * k / llm_head_dim)).float()
    rotary = model.model.rotary_emb
    assert model.config.rope_parameters["rope_theta"] == 1000000
    for buffer in (rotary.inv_freq, rotary.original_inv_freq):
        assert buffer.dtype == torch.float32 and buffer.device.type == "cpu"
        torch.testing.assert_close(buffer, llm_expected, rtol=1e-6, atol=0)

    vision = model.config.vision_config
    rotary_dim = vision.embed_dim // vision.num_attention_heads // 2
    k = torch.arange(rotary_dim // 2, dtype=torch.float64)
    vision_expected = (1e4 ** (-2 * k / rotary_dim)).float()
    torch.testing.assert_close(model.vision_tower.rotary_pos_emb.inv_freq, vision_expected, rtol=1e-6, atol=0)
    assert not any(b.is_meta for b in model.buffers()) and not any(p.is_meta for p in model.parameters())
    assert not model.training


def test_official_config_rope_theta_reaches_the_llm_rotary():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    config = DotsOCRConfig.from_dict(json.loads(json.dumps(OFFICIAL_CONFIG)))
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1000000}
    assert config.image_token_id == 151665 and config.video_token_id == 151656
    assert config.vision_config.num_hidden_layers == 42 and config.vision_config.embed_dim == 1536
    assert config.sliding_window is None
    k = torch.arange(64, dtype=torch.float64)
    expected = (1e6 ** (-2 * k / 128)).float()
    torch.testing.assert_close(Qwen2RotaryEmbedding(config).inv_freq, expected, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# vision tower
# ------------------------------------------------------------------------------------------------


def test_two_images_in_one_batch_match_each_alone(model, image_processor, images):
    tower = model.vision_tower
    pixel_values, grid = _vision_inputs(image_processor, images)
    assert grid.tolist() == [[1, 4, 6], [1, 8, 4]]
    with torch.no_grad():
        both = tower(pixel_values, grid).last_hidden_state
        alone = [tower(*_vision_inputs(image_processor, [image])).last_hidden_state for image in images]
    assert both.shape == (6 + 8, model.config.hidden_size)
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-5, atol=1e-5)
    # and the two images really are different inputs producing different features
    assert (alone[0].mean(0) - alone[1].mean(0)).abs().max() > 1e-3


def test_vision_sdpa_and_eager_agree_fp32(model, image_processor, images):
    tower = model.vision_tower
    pixel_values, grid = _vision_inputs(image_processor, images)
    outputs = {}
    try:
        for impl in ("sdpa", "eager", "flash_attention_2"):  # flash on CPU falls back to sdpa
            tower.attn_implementation = impl
            with torch.no_grad():
                outputs[impl] = tower(pixel_values, grid).last_hidden_state
    finally:
        tower.attn_implementation = "sdpa"
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs["sdpa"], outputs["flash_attention_2"])
    with pytest.raises(ValueError):
        tower.attn_implementation = "flash_attention_3"


def test_vision_hidden_states_and_block_hook(model, image_processor, images):
    tower = model.vision_tower
    pixel_values, grid = _vision_inputs(image_processor, images)
    seen = []
    handle = tower.blocks[1].register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    try:
        with torch.no_grad():
            out = tower(pixel_values, grid, output_hidden_states=True)
    finally:
        handle.remove()
    assert len(seen) == 1
    assert len(out.hidden_states) == TINY_VISION_BLOCKS + 1
    assert all(h.shape == (pixel_values.shape[0], model.config.vision_config.embed_dim) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[2], seen[0])  # hidden_states[j + 1] = output of block j
    merged = tower.merger(tower.post_trunk_norm(out.hidden_states[-1]))
    torch.testing.assert_close(merged, out.last_hidden_state)
    assert tower(pixel_values, grid).hidden_states is None


def test_vision_tower_runs_in_half_precisions(model, image_processor, images):
    pixel_values, grid = _vision_inputs(image_processor, images[:1])
    with torch.no_grad():
        reference = model.vision_tower(pixel_values, grid).last_hidden_state
        for dtype in (torch.bfloat16, torch.float16):
            tower = DotsVisionTransformer(model.config.vision_config)
            tower.load_state_dict(model.vision_tower.state_dict())
            tower.to(dtype)
            out = tower(pixel_values, grid).last_hidden_state
            assert out.dtype == dtype
            torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)


def test_vision_rotary_uses_absolute_row_and_column(model):
    grid = torch.tensor([[1, 2, 4]])
    row_col = model.vision_tower.patch_row_col_ids(grid)
    # 2x2 blocks row-major, inside a block: top-left, top-right, bottom-left, bottom-right
    assert row_col.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert DotsVisionTransformer.segment_boundaries(torch.tensor([[1, 2, 4], [2, 2, 2]])).tolist() == [0, 8, 12, 16]


# ------------------------------------------------------------------------------------------------
# the full model
# ------------------------------------------------------------------------------------------------


def test_image_token_count_mismatch_is_a_value_error(model, tokenizer, image_processor, images):
    pixel_values, grid = _vision_inputs(image_processor, images[:1])
    enc = tokenizer("<|img|>" + "<|imgpad|>" * 5 + "<|endofimg|>hi", return_tensors="pt")  # needs 6
    with pytest.raises(ValueError, match="image tokens"):
        model(**enc, pixel_values=pixel_values, image_grid_thw=grid)


def test_image_features_replace_the_image_token_embeddings(model, tokenizer, image_processor, images):
    pixel_values, grid = _vision_inputs(image_processor, images[:1])
    enc = _prompt(tokenizer, grid)
    with torch.no_grad():
        with_image = model(**enc, pixel_values=pixel_values, image_grid_thw=grid, output_hidden_states=True)
        text_only = model(**enc, output_hidden_states=True)
        features = model.vision_tower(pixel_values, grid).last_hidden_state
    is_image = enc["input_ids"][0] == model.config.image_token_id
    embeddings = with_image.hidden_states[0][0]
    torch.testing.assert_close(embeddings[is_image], features)
    torch.testing.assert_close(embeddings[~is_image], text_only.hidden_states[0][0][~is_image])
    assert len(with_image.hidden_states) == TINY_LLM_LAYERS + 1
    assert not torch.allclose(with_image.logits[0, -1], text_only.logits[0, -1])


def test_batch_with_left_padding_matches_single_prompts(model, tokenizer, image_processor, images):
    singles = []
    encodings = []
    for image in images:
        pixel_values, grid = _vision_inputs(image_processor, [image])
        enc = _prompt(tokenizer, grid)
        encodings.append(enc["input_ids"][0])
        with torch.no_grad():
            singles.append(model(**enc, pixel_values=pixel_values, image_grid_thw=grid).logits[0, -1])
    length = max(len(ids) for ids in encodings)
    pad = tokenizer.pad_token_id
    input_ids = torch.stack([torch.cat([torch.full((length - len(i),), pad), i]) for i in encodings])
    lengths = torch.tensor([len(i) for i in encodings])
    attention_mask = (torch.arange(length)[None] >= (length - lengths)[:, None]).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    pixel_values, grid = _vision_inputs(image_processor, images)
    with torch.no_grad():
        batch = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            pixel_values=pixel_values, image_grid_thw=grid,
        ).logits[:, -1]  # fmt: skip
    torch.testing.assert_close(batch, torch.stack(singles), rtol=1e-4, atol=1e-4)


def test_greedy_generate_with_cache_equals_stepwise_argmax(model, tokenizer, image_processor, images):
    pixel_values, grid = _vision_inputs(image_processor, images[:1])
    enc = _prompt(tokenizer, grid)
    prompt_length = enc["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(
            **enc, pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=6, do_sample=False
        )
        uncached = model.generate(
            **enc, pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=6, do_sample=False, use_cache=False
        )
    new_tokens = generated[0, prompt_length:].tolist()
    assert 1 <= len(new_tokens) <= 6
    assert torch.equal(generated, uncached)

    eos_ids = set(model.generation_config.eos_token_id)
    assert len(eos_ids) == 2
    ids = enc["input_ids"]
    with torch.no_grad():
        for token in new_tokens:
            logits = model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid).logits
            expected = int(logits[0, -1].argmax())
            assert token == expected
            ids = torch.cat([ids, torch.tensor([[expected]])], dim=1)
    if len(new_tokens) < 6:
        assert new_tokens[-1] in eos_ids


def test_prepare_inputs_pass_images_only_while_the_cache_is_empty(model, tokenizer, image_processor, images):
    from transformers import DynamicCache

    pixel_values, grid = _vision_inputs(image_processor, images[:1])
    enc = _prompt(tokenizer, grid)
    cache = DynamicCache(config=model.config)
    first = model.prepare_inputs_for_generation(
        enc["input_ids"], past_key_values=cache, attention_mask=enc["attention_mask"],
        pixel_values=pixel_values, image_grid_thw=grid, use_cache=True,
    )  # fmt: skip
    assert first["pixel_values"] is pixel_values and first["image_grid_thw"] is grid
    with torch.no_grad():
        model(**first)
    assert cache.get_seq_length() == enc["input_ids"].shape[1]
    later = model.prepare_inputs_for_generation(
        torch.cat([enc["input_ids"], enc["input_ids"][:, -1:]], 1), past_key_values=cache,
        pixel_values=pixel_values, image_grid_thw=grid, use_cache=True, next_sequence_length=1,
    )  # fmt: skip
    assert "pixel_values" not in later and "image_grid_thw" not in later
    assert later["input_ids"].shape == (1, 1)
    # a decode step ignores pixel_values even if a caller passes them (the images are already in the cache)
    step = {"input_ids": later["input_ids"],
            "attention_mask": torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long)}
    with torch.no_grad():
        text_step = model(**step, past_key_values=copy.deepcopy(cache)).logits
        image_step = model(**step, past_key_values=cache, pixel_values=pixel_values, image_grid_thw=grid).logits
    assert torch.equal(text_step, image_step)


def test_float32_and_bfloat16_models_run(sharded_ckpt, model, tokenizer, image_processor, images):
    pixel_values, grid = _vision_inputs(image_processor, images)
    enc = _prompt(tokenizer, grid)
    bf16 = DotsOCRForCausalLM.from_pretrained(sharded_ckpt, dtype=torch.bfloat16, attn_implementation="eager")
    assert bf16.dtype == torch.bfloat16 and bf16.vision_tower.dtype == torch.bfloat16
    assert bf16.config._attn_implementation == "eager" and bf16.vision_tower.attn_implementation == "eager"
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32
    with torch.no_grad():
        reference = model(**enc, pixel_values=pixel_values, image_grid_thw=grid).logits
        low = bf16(**enc, pixel_values=pixel_values, image_grid_thw=grid).logits
        generated = bf16.generate(**enc, pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=3,
                                  do_sample=False)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.25 * reference.abs().max()
    assert generated.shape[1] > enc["input_ids"].shape[1]
    assert DotsOCRForCausalLM.from_pretrained(sharded_ckpt, dtype="bfloat16").dtype == torch.bfloat16
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------
# structure of the release and an independent re-derivation of the vision math
# ------------------------------------------------------------------------------------------------


def test_release_config_builds_the_release_structure():
    config = DotsOCRConfig.from_dict(json.loads(json.dumps(OFFICIAL_CONFIG)))
    with torch.device("meta"):
        release = DotsOCRForCausalLM(config)
    total = sum(p.numel() for p in release.parameters())
    vision = sum(p.numel() for p in release.vision_tower.parameters())
    assert (total, vision) == (3_039_179_264, 1_262_091_264)  # the released parameter counts
    assert release.vision_tower.attn_implementation == "sdpa"  # not the json's "flash_attention_2"


def _reference_vision_features(state: dict, vision_config, pixel_values, grid_thw) -> torch.Tensor:
    """Section 5 written out plainly (float32, explicit loops, conv as a matmul, 2-D rotations per pair)."""
    E = vision_config.embed_dim
    H = vision_config.num_attention_heads
    D = E // H
    eps = vision_config.rms_norm_eps
    s = {k.removeprefix("vision_tower."): v.float() for k, v in state.items() if k.startswith("vision_tower.")}

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    x = pixel_values.to(torch.bfloat16).float()
    x = x @ s["patch_embed.patchifier.proj.weight"].reshape(E, -1).T + s["patch_embed.patchifier.proj.bias"]
    x = rms(x, s["patch_embed.patchifier.norm.weight"])

    # absolute (row, col) of each patch in processor order, and the image each patch belongs to
    rows, cols, image_of = [], [], []
    for index, (t, h, w) in enumerate(grid_thw.tolist()):
        for _ in range(t):
            for block_r in range(h // 2):
                for block_c in range(w // 2):
                    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
                        rows.append(2 * block_r + dr)
                        cols.append(2 * block_c + dc)
                        image_of.append(index)
    rows, cols, image_of = torch.tensor(rows).float(), torch.tensor(cols).float(), torch.tensor(image_of)
    quarter = D // 4
    inv_freq = 10000.0 ** (-torch.arange(quarter).float() * 2 / (D // 2))
    # dims (i, i + D/2) rotate by row * inv_freq[i] for i < D/4, by col * inv_freq[i - D/4] for D/4 <= i < D/2
    angle = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=1)  # [P, D/2]

    def rotate(v):  # v: [P, H, D]
        a, b = v[..., : D // 2], v[..., D // 2 :]
        c, sn = angle.cos()[:, None, :], angle.sin()[:, None, :]
        return torch.cat([a * c - b * sn, b * c + a * sn], dim=-1)

    same_image = image_of[:, None] == image_of[None, :]
    for j in range(vision_config.num_hidden_layers):
        p = f"blocks.{j}."
        h = rms(x, s[p + "norm1.weight"])
        qkv = h @ s[p + "attn.qkv.weight"].T
        q, k, v = (qkv[:, i * E : (i + 1) * E].reshape(-1, H, D) for i in range(3))
        q, k = rotate(q), rotate(k)
        scores = torch.einsum("phd,qhd->hpq", q, k) / D**0.5
        scores = scores.masked_fill(~same_image, float("-inf"))
        attn = torch.einsum("hpq,qhd->phd", scores.softmax(-1), v).reshape(-1, E)
        x = x + attn @ s[p + "attn.proj.weight"].T
        h = rms(x, s[p + "norm2.weight"])
        gate, up = h @ s[p + "mlp.fc1.weight"].T, h @ s[p + "mlp.fc3.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ s[p + "mlp.fc2.weight"].T
    x = rms(x, s["post_trunk_norm.weight"])
    x = torch.nn.functional.layer_norm(x, (E,), s["merger.ln_q.weight"], s["merger.ln_q.bias"], eps=1e-6)
    x = x.reshape(-1, 4 * E)
    x = torch.nn.functional.gelu(x @ s["merger.mlp.0.weight"].T + s["merger.mlp.0.bias"])
    return x @ s["merger.mlp.2.weight"].T + s["merger.mlp.2.bias"]


def test_vision_tower_matches_an_independent_reference(model, image_processor, images):
    pixel_values, grid = _vision_inputs(image_processor, images)
    with torch.no_grad():
        ours = model.vision_tower(pixel_values, grid).last_hidden_state
    reference = _reference_vision_features(model.state_dict(), model.config.vision_config, pixel_values, grid)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_generate_stops_at_either_eos(model, tokenizer):
    from transformers import LogitsProcessor, LogitsProcessorList

    enc = tokenizer("Extract the text.<|assistant|>", return_tensors="pt")
    plain = tokenizer("the text")["input_ids"]

    class Forced(LogitsProcessor):
        def __init__(self, tokens):
            self.tokens = tokens

        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - enc["input_ids"].shape[1]
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.tokens[step]] = 0.0
            return forced

    for eos in model.generation_config.eos_token_id:  # <|endoftext|> and <|endofassistant|>
        tokens = plain + [eos] + plain
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=10, do_sample=False,
                                 logits_processor=LogitsProcessorList([Forced(tokens)]))
        assert out[0, enc["input_ids"].shape[1] :].tolist() == plain + [eos]
