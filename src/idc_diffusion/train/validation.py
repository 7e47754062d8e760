"""Validation during training: a fixed, seeded grid of prompts rendered with the current UNet.

``results/model/validation/step-<N>.png``: one row per prompt, ``images_per_prompt``
columns; image (i, j) always uses the seed ``(seed, i, j)``, so grids of different steps
differ only by the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from idc_diffusion.train.train_data import seeded_generator


def grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Images of equal size tiled row by row."""
    if not images:
        raise ValueError("no images for the validation grid")
    width, height = images[0].size
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * width, rows * height))
    for k, image in enumerate(images):
        canvas.paste(image.convert("RGB"), ((k % columns) * width, (k // columns) * height))
    return canvas


@torch.no_grad()
def render_prompts(
    pipeline: Any,
    prompts: Sequence[str],
    images_per_prompt: int,
    seed: int,
    steps: int,
    guidance_scale: float,
) -> list[Image.Image]:
    """Images for each prompt (row-major), each from its own seeded generator.

    `pipeline` is anything with the pipeline's vae, text_encoder, tokenizer, unet and
    scheduler attributes; rendering uses DDIM with the scheduler's config.
    """
    device = pipeline.unet.device
    pipe = StableDiffusionPipeline(
        vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
        unet=pipeline.unet, scheduler=DDIMScheduler.from_config(pipeline.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i, prompt in enumerate(prompts):
        for j in range(images_per_prompt):
            generator = seeded_generator(seed, 0x7A11, i, j)
            shape = (1, pipe.unet.config.in_channels, *([pipe.unet.config.sample_size] * 2))
            latents = torch.randn(shape, generator=generator).to(device, pipe.unet.dtype)
            out = pipe(
                prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                latents=latents, output_type="np",
            ).images[0]  # fmt: skip
            images.append(Image.fromarray((np.clip(out, 0, 1) * 255).round().astype(np.uint8)))
    return images


def save_validation_grid(
    pipeline: Any,
    prompts: Sequence[str],
    out_dir: Path,
    step: int,
    images_per_prompt: int = 2,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 4.0,
) -> Path:
    """Render and save ``out_dir/validation/step-<step>.png``; returns its path."""
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    try:
        images = render_prompts(pipeline, prompts, images_per_prompt, seed, steps, guidance_scale)
    finally:
        pipeline.unet.train(was_training)
    path = Path(out_dir) / "validation" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, images_per_prompt).save(path)
    return path
