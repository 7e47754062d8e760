"""Attention processors for training: PyTorch SDPA, or the eager matmul-softmax-matmul.

Stable Diffusion 2.x overflows float16 in its attention scores when they are materialised
in float16 (NaN losses, black images), which is why its UNet config asks for
``upcast_attention``; under autocast the eager processor's upcast is undone (autocast casts
its matmuls back to float16). PyTorch's SDPA kernels (flash, memory-efficient, and the CPU
one) never materialise the scores in float16: they accumulate the products and the softmax
in float32. So fp16 training uses SDPA, with the projections in float16 like the rest.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

MODES = ("sdpa", "eager")


def configure_attention(unet: torch.nn.Module, attention: str, mixed_precision: str) -> str:
    """Set the UNet's attention processors; returns a description for the log.

    ``attention`` picks SDPA (``torch.nn.functional.scaled_dot_product_attention``) or the
    eager processor; fp16 always gets SDPA (the eager one overflows there).
    """
    if attention not in MODES:
        raise ValueError(f"train.attention must be one of {MODES}, got {attention!r}")
    if mixed_precision == "fp16":
        unet.set_attn_processor(AttnProcessor2_0())
        return "sdpa (fp16: its kernels accumulate the scores in float32)"
    unet.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())
    return attention
