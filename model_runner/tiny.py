"""A tiny random dots.ocr checkpoint in exactly the official layout (for tests and CPU smoke runs).

``build_tiny_checkpoint(out_dir, seed=0, shards=2, family="dots.ocr")`` writes, in a few seconds and
well under a few MB:

- ``config.json``                 every key of the official config.json, tiny sizes, tiny token ids
- ``model-0000k-of-0000K.safetensors`` + ``model.safetensors.index.json`` (``shards >= 2``) or a single
  ``model.safetensors`` (``shards == 1``); bf16 tensors with the official names
- ``tokenizer.json``               a byte-level BPE (256 byte tokens + a few hundred merges learnt from a
  built-in text) followed by the 45 official added tokens in the official order
- ``tokenizer_config.json``, ``special_tokens_map.json``, ``preprocessor_config.json``,
  ``generation_config.json``, ``chat_template.json``  (official content; tiny ids where ids appear)

The output is byte-for-byte deterministic for a given seed. ``family="dots.mocr"`` writes the layout of
the dots.mocr / dots.mocr-svg checkpoints (dots.ocr 1.5): the same files, dimensions and weight names,
except :data:`MOCR_VISION_ATTN_IMPLEMENTATION` in config.json's ``vision_config`` and an ``auto_map``
entry for the processor in preprocessor_config.json (:data:`MOCR_PREPROCESSOR_AUTO_MAP`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# ------------------------------------------------------------------------------------------------
# Official facts of the released checkpoint (rednote-hilab/dots.ocr): its config.json and file layout
# ------------------------------------------------------------------------------------------------

OFFICIAL_CONFIG = {
    "architectures": ["DotsOCRForCausalLM"],
    "model_type": "dots_ocr",
    "auto_map": {
        "AutoConfig": "configuration_dots.DotsOCRConfig",
        "AutoModelForCausalLM": "modeling_dots_ocr.DotsOCRForCausalLM",
    },
    "attention_bias": True,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
    "image_token_id": 151665,
    "video_token_id": 151656,
    "vision_config": {
        "embed_dim": 1536,
        "hidden_size": 1536,
        "intermediate_size": 4224,
        "num_hidden_layers": 42,
        "num_attention_heads": 12,
        "num_channels": 3,
        "patch_size": 14,
        "post_norm": True,
        "rms_norm_eps": 1e-05,
        "spatial_merge_size": 2,
        "temporal_patch_size": 1,
        "use_bias": False,
        "attn_implementation": "flash_attention_2",
        "init_merger_std": 0.02,
        "initializer_range": 0.02,
        "is_causal": False,
    },
}

# Tiny sizes (LLM head_dim 16, vision head_dim 16).
TINY_LLM = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
TINY_VISION = {
    "embed_dim": 64,
    "hidden_size": 64,  # = LLM hidden size
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
}

OFFICIAL_FIRST_ADDED_ID = 151643
# (content, special) in official id order 151643 .. 151687
OFFICIAL_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<|imgpad|>", True), ("<|img|>", True),
    ("<|endofimg|>", True), ("<|systemprompt|>", True), ("<|endofsystemprompt|>", True),
    ("<|user|>", True), ("<|endofuser|>", True), ("<|assistant|>", True),
    ("<|endofassistant|>", True), ("<|ref_start|>", True), ("<|ref_end|>", True),
    ("[SEP]", True), ("<|pic|>", True), ("<|text|>", True),
    ("<|pictotext|>", True), ("[PAD]", True), ("<|slice|>", True),
    ("<|endofslice|>", True), ("<|imgrowend|>", True), ("<|polygon_start|>", True),
    ("<|polygon_end|>", True), ("<|image_gen_start|>", True), ("<|image_gen_end|>", True),
]  # fmt: skip

OFFICIAL_ADDITIONAL_SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

TEXT_CHAT_TEMPLATE = (
    "{%- for m in messages %}\n    {%- if m.role == 'system' %}\n        {{- '<|system|>' + m.content + "
    "'<|endofsystem|>\\n' }}\n    {%- elif m.role == 'user' %}\n        {{- '<|user|>' + m.content + "
    "'<|endofuser|>' }}\n    {%- elif m.role == 'assistant' %}\n        {{- '<|assistant|>' + m.content }}\n"
    "        {%- if not loop.last %}\n            {{- '<|endofassistant|>' }}\n        {%- endif %}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- if messages[-1].role != 'assistant' %}\n    {{- '<|assistant|>' }}\n"
    "{%- endif %}"
)

PROCESSOR_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{%- for m in messages %}"
    "{%- if m.role == 'system' %}{{- '<|system|>' + m.content + '<|endofsystem|>\n' }}{%- elif m.role == 'user' %}"
    "{% if m.content is string %}{{- '<|user|>' + m.content + '<|endofuser|>' }}{% else %} "
    "{% for content in m.content %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|img|><|imgpad|><|endofimg|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|img|><|video_pad|><|endofimg|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{%- endif %}{%- elif m.role == 'assistant' %}{{- '<|assistant|>' + m.content }}"
    "{%- if not loop.last %}{{- '<|endofassistant|>' }}{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if messages[-1].role != 'assistant' %}{{- '<|assistant|>' }}{%- endif %}"
)

OFFICIAL_PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 11289600,
    "patch_size": 14,
    "temporal_patch_size": 1,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "DotsVLProcessor",
}

OFFICIAL_GENERATION_MAX_LENGTH = 32768

# dots.mocr (rednote-hilab/dots.mocr, dots.mocr-svg) differs from dots.ocr only in these two fields
# (facts read from a copy of the published config.json / preprocessor_config.json; the loader ignores
# both: the vision attention is chosen at load time, and the processor is composed in processing.py).
FAMILIES = ("dots.ocr", "dots.mocr")
MOCR_VISION_ATTN_IMPLEMENTATION = "sdpa"
MOCR_PREPROCESSOR_AUTO_MAP = {"AutoProcessor": "configuration_dots.DotsVLProcessor"}

# The pre-tokenizer split of the Qwen2 tokenizer (transformers' Qwen2Tokenizer rebuilds the same pipeline).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_BPE_MERGES = 320

# Small built-in training text for the tiny BPE (document-parsing flavoured: prose, markdown, html, latex, json).
TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. Document parsing turns a page image into structured text.
Each layout element has a bounding box, a category and the text inside it, in reading order.
Categories are Caption, Footnote, Formula, List-item, Page-footer, Page-header, Picture, Section-header,
Table, Text and Title. Formulas are written in LaTeX, tables in HTML and everything else in Markdown.
# Introduction
This report describes the results of the experiments on the new dataset. The model reads the page and
outputs the text content of the image. Please extract the text content from this image.
## Results
| Model | Accuracy | Speed |
| --- | --- | --- |
| base | 91.2 | 10.5 |
| large | 94.8 | 4.1 |
<table><tr><td>Name</td><td>Value</td></tr><tr><td>alpha</td><td>0.25</td></tr></table>
$$E = mc^2$$ and $\\alpha + \\beta = \\gamma$, \\frac{a}{b} = \\sum_{i=1}^{n} x_i^2 .
[{"bbox": [163, 241, 1536, 705], "category": "Text", "text": "Hello world"},
 {"bbox": [10, 20, 300, 400], "category": "Title", "text": "Annual report 2024"}]
- first item of the list
- second item of the list
1. Numbered entry one
2. Numbered entry two
The committee met on Monday, 3 March 2025, at 10:30 in the main hall of the university library.
Page 12 of 48. Copyright (c) 2025 by the authors. All rights reserved.
In the beginning there was the word, and the word was written on paper, scanned and read again.
Figure 3: The distribution of the values over the training set and the validation set.
Table 2: Comparison with other methods on the benchmark; higher is better.
"""


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def build_tiny_tokenizer():
    """A deterministic byte-level BPE + the official added tokens (in order). Returns a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=256 + NUM_BPE_MERGES,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = [line for line in TRAINING_TEXT.splitlines(keepends=True) if line.strip()]
    tokenizer.train_from_iterator(lines * 3, trainer=trainer)

    base = tokenizer.get_vocab_size()
    for offset, (content, special) in enumerate(OFFICIAL_ADDED_TOKENS):
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        if tokenizer.token_to_id(content) != base + offset:
            raise RuntimeError(f"added token {content!r} did not get id {base + offset}")
    return tokenizer


def tiny_token_ids(tokenizer) -> dict[str, int]:
    return {content: tokenizer.token_to_id(content) for content, _ in OFFICIAL_ADDED_TOKENS}


def _tokenizer_config(ids: dict[str, int]) -> dict:
    added = {}
    for content, special in OFFICIAL_ADDED_TOKENS:
        added[str(ids[content])] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(OFFICIAL_ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": None,
        "chat_template": TEXT_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "[PAD]",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _special_tokens_map() -> dict:
    return {
        "additional_special_tokens": list(OFFICIAL_ADDITIONAL_SPECIAL_TOKENS),
        "eos_token": {
            "content": "<|endoftext|>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "pad_token": "[PAD]",
    }


# ------------------------------------------------------------------------------------------------
# Config and weights
# ------------------------------------------------------------------------------------------------


def tiny_config_dict(vocab_size: int, image_token_id: int, video_token_id: int,
                     family: str = "dots.ocr") -> dict:
    """The official config.json of ``family`` (same keys, same order) with tiny sizes and tiny token ids."""
    _check_family(family)
    config = json.loads(json.dumps(OFFICIAL_CONFIG))
    config.update(TINY_LLM)
    config["vocab_size"] = vocab_size
    config["image_token_id"] = image_token_id
    config["video_token_id"] = video_token_id
    config["vision_config"].update(TINY_VISION)
    if family == "dots.mocr":
        config["vision_config"]["attn_implementation"] = MOCR_VISION_ATTN_IMPLEMENTATION
    return config


def preprocessor_config_dict(family: str = "dots.ocr") -> dict:
    """preprocessor_config.json of ``family`` (dots.mocr: ``auto_map`` first, as published)."""
    _check_family(family)
    config = dict(OFFICIAL_PREPROCESSOR_CONFIG)
    if family == "dots.mocr":
        config = {"auto_map": dict(MOCR_PREPROCESSOR_AUTO_MAP), **config}
    return config


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")


def _random_weights(config_dict: dict, seed: int) -> dict[str, torch.Tensor]:
    """bf16 tensors for every checkpoint name of the model built from ``config_dict`` (sorted, fixed generator).

    Init (kept away from a degenerate, near-uniform model): Linear/Conv weights N(0, 1/fan_in) so that
    activations stay O(1) and attention is peaked; embeddings N(0, 1); biases N(0, 0.02^2);
    norm weights 1 + N(0, 0.05^2); LayerNorm bias N(0, 0.02^2).
    """
    from .modeling_dots_ocr import DotsOCRConfig, DotsOCRForCausalLM

    config = DotsOCRConfig.from_dict(json.loads(json.dumps(config_dict)))
    with torch.device("meta"):
        model = DotsOCRForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tensors = {}
    for name in sorted(shapes):
        noise = torch.randn(shapes[name], generator=generator, dtype=torch.float32)
        tensors[name] = scale_init_noise(name, noise).to(torch.bfloat16).contiguous()
    return tensors


_NORM_SUFFIXES = ("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight", "ln_q.weight")


def scale_init_noise(name: str, noise: torch.Tensor) -> torch.Tensor:
    """Turn standard-normal ``noise`` into the random value of the tensor ``name`` (the recipe of
    ``_random_weights``; also used for full-size random models by scripts/bench_pipeline.py)."""
    if name.endswith(_NORM_SUFFIXES):
        return 1.0 + 0.05 * noise
    if name.endswith(".bias"):
        return 0.02 * noise
    if name == "model.embed_tokens.weight":
        return noise
    return noise / math.sqrt(math.prod(noise.shape[1:]))  # Linear / Conv weight [out, in, ...]


def _write_weights(out_dir: Path, tensors: dict[str, torch.Tensor], shards: int) -> list[str]:
    from safetensors.torch import save_file

    names = sorted(tensors)
    metadata = {"format": "pt"}
    if shards == 1:
        save_file({n: tensors[n] for n in names}, str(out_dir / "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]

    # contiguous groups of the sorted names with roughly equal byte sizes
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(shards)]
    running = 0
    for name, size in zip(names, sizes):
        index = min(shards - 1, running * shards // total)
        groups[index].append(name)
        running += size
    groups = [g for g in groups if g]
    written, weight_map = [], {}
    for k, group in enumerate(groups, start=1):
        file_name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out_dir / file_name), metadata=metadata)
        weight_map.update({n: file_name for n in group})
        written.append(file_name)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out_dir / "model.safetensors.index.json", index, indent=2)
    written.append("model.safetensors.index.json")
    return written


def _write_json(path: Path, data: dict, indent: int, trailing_newline: bool = True) -> None:
    text = json.dumps(data, indent=indent, ensure_ascii=False)
    path.write_text(text + ("\n" if trailing_newline else ""), encoding="utf-8")


def build_tiny_checkpoint(out_dir: str | Path, seed: int = 0, shards: int = 2,
                          family: str = "dots.ocr") -> Path:
    """Write the tiny checkpoint of ``family`` ("dots.ocr" or "dots.mocr") into ``out_dir`` (created
    if needed) and return its path. Both families get the same weights for the same seed."""
    if shards < 1:
        raise ValueError("shards must be >= 1")
    _check_family(family)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
        stale.unlink()

    tokenizer = build_tiny_tokenizer()
    ids = tiny_token_ids(tokenizer)
    vocab_size = -(-tokenizer.get_vocab_size() // 64) * 64  # round up to a multiple of 64

    config = tiny_config_dict(vocab_size, ids["<|imgpad|>"], ids["<|video_pad|>"], family)
    _write_json(out_dir / "config.json", config, indent=4)
    _write_weights(out_dir, _random_weights(config, seed), shards)

    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(ids), indent=2)
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map(), indent=2)
    _write_json(out_dir / "preprocessor_config.json", preprocessor_config_dict(family), indent=2)
    generation = {
        "max_length": OFFICIAL_GENERATION_MAX_LENGTH,
        "eos_token_id": [ids["<|endoftext|>"], ids["<|endofassistant|>"]],
    }
    _write_json(out_dir / "generation_config.json", generation, indent=2)
    _write_json(out_dir / "chat_template.json", {"chat_template": PROCESSOR_CHAT_TEMPLATE}, indent=4,
                trailing_newline=False)
    return out_dir
