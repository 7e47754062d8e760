"""The demo's stand-in for a pretrained VAE: the tiny AutoencoderKL fitted on the train split.

Stable Diffusion 2.1's VAE already encodes CT, MR and radiographs well and stays frozen while
the UNet is fine-tuned. The ``tiny`` base model's VAE starts random, so before any UNet
training the ``base_model`` stage fits it briefly (seeded: the same images and settings give
the same weights) as a plain autoencoder: L1 reconstruction plus a small KL term, no
adversarial or perceptual loss. Its ``scaling_factor`` is then set as SD's was, to one over
the standard deviation of the train latents, and it is frozen (saved into the base
pipeline, which ``latents``, ``train`` and ``sample`` only read).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from idc_diffusion.train.latent_cache import encode_moments
from idc_diffusion.train.train_data import (
    image_resolution,
    load_images,
    read_split,
    seeded_generator,
)

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "steps": 400,
    "batch_size": 16,
    "learning_rate": 2e-3,
    "kl_weight": 1e-4,
}


def vae_loss(
    vae: AutoencoderKL, pixels: torch.Tensor, kl_weight: float, generator: torch.Generator
) -> torch.Tensor:
    """Mean absolute reconstruction error of a sampled latent plus ``kl_weight`` x KL."""
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.mean + posterior.std * torch.randn(
        posterior.mean.shape, generator=generator
    ).to(posterior.mean)
    reconstruction = vae.decode(latents).sample
    return (reconstruction - pixels).abs().mean() + kl_weight * posterior.kl().mean()


def fit_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    learning_rate: float,
    kl_weight: float,
    seed: int,
) -> list[float]:
    """Fit ``vae`` to ``images`` ([N, 3, H, W] in [-1, 1]) with AdamW and a cosine decay.

    Batches and noise come from generators seeded by ``seed``; returns the loss of every
    step. The VAE is left in eval mode with gradients off (frozen).
    """
    if not len(images):
        raise ValueError("tiny VAE: no training images to fit on")
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    order, noise = seeded_generator(seed, 1), seeded_generator(seed, 2)
    losses = []
    for _ in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=order)]
        loss = vae_loss(vae, batch, kl_weight, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """One over the standard deviation of the posterior means of ``images`` (SD's recipe)."""
    means, _ = encode_moments(vae, images)
    return float(1.0 / means.std().clamp_min(1e-6))


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean absolute error in grey levels (0-255) of decoding the posterior means."""
    errors = []
    for start in range(0, len(images), 16):
        batch = images[start : start + 16]
        decoded = vae.decode(vae.encode(batch).latent_dist.mean).sample
        errors.append((decoded.clamp(-1, 1) - batch).abs().sum())
    return float(torch.stack(errors).sum() / images.numel() * 127.5)


def fit_tiny_vae(
    pipeline: StableDiffusionPipeline,
    dataset_dir: Path,
    settings: Mapping[str, Any] | None,
    seed: int,
) -> dict[str, Any]:
    """Fit ``pipeline.vae`` on ``dataset_dir``'s train split, freeze it; its provenance.

    ``settings`` is ``train.tiny_vae`` (steps, batch_size, learning_rate, kl_weight; see
    :data:`DEFAULTS`). The returned record goes into the base model's manifest.
    """
    options = {**DEFAULTS, **(settings or {})}
    split = read_split(Path(dataset_dir), "train")
    if not len(split):
        raise ValueError(f"{split.metadata}: no training images to fit the tiny VAE on")
    resolution = image_resolution(split)
    if resolution != pipeline.vae.config.sample_size:
        raise ValueError(
            f"{split.metadata}: images are {resolution} px but the tiny model is built for "
            f"{pipeline.vae.config.sample_size} px; rerun with prepare.resolution matching"
        )
    images = load_images(split.paths)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        losses = fit_vae(
            pipeline.vae,
            images,
            int(options["steps"]),
            int(options["batch_size"]),
            float(options["learning_rate"]),
            float(options["kl_weight"]),
            seed,
        )
    scale = latent_scaling_factor(pipeline.vae, images)
    pipeline.vae.register_to_config(scaling_factor=scale)
    error = reconstruction_error(pipeline.vae, images)
    log.info(
        "tiny VAE fitted on %d images in %.1f s: loss %.4f -> %.4f, reconstruction error %.2f "
        "grey levels, latent scaling factor %.4f",
        len(images), time.perf_counter() - started, losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"), error, scale,
    )  # fmt: skip
    return {
        **options,
        "seed": seed,
        "train_images": len(images),
        "final_loss": losses[-1] if losses else None,
        "reconstruction_error_grey_levels": round(error, 3),
        "scaling_factor": scale,
    }
