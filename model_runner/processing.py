"""The dots.ocr processor: tokenizer + image processor + prompt rendering, and the page geometry
(the 28-pixel smart resize): everything that turns a page and a prompt into the model's inputs
(:meth:`DotsOCRProcessor.page_inputs`), on the CPU, without the model.

The released checkpoint names a ``DotsVLProcessor`` (a thin subclass of Qwen2.5-VL's processor
that only switches the image token to ``<|imgpad|>``). That class lives in the checkpoint's own
Python files, which we never import, and the Qwen2.5-VL processor it builds on has changed its
behaviour across transformers releases. What it does for images is small, so it is
composed here from stable parts: transformers' tokenizer and ``Qwen2VLImageProcessor`` (both read
from the checkpoint folder), and the expansion of each image placeholder into one ``<|imgpad|>``
per image token.

Prompts are rendered as upstream's vLLM path renders them, which is how the published
numbers were produced: :meth:`DotsOCRProcessor.render_prompt` for one prompt, and
:meth:`DotsOCRProcessor.render_chat` for OpenAI-style messages, through the checkpoint's own chat
template.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase, Qwen2VLImageProcessor

from .decoding import GenerationInputError
from .prompts import GROUNDING_PROMPT_TYPE, PROMPT_TYPES, prompt_text, system_text

IMAGE_PAD = "<|imgpad|>"
IMAGE_START = "<|img|>"
IMAGE_END = "<|endofimg|>"
USER_START = "<|user|>"
USER_END = "<|endofuser|>"
ASSISTANT_START = "<|assistant|>"
# The checkpoint's chat templates write these literally; they are not tokens of the vocabulary,
# so they tokenize into ordinary pieces.
SYSTEM_START = "<|system|>"
SYSTEM_END = "<|endofsystem|>\n"
#: What stands for one image in a rendered prompt (vLLM's placeholder string for dots.ocr).
IMAGE_PLACEHOLDER = IMAGE_START + IMAGE_PAD + IMAGE_END
_IMAGE_PART_TYPES = ("image", "image_url", "input_image")


@dataclass(frozen=True)
class PageInputs:
    """One page and its prompt as the model reads them (CPU tensors; the generator moves them).

    ``tensors``: ``input_ids`` [1, L], ``attention_mask``, ``pixel_values`` [P, 588] float32,
    ``image_grid_thw`` [1, 3]. ``original_size`` / ``model_size``: (width, height) of the image
    given and of the resized model input (multiples of 28)."""

    tensors: BatchFeature
    original_size: tuple[int, int]
    model_size: tuple[int, int]

    @property
    def prompt_tokens(self) -> int:
        return int(self.tensors["input_ids"].shape[1])


@dataclass
class DotsOCRProcessor:
    tokenizer: PreTrainedTokenizerBase
    image_processor: Qwen2VLImageProcessor
    #: The checkpoint's chat_template.json template (None: the tokenizer's own template is used).
    chat_template: str | None = None

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    # -- geometry --------------------------------------------------------------------------------

    @property
    def pixel_limits(self) -> tuple[int, int]:
        """(min_pixels, max_pixels) of the checkpoint's image processor."""
        size = self.image_processor.size
        return int(size["shortest_edge"]), int(size["longest_edge"])

    def model_input_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the model input for an image of that size (the 28-px smart resize)."""
        from image_utils import smart_resize_dims

        min_pixels, max_pixels = self.pixel_limits
        return smart_resize_dims(width, height, min_pixels=min_pixels, max_pixels=max_pixels)

    # -- prompts ---------------------------------------------------------------------------------

    def page_inputs(self, image: Image.Image, prompt_type: str | None = None, *, bbox=None,
                    question: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None) -> PageInputs:
        """The model's inputs for ``image`` (resized to the model's size) and a prompt: the trained
        prompt of ``prompt_type`` (``bbox`` in original pixels for grounding, mapped to model pixels;
        ``question`` for ``prompt_general``), or, with ``messages`` (chat turns, as the OpenAI route
        receives them), :meth:`render_chat` of them. Raises ``GenerationInputError`` (a message for
        the client) for what the model cannot run."""
        from image_utils import ImageInputError, resize_for_model, to_model_coords

        if messages is None and prompt_type not in PROMPT_TYPES:
            raise GenerationInputError(f"Invalid prompt_type. Must be one of: {list(PROMPT_TYPES)}")
        image = image.convert("RGB") if image.mode != "RGB" else image
        original = image.size
        try:
            model_size = self.model_input_size(*original)
            min_pixels, max_pixels = self.pixel_limits
            resized = resize_for_model(image, min_pixels=min_pixels, max_pixels=max_pixels)
        except ImageInputError as exc:
            raise GenerationInputError(exc.message) from exc
        if messages is not None:
            try:
                text = self.render_chat(messages)
            except ValueError as exc:
                raise GenerationInputError(str(exc)) from None
        else:
            model_bbox = None
            if prompt_type == GROUNDING_PROMPT_TYPE:
                if bbox is None:
                    raise GenerationInputError("bbox is required for prompt_grounding_ocr")
                model_bbox = to_model_coords(bbox, original, model_size)
            try:
                user_text = prompt_text(prompt_type, model_bbox, image_size=original, question=question)
            except ValueError as exc:
                raise GenerationInputError(str(exc)) from None
            text = self.render_prompt(user_text, system=system_text(prompt_type))
        try:
            tensors = self(text=text, images=[resized])
        except ValueError as exc:  # e.g. a chat with no image placeholder, or several
            raise GenerationInputError(str(exc)) from exc
        return PageInputs(tensors=tensors, original_size=original, model_size=model_size)

    def render_prompt(self, prompt: str, n_images: int = 1, system: str | None = None) -> str:
        """The text the model was evaluated with, one placeholder pad per image:
        ``<|user|>`` + ``<|img|><|imgpad|><|endofimg|>`` per image + prompt + ``<|endofuser|><|assistant|>``.

        With ``system``, the system turn comes first as the checkpoint's chat template writes it:
        ``<|system|>`` + system + ``<|endofsystem|>`` + newline (:meth:`render_chat` of the same
        messages gives the same string; a test checks it).
        """
        head = SYSTEM_START + system + SYSTEM_END if system is not None else ""
        return head + USER_START + IMAGE_PLACEHOLDER * n_images + prompt + USER_END + ASSISTANT_START

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """Render OpenAI-style chat messages with the checkpoint's chat template, as upstream's vLLM
        server does, with one ``<|imgpad|>`` placeholder per image (``__call__`` expands them).

        ``messages``: dicts with ``role`` "system" / "user" / "assistant" and ``content`` either a
        string or a list of parts: ``{"type": "text", "text": ...}`` and image parts (``"type"``
        "image" / "image_url" / "input_image"; only user messages may hold images; their pixels are
        passed to ``__call__`` separately, in order). A list content is flattened to one string the
        way vLLM does for this model (its ``--chat-template-content-format string``): the text parts
        joined with newlines; images whose placeholder the text does not already hold are put in
        front, each followed by a newline. The result then goes through the template (the one from
        chat_template.json, which gives the same as tokenizer_config.json's for string contents)
        with the generation prompt. Upstream's message shape (an image part plus the text
        ``<|img|><|imgpad|><|endofimg|>`` + prompt, optionally after a system message) renders
        exactly as :meth:`render_prompt`. Raises ValueError for malformed messages.
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        flat = [_flatten_message(i, m) for i, m in enumerate(messages)]
        return self.tokenizer.apply_chat_template(flat, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

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
    from . import modeling_dots_ocr  # noqa: F401 - imported for its registration

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessor.from_pretrained(path)
    if tokenizer.convert_tokens_to_ids(IMAGE_PAD) in (None, tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer in {path} has no {IMAGE_PAD} token")
    return DotsOCRProcessor(tokenizer=tokenizer, image_processor=image_processor,
                            chat_template=_read_chat_template(path))


def _read_chat_template(path: Path) -> str | None:
    """The template of the folder's chat_template.json; None when the folder has none (then the
    tokenizer's template from tokenizer_config.json is used)."""
    file = path / "chat_template.json"
    if not file.is_file():
        return None
    template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
    if not isinstance(template, str) or not template:
        raise ValueError(f"{file} has no chat_template string")
    return template


def _part_text(part: Any, where: str) -> tuple[str | None, bool]:
    """-> (text, is_image) of one content part."""
    if not isinstance(part, Mapping):
        raise ValueError(f"{where}: each content part must be an object")
    kind = part.get("type")
    if kind in _IMAGE_PART_TYPES or (kind is None and any(k in part for k in _IMAGE_PART_TYPES)):
        return None, True
    if kind in ("text", None) and isinstance(part.get("text"), str):
        return part["text"], False
    raise ValueError(f"{where}: unsupported content part {kind!r} (text and image parts only)")


def _flatten_message(index: int, message: Any) -> dict[str, str]:
    """One message with its content as a single string (see :meth:`DotsOCRProcessor.render_chat`)."""
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise ValueError(f"{where} must be an object with 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"{where}.role must be 'system', 'user' or 'assistant'")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, Sequence) or isinstance(content, bytes):
        raise ValueError(f"{where}.content must be a string or a list of parts")
    texts, n_images = [], 0
    for part in content:
        text, is_image = _part_text(part, where)
        if is_image:
            n_images += 1
        else:
            texts.append(text)
    if n_images and role != "user":
        raise ValueError(f"{where}: only user messages may hold images")
    text = "\n".join(texts)
    missing = max(0, n_images - text.count(IMAGE_PLACEHOLDER))
    if missing:
        text = "\n".join([IMAGE_PLACEHOLDER] * missing + [text])
    return {"role": role, "content": text}
