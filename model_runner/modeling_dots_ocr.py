"""dots.ocr model: configuration, vision tower, LLM wrapper and a strict checkpoint loader.

Everything the released checkpoint ``rednote-hilab/dots.ocr`` needs, in one file, top to bottom:

1. ``DotsVisionConfig`` / ``DotsOCRConfig``      configuration classes (read the official config.json)
2. vision tower building blocks                  RMSNorm, patch embedding, 2-D rotary, attention, SwiGLU MLP,
                                                 pre-norm block, patch merger
3. ``DotsVisionTransformer``                      the 42-block ViT + 2x2 patch merger
4. ``DotsOCRForCausalLM``                         stock transformers Qwen2 LLM + ``vision_tower``; image
                                                 embeddings replace the ``<|imgpad|>`` positions (section 6)
5. ``DotsOCRForCausalLM.from_pretrained``         our own deterministic, strict safetensors loader

Shape legend used in comments:
    P   number of vision patches of all images together  (sum of t*h*w over images)
    E   vision width (``embed_dim``, 1536 in the release)
    H   vision heads (12), D = E / H vision head dim (128)
    M   spatial merge size (2), so P / M**2 merged vision tokens
    B   batch size, L sequence length, C LLM hidden size (1536)

No code from the checkpoint folder is ever imported or executed (no ``trust_remote_code``).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.configuration_utils import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "DotsVisionConfig",
    "DotsOCRConfig",
    "DotsVisionOutput",
    "DotsVisionTransformer",
    "DotsOCRForCausalLM",
    "VISION_ATTN_IMPLEMENTATIONS",
    "LLM_ATTN_IMPLEMENTATIONS",
    "flash_attn_available",
    "resolve_dtype",
]

# Attention implementations we accept.
VISION_ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
LLM_ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")

# Constants hard-coded in the released vision code (not part of config.json).
VISION_ROPE_THETA = 10000.0
MERGER_LAYERNORM_EPS = 1e-6


class CheckpointError(ValueError):
    """The checkpoint folder does not match the model (missing/unexpected tensors, wrong shapes, bad files)."""


# ================================================================================================
# 1. Configuration
# ================================================================================================


class DotsVisionConfig(PretrainedConfig):
    """``vision_config`` of config.json (field names exactly as released, defaults = the release)."""

    model_type = "dots_vit"
    base_config_key = "vision_config"

    embed_dim: int = 1536  # ViT width E
    hidden_size: int = 1536  # output width of the patch merger (= LLM hidden size)
    intermediate_size: int = 4224  # SwiGLU hidden width
    num_hidden_layers: int = 42
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 14
    post_norm: bool = True
    rms_norm_eps: float = 1e-5
    spatial_merge_size: int = 2
    temporal_patch_size: int = 1
    use_bias: bool = False  # bias of the Linear layers of the blocks (the patch conv always has one)
    # The released json says "flash_attention_2". We keep the field for fidelity, but the attention actually
    # used is chosen by the constructor argument of DotsVisionTransformer (see there).
    attn_implementation: str | None = "flash_attention_2"
    is_causal: bool = False
    initializer_range: float = 0.02
    init_merger_std: float = 0.02
    gradient_checkpointing: bool = False


class DotsOCRConfig(Qwen2Config):
    """Top-level config: the Qwen2 LLM fields plus ``image_token_id``, ``video_token_id`` and ``vision_config``.

    transformers 5 moves ``rope_theta``/``rope_scaling`` of a json into ``rope_parameters``
    (``{"rope_type": "default", "rope_theta": 1000000}`` for the release); the Qwen2 rotary embedding reads it
    from there.
    """

    model_type = "dots_ocr"
    sub_configs_defaults = {"vision_config": DotsVisionConfig}
    default_theta = 1000000.0  # used only when a json has no rope_theta at all

    # Release values as defaults (config.json always provides them anyway).
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 2
    max_position_embeddings: int = 131072
    sliding_window: int | None = 131072
    max_window_layers: int = 28

    image_token_id: int = 151665  # <|imgpad|>
    video_token_id: int = 151656  # <|video_pad|>
    vision_config: dict | PretrainedConfig | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not isinstance(self.vision_config, DotsVisionConfig):  # e.g. a foreign PretrainedConfig object
            self.vision_config = DotsVisionConfig(**self.vision_config.to_dict())


# ================================================================================================
# 2. Vision tower building blocks
# ================================================================================================


class VisionRMSNorm(nn.Module):
    """y = weight * (x * rsqrt(mean(x^2) + eps)); normalisation in float32, cast back before the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x_float = x.to(torch.float32)
        x_float = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_float.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class VisionPatchifier(nn.Module):
    """Conv2d(C -> E, kernel = stride = patch) with bias, then RMSNorm.  Names: ``proj``, ``norm``."""

    def __init__(self, config: DotsVisionConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.temporal_patch_size = config.temporal_patch_size
        self.patch_size = config.patch_size
        self.embed_dim = config.embed_dim
        self.proj = nn.Conv2d(
            config.num_channels, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size, bias=True
        )
        self.norm = VisionRMSNorm(config.embed_dim, eps=config.rms_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [P, C * T * p * p], each row ordered (channel, temporal, y, x)
        patches = pixel_values.view(-1, self.num_channels, self.temporal_patch_size, self.patch_size, self.patch_size)
        patches = patches[:, :, 0]  # [P, C, p, p]  (temporal slice 0; temporal_patch_size is 1 in the release)
        embeddings = self.proj(patches).view(-1, self.embed_dim)  # [P, E]
        return self.norm(embeddings)  # [P, E]


class VisionPatchEmbed(nn.Module):
    """Wrapper that only exists to reproduce the checkpoint names ``patch_embed.patchifier.*``."""

    def __init__(self, config: DotsVisionConfig):
        super().__init__()
        self.patchifier = VisionPatchifier(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.patchifier(pixel_values)


class VisionRotaryEmbedding(nn.Module):
    """1-D rotary table ``T[p, k] = p * theta^(-2k/dim)`` (float32); ``dim`` = head_dim / 2 = 64."""

    def __init__(self, dim: int, theta: float = VISION_ROPE_THETA):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)  # [dim / 2]

    def compute_inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        return 1.0 / (self.theta**exponent)

    def reset_inv_freq(self, device: torch.device | str) -> None:
        """Recompute the (non-persistent) buffer on ``device`` in float32."""
        self.inv_freq = self.compute_inv_freq(device=device)

    def forward(self, num_positions: int) -> torch.Tensor:
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:  # e.g. after model.to(torch.bfloat16): do not use a rounded table
            inv_freq = self.compute_inv_freq(device=inv_freq.device)
        positions = torch.arange(num_positions, device=inv_freq.device, dtype=torch.float32)
        return torch.outer(positions, inv_freq)  # [num_positions, dim / 2]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [P, H, D]; cos/sin: [P, D] float32. Computed in float32, rounded once to x.dtype."""
    x_float = x.float()
    out = x_float * cos.unsqueeze(1) + rotate_half(x_float) * sin.unsqueeze(1)
    return out.to(x.dtype)


_flash_attn_varlen_func = None
_flash_attn_import_tried = False


def _get_flash_attn_varlen_func():
    global _flash_attn_varlen_func, _flash_attn_import_tried
    if not _flash_attn_import_tried:
        _flash_attn_import_tried = True
        try:
            from flash_attn import flash_attn_varlen_func  # type: ignore

            _flash_attn_varlen_func = flash_attn_varlen_func
        except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA build
            _flash_attn_varlen_func = None
    return _flash_attn_varlen_func


def flash_attn_available() -> bool:
    """True when ``flash_attn`` imports (a CUDA tensor is additionally needed to use it)."""
    return _get_flash_attn_varlen_func() is not None


_warned_flash_fallback = False


def _warn_flash_fallback(reason: str) -> None:
    global _warned_flash_fallback
    if not _warned_flash_fallback:
        _warned_flash_fallback = True
        logger.warning("vision attention 'flash_attention_2' unavailable (%s); falling back to 'sdpa'", reason)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention inside each image segment.  Names: ``qkv`` (fused), ``proj``."""

    def __init__(self, config: DotsVisionConfig):
        super().__init__()
        self.embed_dim = config.embed_dim
        self.num_heads = config.num_attention_heads
        self.head_dim = config.embed_dim // config.num_attention_heads
        self.is_causal = bool(config.is_causal)
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=config.use_bias)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim, bias=config.use_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [P, E]
        rotary_cos: torch.Tensor,  # [P, D] float32
        rotary_sin: torch.Tensor,  # [P, D] float32
        cu_seqlens: torch.Tensor,  # [segments + 1] int32
        attn_implementation: str,
    ) -> torch.Tensor:
        num_patches = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).view(num_patches, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(dim=1)  # each [P, H, D]
        query = apply_vision_rotary(query, rotary_cos, rotary_sin)
        key = apply_vision_rotary(key, rotary_cos, rotary_sin)

        if attn_implementation == "flash_attention_2":
            attn_output = self._flash_attention(query, key, value, cu_seqlens)
            if attn_output is None:
                attn_implementation = "sdpa"
        if attn_implementation == "sdpa":
            attn_output = self._sdpa_attention(query, key, value, cu_seqlens)
        elif attn_implementation == "eager":
            attn_output = self._eager_attention(query, key, value, cu_seqlens)
        elif attn_implementation != "flash_attention_2":
            raise ValueError(f"unknown vision attention implementation {attn_implementation!r}")

        attn_output = attn_output.reshape(num_patches, self.embed_dim)  # [P, E]
        return self.proj(attn_output)

    @staticmethod
    def _segments(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
        bounds = cu_seqlens.tolist()
        return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]

    def _flash_attention(self, query, key, value, cu_seqlens) -> torch.Tensor | None:
        flash_fn = _get_flash_attn_varlen_func()
        if flash_fn is None:
            _warn_flash_fallback("flash_attn is not installed")
            return None
        if not query.is_cuda:
            _warn_flash_fallback("tensors are not on CUDA")
            return None
        if query.dtype not in (torch.float16, torch.bfloat16):
            _warn_flash_fallback(f"dtype {query.dtype} is not fp16/bf16")
            return None
        cu_seqlens = cu_seqlens.to(device=query.device, dtype=torch.int32)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
        return flash_fn(
            query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=self.is_causal
        )  # [P, H, D]

    def _sdpa_attention(self, query, key, value, cu_seqlens) -> torch.Tensor:
        segments = self._segments(cu_seqlens)
        outputs = []
        for start, end in segments:
            # [L, H, D] -> [1, H, L, D]
            q = query[start:end].transpose(0, 1).unsqueeze(0)
            k = key[start:end].transpose(0, 1).unsqueeze(0)
            v = value[start:end].transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)  # [1, H, L, D]
            outputs.append(out.squeeze(0).transpose(0, 1))  # [L, H, D]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)  # [P, H, D]

    def _eager_attention(self, query, key, value, cu_seqlens) -> torch.Tensor:
        outputs = []
        for start, end in self._segments(cu_seqlens):
            q = query[start:end].transpose(0, 1)  # [H, L, D]
            k = key[start:end].transpose(0, 1)
            v = value[start:end].transpose(0, 1)
            scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(self.head_dim)  # [H, L, L]
            if self.is_causal:
                length = end - start
                causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
                scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            outputs.append(torch.matmul(probs, v).transpose(0, 1))  # [L, H, D]
        return torch.cat(outputs, dim=0)  # [P, H, D]


class VisionSwiGLU(nn.Module):
    """fc2(silu(fc1(x)) * fc3(x)); fc1 = gate branch, fc3 = linear ("up") branch, fc2 = down."""

    def __init__(self, config: DotsVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.intermediate_size, bias=config.use_bias)
        self.fc3 = nn.Linear(config.embed_dim, config.intermediate_size, bias=config.use_bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.embed_dim, bias=config.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class DotsVisionBlock(nn.Module):
    """Pre-norm transformer block: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, config: DotsVisionConfig):
        super().__init__()
        self.norm1 = VisionRMSNorm(config.embed_dim, eps=config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = VisionRMSNorm(config.embed_dim, eps=config.rms_norm_eps)
        self.mlp = VisionSwiGLU(config)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [P, E]
        rotary_cos: torch.Tensor,
        rotary_sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        attn_implementation: str = "sdpa",
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(
            self.norm1(hidden_states), rotary_cos, rotary_sin, cu_seqlens, attn_implementation
        )
        hidden_states = hidden_states + self.mlp(self.norm2(hidden_states))
        return hidden_states  # [P, E]


class VisionPatchMerger(nn.Module):
    """LayerNorm per patch, concatenate each 2x2 block of patches, Linear -> GELU(erf) -> Linear.

    Names: ``ln_q``, ``mlp.0``, ``mlp.2`` (``mlp.1`` is the parameter-free GELU).
    """

    def __init__(self, config: DotsVisionConfig):
        super().__init__()
        self.merged_dim = config.embed_dim * config.spatial_merge_size**2  # E * M^2
        self.ln_q = nn.LayerNorm(config.embed_dim, eps=MERGER_LAYERNORM_EPS)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim, bias=True),
            nn.GELU(),
            nn.Linear(self.merged_dim, config.hidden_size, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x).view(-1, self.merged_dim)  # [P, E] -> [P / M^2, E * M^2]
        return self.mlp(x)  # [P / M^2, hidden_size]


# ================================================================================================
# 3. Vision tower
# ================================================================================================


@dataclass
class DotsVisionOutput(ModelOutput):
    """``last_hidden_state``: merged features [P / M^2, hidden_size].

    ``hidden_states`` (only with ``output_hidden_states=True``): tuple of num_hidden_layers + 1 tensors [P, E]:
    index 0 = patch embeddings (after the patch RMSNorm), index j + 1 = output of block j
    (before ``post_trunk_norm``).
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class DotsVisionTransformer(nn.Module):
    """The dots.ocr ViT.  A plain ``nn.Module`` (hooks on ``blocks[j]`` work).

    ``attn_implementation``: "sdpa" (default; per image segment, never an N x N mask), "flash_attention_2"
    (``flash_attn_varlen_func``; falls back to sdpa with a warning when flash_attn is missing, tensors are not
    on CUDA or the dtype is fp32), or "eager" (explicit float32 softmax, per segment, for debugging).
    The json's ``vision_config.attn_implementation`` is intentionally NOT used to choose.
    """

    def __init__(self, config: DotsVisionConfig, attn_implementation: str | None = None):
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        self.attn_implementation = attn_implementation or "sdpa"

        head_dim = config.embed_dim // config.num_attention_heads
        self.patch_embed = VisionPatchEmbed(config)
        self.rotary_pos_emb = VisionRotaryEmbedding(head_dim // 2, theta=VISION_ROPE_THETA)
        self.blocks = nn.ModuleList([DotsVisionBlock(config) for _ in range(config.num_hidden_layers)])
        self.post_trunk_norm = VisionRMSNorm(config.embed_dim, eps=config.rms_norm_eps) if config.post_norm else None
        self.merger = VisionPatchMerger(config)

    # -- attention choice ------------------------------------------------------------------------
    @property
    def attn_implementation(self) -> str:
        return self._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        if value not in VISION_ATTN_IMPLEMENTATIONS:
            raise ValueError(f"vision attn_implementation must be one of {VISION_ATTN_IMPLEMENTATIONS}, got {value!r}")
        self._attn_implementation = value

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.patchifier.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.patchifier.proj.weight.device

    # -- positions -------------------------------------------------------------------------------
    def patch_row_col_ids(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """[P, 2] absolute (row, col) of every patch, in the processor's order (2x2 blocks row-major,
        inside a block top-left, top-right, bottom-left, bottom-right); repeated for every t."""
        merge = self.spatial_merge_size
        ids = []
        for t, h, w in grid_thw.tolist():
            rows = torch.arange(h).unsqueeze(1).expand(h, w)  # [h, w]
            cols = torch.arange(w).unsqueeze(0).expand(h, w)  # [h, w]
            rows = rows.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).reshape(-1)
            cols = cols.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).reshape(-1)
            ids.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))  # [t*h*w, 2]
        return torch.cat(ids, dim=0)

    def rotary_cos_sin(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [P, D] float32: angles [T[row], T[col]] (64 values) duplicated to D = 128."""
        row_col = self.patch_row_col_ids(grid_thw).to(self.rotary_pos_emb.inv_freq.device)  # [P, 2]
        max_side = int(grid_thw[:, 1:].max().item())
        table = self.rotary_pos_emb(max_side)  # [max_side, D / 4]
        angles = table[row_col].flatten(1)  # [P, D / 2]
        angles = torch.cat([angles, angles], dim=-1)  # [P, D]
        return angles.cos(), angles.sin()

    @staticmethod
    def segment_boundaries(grid_thw: torch.Tensor) -> torch.Tensor:
        """cu_seqlens [segments + 1] int32: one segment per image and temporal frame."""
        lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0), value=0)

    def _check_inputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> None:
        cfg = self.config
        row_size = cfg.num_channels * cfg.temporal_patch_size * cfg.patch_size**2
        if pixel_values.dim() != 2 or pixel_values.shape[1] != row_size:
            raise ValueError(f"pixel_values must be [num_patches, {row_size}], got {tuple(pixel_values.shape)}")
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
            raise ValueError(f"grid_thw must be [num_images, 3], got {tuple(grid_thw.shape)}")
        if (grid_thw[:, 1:] % self.spatial_merge_size != 0).any() or (grid_thw <= 0).any():
            raise ValueError(f"grid_thw heights/widths must be positive multiples of {self.spatial_merge_size}")
        expected = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum().item())
        if pixel_values.shape[0] != expected:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but grid_thw describes {expected} patches")

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,  # [P, C * T * p * p]
        grid_thw: torch.Tensor,  # [num_images, 3] (t, h, w) in patches
        output_hidden_states: bool = False,
    ) -> DotsVisionOutput:
        grid_thw = torch.as_tensor(grid_thw).to(device="cpu", dtype=torch.long)
        self._check_inputs(pixel_values, grid_thw)

        # The release always rounds the pixels to bf16 first; then we cast to the tower's own dtype so that
        # fp32 / fp16 / bf16 towers all work.
        pixel_values = pixel_values.to(device=self.device, dtype=torch.bfloat16).to(self.dtype)

        hidden_states = self.patch_embed(pixel_values)  # [P, E]
        rotary_cos, rotary_sin = self.rotary_cos_sin(grid_thw)  # [P, D] each, float32
        rotary_cos, rotary_sin = rotary_cos.to(hidden_states.device), rotary_sin.to(hidden_states.device)
        cu_seqlens = self.segment_boundaries(grid_thw).to(hidden_states.device)  # [segments + 1]

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for block in self.blocks:
            hidden_states = block(hidden_states, rotary_cos, rotary_sin, cu_seqlens, self.attn_implementation)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)

        if self.post_trunk_norm is not None:
            hidden_states = self.post_trunk_norm(hidden_states)
        merged = self.merger(hidden_states)  # [P / M^2, hidden_size]
        return DotsVisionOutput(last_hidden_state=merged, hidden_states=all_hidden_states)


