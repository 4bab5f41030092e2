"""Loading a checkpoint: which device, dtype and attention kernels, the model and processor read
from the folder's files, and the CUDA fast path (static cache + compiled decode step) built and
warmed up before the model is declared loaded."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .modeling_dots_ocr import flash_attn_available, resolve_dtype

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "resolve_device", "resolve_dtype", "resolve_attention", "load_checkpoint",
           "build_fast_path"]


@dataclass
class LoadedModel:
    """A checkpoint on its device: the model (eval mode), its processor, and how it was loaded."""

    model: Any  # DotsOCRForCausalLM
    processor: Any  # DotsOCRProcessor
    device: torch.device
    dtype: torch.dtype
    attention: tuple[str, str | None]  # (LLM attention, vision attention)
    seconds: float = 0.0


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for, but CUDA is not available "
                           "(install a CUDA build of torch, or use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def resolve_attention(attn: str, device: torch.device) -> tuple[str, str]:
    """(LLM attention, vision attention). auto: SDPA for the LLM; flash-attn's varlen kernel for
    the vision tower when it imports on CUDA, else SDPA."""
    if attn == "auto":
        vision = "flash_attention_2" if device.type == "cuda" and flash_attn_available() else "sdpa"
        return "sdpa", vision
    if attn == "flash_attention_2":
        if device.type != "cuda" or not flash_attn_available():
            raise RuntimeError("flash_attention_2 needs CUDA and the flash-attn package; "
                               "use --attn-implementation sdpa")
        return attn, attn
    if attn in ("sdpa", "eager"):
        return attn, attn
    raise ValueError(f"unsupported attention {attn!r}: use auto, sdpa, flash_attention_2 or eager")


def load_checkpoint(path: str | Path, device: str = "auto", dtype: str | torch.dtype = "auto",
                    attn_implementation: str = "auto") -> LoadedModel:
    """The model and processor of a checkpoint folder (config.json, safetensors, tokenizer files),
    with the device, dtype and attention resolved as above. Its Python files are never imported."""
    from .modeling_dots_ocr import DotsOCRForCausalLM
    from .processing import load_processor

    start = time.perf_counter()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no dots.ocr checkpoint at {path} (config.json missing)")
    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype, device_)
    llm_attn, vision_attn = resolve_attention(attn_implementation, device_)
    processor = load_processor(path)
    model = DotsOCRForCausalLM.from_pretrained(path, dtype=dtype_, device=device_, attn_implementation=llm_attn,
                                               vision_attn_implementation=vision_attn)
    # Every request sets max_new_tokens; the checkpoint's max_length (32768) would only make
    # transformers warn that both are set.
    model.generation_config.max_length = None
    return LoadedModel(model, processor, device_, dtype_, (llm_attn, vision_attn), time.perf_counter() - start)


def build_fast_path(model, processor, device: torch.device, *, slots: int, max_new_tokens_limit: int,
                    compile: bool | None = None, options: dict[str, Any] | None = None):
    """The warmed-up ``StaticDecoder`` (``slots`` rows) when the fast path is on (``compile``;
    None: on for CUDA, off on CPU), else None. A fast path that fails to build when it was not
    asked for explicitly is logged and left out (the plain path serves)."""
    enabled = compile if compile is not None else device.type == "cuda"
    if not enabled:
        return None
    from .fast_decode import StaticDecoder, default_max_cache_len

    options = dict(options or {})
    image = processor.image_processor
    cache_len = options.pop("max_cache_len", None) or default_max_cache_len(
        int(image.size["longest_edge"]), int(image.patch_size), int(image.merge_size), max_new_tokens_limit)
    # a small page compiles and records the decode step; on CUDA a letter page at 200 dpi
    # (158 x 122 patches) also warms the prefill kernels and the allocator for real pages
    grids = ((4, 4), (158, 122)) if device.type == "cuda" else ((4, 4),)
    try:
        decoder = StaticDecoder(model, cache_len, slots=slots, **options)
        seconds = decoder.warmup(grids)
    except Exception:
        if compile:  # asked for explicitly: fail loudly
            raise
        log.exception("the fast path failed to build or warm up; serving with the plain path")
        return None
    log.info("fast path: static cache of %d slots x %d tokens, decode step compiled (%s%s) for batch sizes %s "
             "and warmed up in %.1f s", decoder.slots, decoder.max_cache_len, decoder.backend,
             f", {decoder.mode}" if decoder.mode else "", list(decoder.batch_buckets), seconds)
    return decoder
