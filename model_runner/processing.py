"""The dots.ocr processor: tokenizer + image processor + prompt rendering.

The released checkpoint names a ``DotsVLProcessor`` (a thin subclass of Qwen2.5-VL's processor
that only switches the image token to ``<|imgpad|>``). That class lives in the checkpoint's own
Python files, which we never import, and the Qwen2.5-VL processor it builds on has changed its
behaviour across transformers releases (MODEL.md §9). What it does for images is small, so it is
composed here from stable parts: transformers' tokenizer and ``Qwen2VLImageProcessor`` (both read
from the checkpoint folder), and the expansion of each image placeholder into one ``<|imgpad|>``
per image token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase, Qwen2VLImageProcessor

IMAGE_PAD = "<|imgpad|>"
IMAGE_START = "<|img|>"
IMAGE_END = "<|endofimg|>"
USER_START = "<|user|>"
USER_END = "<|endofuser|>"
ASSISTANT_START = "<|assistant|>"


@dataclass
class DotsOCRProcessor:
    tokenizer: PreTrainedTokenizerBase
    image_processor: Qwen2VLImageProcessor

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    def render_prompt(self, prompt: str, n_images: int = 1) -> str:
        """The text the model was evaluated with (DESIGN.md), one placeholder pad per image:
        ``<|user|>`` + ``<|img|><|imgpad|><|endofimg|>`` per image + prompt + ``<|endofuser|><|assistant|>``."""
        images = (IMAGE_START + IMAGE_PAD + IMAGE_END) * n_images
        return USER_START + images + prompt + USER_END + ASSISTANT_START

    def image_token_counts(self, image_grid_thw) -> list[int]:
        """LLM tokens per image: one per 2x2 block of 14-px patches."""
        merge = self.merge_size**2
        return [int(t * h * w) // merge for t, h, w in image_grid_thw.tolist()]

    def expand_image_pads(self, text: str, counts: Sequence[int]) -> str:
        """Replace the i-th ``<|imgpad|>`` placeholder with ``counts[i]`` copies."""
        parts = text.split(IMAGE_PAD)
        if len(parts) - 1 != len(counts):
            raise ValueError(f"the prompt has {len(parts) - 1} image placeholders for {len(counts)} images")
        out = [parts[0]]
        for count, rest in zip(counts, parts[1:]):
            out.append(IMAGE_PAD * count)
            out.append(rest)
        return "".join(out)

    def __call__(self, text: str | list[str], images: Sequence[Image.Image] | None = None,
                 return_tensors: str = "pt") -> BatchFeature:
        """Tokenize rendered prompt(s) and process their images, in order across the batch.

        Returns ``input_ids``, ``attention_mask`` and, with images, ``pixel_values`` [P, 588] and
        ``image_grid_thw`` [n_images, 3].
        """
        texts = [text] if isinstance(text, str) else list(text)
        data = {}
        if images:
            vision = self.image_processor(images=list(images), return_tensors=return_tensors)
            counts = self.image_token_counts(vision["image_grid_thw"])
            expanded, start = [], 0
            for t in texts:
                n = t.count(IMAGE_PAD)
                expanded.append(self.expand_image_pads(t, counts[start:start + n]))
                start += n
            if start != len(counts):
                raise ValueError(f"{len(counts)} images given for {start} image placeholders")
            texts = expanded
            data.update(vision)
        tokens = self.tokenizer(texts, return_tensors=return_tensors, padding=len(texts) > 1,
                                add_special_tokens=False)
        data.update(tokens)
        return BatchFeature(data=data)

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def load_processor(path: str | Path) -> DotsOCRProcessor:
    """The processor of a dots.ocr checkpoint folder: its tokenizer files and
    ``preprocessor_config.json`` (read into transformers' ``Qwen2VLImageProcessor``)."""
    # Importing the model module registers DotsOCRConfig for model_type "dots_ocr"; without it
    # AutoTokenizer sees the folder's auto_map and asks whether to trust its remote code.
    from . import modeling_dots_ocr  # noqa: F401

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessor.from_pretrained(path)
    if tokenizer.convert_tokens_to_ids(IMAGE_PAD) in (None, tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer in {path} has no {IMAGE_PAD} token")
    return DotsOCRProcessor(tokenizer=tokenizer, image_processor=image_processor)