# ================================================================================================
# 4. Vision-language model
# ================================================================================================


@functools.cache
def _llm_cache_argument() -> str:
    """The name under which the installed transformers' Qwen2 takes its KV cache: ``past_key_values``
    up to 5.23, ``cache`` from 5.24 on. Our forward accepts both and passes the right one on."""
    return "cache" if "cache" in inspect.signature(Qwen2ForCausalLM.forward).parameters else "past_key_values"


def _cache_length(past_key_values: Any) -> int:
    """Number of tokens already in the KV cache (0 for None / an empty cache)."""
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    try:  # legacy tuple-of-tuples cache
        return int(past_key_values[0][0].shape[-2])
    except (IndexError, TypeError):
        return 0


class DotsOCRForCausalLM(Qwen2ForCausalLM):
    """Stock transformers ``Qwen2ForCausalLM`` (``model.*`` + ``lm_head``) plus ``vision_tower``."""

    config_class = DotsOCRConfig
    _no_split_modules = ["Qwen2DecoderLayer", "DotsVisionBlock"]

    def __init__(self, config: DotsOCRConfig, vision_attn_implementation: str | None = None):
        super().__init__(config)
        self.vision_tower = DotsVisionTransformer(config.vision_config, attn_implementation=vision_attn_implementation)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VisionRotaryEmbedding) and module.inv_freq.device.type != "meta":
            with torch.no_grad():
                module.inv_freq.copy_(module.compute_inv_freq(device=module.inv_freq.device))

    # -- image features -----------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """[sum(t*h*w) / 4, hidden_size] merged vision features, in image order."""
        return self.vision_tower(pixel_values, image_grid_thw).last_hidden_state

    def merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Write the image rows, in (batch, sequence) order, into the ``<|imgpad|>`` positions."""
        image_mask = input_ids == self.config.image_token_id  # [B, L]
        num_image_tokens = int(image_mask.sum().item())
        if num_image_tokens != image_features.shape[0]:
            raise ValueError(
                f"the prompt has {num_image_tokens} image tokens (id {self.config.image_token_id}) but the images "
                f"produce {image_features.shape[0]} features; expand each <|imgpad|> to (h/2)*(w/2) copies"
            )
        image_mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds)  # [B, L, C]
        image_features = image_features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask, image_features)

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        # accepted for compatibility; Qwen2 in transformers 5 ignores it
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        kwargs.pop("mm_token_type_ids", None)  # some processors emit it; the model does not use it
        # transformers >= 5.24 calls the KV cache `cache`; accept either name.
        cache = kwargs.pop("cache", None)
        past_key_values = past_key_values if past_key_values is not None else cache

        # Images are consumed only at prefill (empty cache); decode steps ignore pixel_values.
        is_prefill = _cache_length(past_key_values) == 0
        if pixel_values is not None and is_prefill:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids to locate the <|imgpad|> positions")
            if image_grid_thw is None:
                raise ValueError("pixel_values were given without image_grid_thw")
            if inputs_embeds is None:
                inputs_embeds = self.model.embed_tokens(input_ids)  # [B, L, C]
            image_features = self.get_image_features(pixel_values, image_grid_thw)  # [N, C]
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
            input_ids = None

        if output_hidden_states is not None:
            kwargs["output_hidden_states"] = output_hidden_states
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{_llm_cache_argument(): past_key_values},
            **kwargs,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Any = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        is_first_iteration: bool | None = None,
        **kwargs,
    ) -> dict:
        """Stock preparation, plus: pixel_values / image_grid_thw only while the KV cache is empty.

        transformers 5 ``generate`` no longer creates ``cache_position``; prefill is therefore recognised from the
        cache itself (None or zero length).  Without a cache (use_cache=False) every step is a full forward and
        the images are passed every time.
        """
        kwargs.pop("cache_position", None)
        kwargs.pop("mm_token_type_ids", None)
        cache = past_key_values if past_key_values is not None else kwargs.pop("cache", None)
        kwargs[_llm_cache_argument()] = cache
        if is_first_iteration is not None:
            kwargs["is_first_iteration"] = is_first_iteration
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        model_inputs.pop("cache_position", None)
        if is_first_iteration or _cache_length(cache) == 0:
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_grid_thw"] = image_grid_thw
        else:
            model_inputs.pop("pixel_values", None)
            model_inputs.pop("image_grid_thw", None)
        return model_inputs

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        attn_implementation: str = "sdpa",
        vision_attn_implementation: str | None = None,
    ) -> "DotsOCRForCausalLM":
        """Strict, deterministic loader for a local checkpoint folder (never runs code from the folder).

        dtype: None/"auto" -> bfloat16 on CUDA, float32 otherwise.  attn_implementation: the Qwen2 LLM attention
        ("sdpa", "eager", "flash_attention_2").  vision_attn_implementation: None -> follows the LLM choice.
        Raises CheckpointError naming every missing / unexpected / mis-shaped tensor.
        """
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a checkpoint folder (no config.json)")
        device = torch.device(device)
        dtype = resolve_dtype(dtype, device)
        if attn_implementation not in LLM_ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {LLM_ATTN_IMPLEMENTATIONS}, "
                             f"got {attn_implementation!r}")
        if vision_attn_implementation is None:
            vision_attn_implementation = attn_implementation
        if vision_attn_implementation not in VISION_ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"vision_attn_implementation must be one of {VISION_ATTN_IMPLEMENTATIONS}, "
                f"got {vision_attn_implementation!r}"
            )

        config = DotsOCRConfig.from_pretrained(str(folder))
        config._attn_implementation = attn_implementation
        config.dtype = dtype

        # 1. module tree on the meta device: no memory, no random init
        with torch.device("meta"):
            model = cls(config, vision_attn_implementation=vision_attn_implementation)

        # 2. read + verify the tensors, cast, move, assign
        expected_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        state_dict = _read_checkpoint_tensors(folder, expected_shapes, dtype=dtype, device=device)
        model.load_state_dict(state_dict, strict=True, assign=True)
        del state_dict

        # 3. non-persistent buffers are not in the checkpoint: recompute them on the target device, float32
        model._recompute_non_persistent_buffers(device)

        # 4. generation defaults (both eos ids) from generation_config.json
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(folder))

        model.config.name_or_path = str(folder)
        model.config._attn_implementation = attn_implementation
        model.eval()
        return model

    def _recompute_non_persistent_buffers(self, device: torch.device) -> None:
        self.vision_tower.rotary_pos_emb.reset_inv_freq(device)
        llm_rotary = self.model.rotary_emb
        with torch.device(device):
            fresh = type(llm_rotary)(config=self.config)  # runs the rope init of the configured rope type
        llm_rotary.inv_freq = fresh.inv_freq.to(device=device, dtype=torch.float32)
        llm_rotary.original_inv_freq = fresh.original_inv_freq.to(device=device, dtype=torch.float32)
        llm_rotary.attention_scaling = fresh.attention_scaling
        leftovers = [name for name, buf in self.named_buffers() if buf.is_meta]
        if leftovers:
            raise RuntimeError(f"buffers left uninitialised after loading: {leftovers}")


# ================================================================================================
# 5. Checkpoint reading helpers
# ================================================================================================


def resolve_dtype(dtype: torch.dtype | str | None = "auto", device: torch.device | None = None) -> torch.dtype:
    """auto (or None): bfloat16 on CUDA (the released dtype), float32 elsewhere; a torch dtype, or
    its name ("bfloat16", "float16", "float32") or short name ("bf16", "fp16", "half", "fp32")."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype)).replace("torch.", "")
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unsupported dtype {dtype!r}: use auto, bfloat16, float16 or float32")
    return resolved


