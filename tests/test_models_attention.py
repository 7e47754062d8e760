"""Attention for training: fp16 runs attention in float32 (no NaN), else SDPA or eager."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from idc_diffusion.attention import Float32SDPA, configure_attention
from idc_diffusion.models import build_tiny_pipeline


def overflowing_attention() -> tuple[Attention, torch.Tensor]:
    """An attention block whose query-key products overflow float16 (max 65504)."""
    torch.manual_seed(0)
    attention = Attention(32, heads=4, dim_head=8)
    with torch.no_grad():
        attention.to_q.weight.mul_(30)
        attention.to_k.weight.mul_(30)
    return attention, torch.randn(1, 16, 32) * 10


def test_fp16_upcast_avoids_nan() -> None:
    attention, x = overflowing_attention()
    attention.set_processor(AttnProcessor2_0())
    reference = attention(x)
    attention.set_processor(AttnProcessor())
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(attention(x)).all()  # the SD 2.1 fp16 failure
    attention.set_processor(Float32SDPA())
    with torch.autocast("cpu", dtype=torch.float16):
        upcast = attention(x)
    assert upcast.dtype == torch.float32
    assert torch.allclose(upcast, reference, atol=1e-4)


def test_configure_attention_picks_processors() -> None:
    unet = build_tiny_pipeline(seed=0).unet
    assert "float32" in configure_attention(unet, "sdpa", "fp16")
    assert all(isinstance(p, Float32SDPA) for p in unet.attn_processors.values())
    assert configure_attention(unet, "eager", "bf16") == "eager"
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    assert configure_attention(unet, "sdpa", "no") == "sdpa"
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    with pytest.raises(ValueError, match=r"train\.attention"):
        configure_attention(unet, "flash", "no")
