"""Attention for training: fp16 runs SDPA (no NaN, unlike eager), else SDPA or eager."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from idc_diffusion.train.attention import configure_attention
from idc_diffusion.train.models import build_tiny_pipeline


def overflowing_attention() -> tuple[Attention, torch.Tensor]:
    """An attention block whose query-key products overflow float16 (max 65504)."""
    torch.manual_seed(0)
    attention = Attention(32, heads=4, dim_head=8)
    with torch.no_grad():
        attention.to_q.weight.mul_(30)
        attention.to_k.weight.mul_(30)
    return attention, torch.randn(1, 16, 32) * 10


def test_fp16_sdpa_avoids_nan() -> None:
    attention, x = overflowing_attention()
    attention.set_processor(AttnProcessor2_0())
    reference = attention(x)
    attention.set_processor(AttnProcessor())
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(attention(x)).all()  # the SD 2.1 fp16 failure
    attention.set_processor(AttnProcessor2_0())
    with torch.autocast("cpu", dtype=torch.float16):
        fused = attention(x)
    assert fused.dtype == torch.float16  # no float32 detour: the scores accumulate in float32
    assert torch.allclose(fused.float(), reference, atol=2e-2 * reference.abs().max().item())


def test_configure_attention_picks_processors() -> None:
    unet = build_tiny_pipeline(seed=0).unet
    assert configure_attention(unet, "eager", "fp16").startswith("sdpa")
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert configure_attention(unet, "eager", "bf16") == "eager"
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    assert configure_attention(unet, "sdpa", "no") == "sdpa"
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    with pytest.raises(ValueError, match=r"train\.attention"):
        configure_attention(unet, "flash", "no")
