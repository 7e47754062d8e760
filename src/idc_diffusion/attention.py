"""Attention processors for training: PyTorch SDPA, or SDPA computed in float32 for fp16.

Stable Diffusion 2.x overflows float16 in its attention scores (NaN losses, black images),
which is why its UNet config asks for ``upcast_attention``. Under autocast a module's own
upcast is undone (autocast casts the matmuls back to float16), so for fp16 training the
whole attention block runs with autocast off, in float32.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

MODES = ("sdpa", "eager")


class Float32SDPA(AttnProcessor2_0):
    """AttnProcessor2_0 with autocast disabled and float32 inputs (output is float32)."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, *args, **kw):
        with torch.autocast(hidden_states.device.type, enabled=False):
            hidden_states = hidden_states.float()
            if encoder_hidden_states is not None:
                encoder_hidden_states = encoder_hidden_states.float()
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kw)


def configure_attention(unet: torch.nn.Module, attention: str, mixed_precision: str) -> str:
    """Set the UNet's attention processors; returns a description for the log.

    fp16 always gets :class:`Float32SDPA` (needs float32 UNet weights); otherwise
    ``attention`` picks SDPA (``torch.nn.functional.scaled_dot_product_attention``) or the
    eager matmul-softmax-matmul processor.
    """
    if attention not in MODES:
        raise ValueError(f"train.attention must be one of {MODES}, got {attention!r}")
    if mixed_precision == "fp16":
        unet.set_attn_processor(Float32SDPA())
        return "sdpa in float32 (fp16 training: upcast attention)"
    unet.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())
    return attention
