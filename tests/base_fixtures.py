"""Tiny local stand-ins for the base architectures a lab would fine-tune.

* ``sd2-base``: SD 2.1-base (512 px): OpenCLIP-style text encoder (GELU), linear projections
  in the UNet's transformers, epsilon prediction, PNDM.
* ``sd2-768``: SD 2.1 (768 px): as sd2-base with v-prediction, DDIM and upcast attention.
* ``sd1``: SD 1.x (RoentGen's base): CLIP ViT-L-style text encoder (quick GELU) of its own
  width, cross attention of that width, no linear projection, one head size for all blocks,
  epsilon prediction.

Widths are tiny; what differs between the real architectures (configs, scheduler, prediction
type) differs here in the same way.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from idc_diffusion.train.models import SD21_BASE_SCHEDULER, build_tiny_pipeline

VARIANTS = ("sd2-base", "sd2-768", "sd1")
SD1_WIDTH = 48  # the SD 1.x stand-in's text width (32 in the SD 2 stand-ins)


def tiny_variant(name: str, seed: int = 0, sample_size: int = 64) -> StableDiffusionPipeline:
    """The tiny pipeline of architecture `name` (one of VARIANTS), seeded."""
    pipe = build_tiny_pipeline(seed=seed, sample_size=sample_size)
    if name == "sd2-base":
        return pipe
    unet_config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    text_config = pipe.text_encoder.config.to_dict()
    if name == "sd2-768":
        unet_config["upcast_attention"] = True
        scheduler = DDIMScheduler.from_config(
            {**SD21_BASE_SCHEDULER, "prediction_type": "v_prediction"}
        )
    elif name == "sd1":
        unet_config.update(
            cross_attention_dim=SD1_WIDTH, use_linear_projection=False, attention_head_dim=8
        )
        text_config.update(
            hidden_size=SD1_WIDTH,
            intermediate_size=2 * SD1_WIDTH,
            projection_dim=SD1_WIDTH,
            hidden_act="quick_gelu",
        )
        scheduler = PNDMScheduler.from_config(SD21_BASE_SCHEDULER)
    else:
        raise ValueError(f"unknown variant {name!r}; one of {VARIANTS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    return StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=text_encoder.eval(),
        tokenizer=pipe.tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