def _format_names(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def checkpoint_tensor_locations(folder: str | Path) -> dict[str, Path]:
    """tensor name -> safetensors file, from ``model.safetensors`` or ``model.safetensors.index.json``."""
    from safetensors import safe_open

    folder = Path(folder)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(str(single), framework="pt", device="cpu") as handle:
            return {name: single for name in handle.keys()}
    if not index.is_file():
        raise CheckpointError(f"{folder}: neither model.safetensors nor model.safetensors.index.json found")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err

    locations: dict[str, Path] = {}
    for name, shard_name in weight_map.items():
        if Path(shard_name).is_absolute() or ".." in Path(shard_name).parts:
            raise CheckpointError(f"{index}: shard path {shard_name!r} leaves the checkpoint folder")
        locations[name] = folder / shard_name
    for shard in sorted(set(locations.values())):
        if not shard.is_file():
            raise CheckpointError(f"{index}: shard {shard.name} is missing")
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            in_shard = set(handle.keys())
        listed = {name for name, where in locations.items() if where == shard}
        if listed - in_shard:
            raise CheckpointError(f"shard {shard.name} lacks tensors its index lists: "
                                  f"{_format_names(listed - in_shard)}")
        if in_shard - listed:
            raise CheckpointError(
                f"shard {shard.name} holds tensors the index does not list for it: {_format_names(in_shard - listed)}"
            )
    return locations


def _read_checkpoint_tensors(
    folder: Path, expected_shapes: dict[str, tuple[int, ...]], *, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    locations = checkpoint_tensor_locations(folder)
    missing = set(expected_shapes) - set(locations)
    unexpected = set(locations) - set(expected_shapes)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_format_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_format_names(unexpected)}")
    if problems:
        raise CheckpointError(f"{folder} does not match DotsOCRForCausalLM: " + "; ".join(problems))

    by_file: dict[Path, list[str]] = {}
    for name, file in locations.items():
        by_file.setdefault(file, []).append(name)

    # shapes first (header only), so that a mismatch is reported before any data is read
    mismatched = []
    for file, names in sorted(by_file.items()):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in names:
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != expected_shapes[name]:
                    mismatched.append(f"{name}: checkpoint {list(shape)} vs model {list(expected_shapes[name])}")
    if mismatched:
        raise CheckpointError("shape mismatch: " + "; ".join(sorted(mismatched)))

    state_dict: dict[str, torch.Tensor] = {}
    for file, names in sorted(by_file.items()):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in sorted(names):
                tensor = handle.get_tensor(name)
                if not tensor.is_floating_point():
                    raise CheckpointError(f"{name}: expected a floating point tensor, got {tensor.dtype}")
                state_dict[name] = tensor.to(device=device, dtype=dtype).contiguous()
    return state_dict


# Let AutoConfig (and therefore AutoTokenizer / AutoProcessor, which read config.json) resolve "dots_ocr" to our
# class instead of asking for trust_remote_code because of the json's auto_map.  The model class is deliberately
# NOT registered with AutoModel: use DotsOCRForCausalLM.from_pretrained (our strict loader).
def _register_auto_config() -> None:
    from transformers import AutoConfig

    for config_class in (DotsVisionConfig, DotsOCRConfig):
        try:
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        except (TypeError, ValueError) as err:  # pragma: no cover - depends on the transformers version
            logger.debug("AutoConfig.register(%s) failed: %s", config_class.model_type, err)


_register_auto_config()
