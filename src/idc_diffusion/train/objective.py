"""The denoising objective: the random draws of a micro-batch, VAE latents, the scheduler's
target and the per-sample loss, and the held-out loss with fixed draws."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler

from idc_diffusion.train import latent_cache
from idc_diffusion.train.loss_weighting import (
    PREDICTION_TYPES,
    min_snr_weights,
    snr,
    weighted_mse,
)
from idc_diffusion.train.train_data import seeded_generator, tokenize


def prediction_target(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the UNet learns: the noise (epsilon) or the velocity (v_prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; supported: {PREDICTION_TYPES}")


def latent_shape(vae: torch.nn.Module, resolution: int) -> tuple[int, int, int]:
    """(channels, height, width) of the VAE latents of a `resolution` px square."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.latent_channels, resolution // factor, resolution // factor)


def draw_noise(
    generator: torch.Generator, count: int, shape: tuple[int, int, int], num_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU draws, in a fixed order: VAE posterior noise, diffusion noise, timesteps."""
    eps = torch.randn((count, *shape), generator=generator)
    noise = torch.randn((count, *shape), generator=generator)
    timesteps = torch.randint(0, num_timesteps, (count,), generator=generator)
    return eps, noise, timesteps


@dataclass
class Draws:
    """Every random choice of one micro-batch (CPU tensors); the options' extras are None
    when the option is off, so enabling one never changes the draws before it."""

    eps: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    offsets: torch.Tensor | None = None  # [N, C] offset-noise directions
    drop: torch.Tensor | None = None  # [N] bool: caption replaced by ""
    flip: torch.Tensor | None = None  # [N] bool: mirrored left-right


def draw_batch(
    generator: torch.Generator,
    count: int,
    shape: tuple[int, int, int],
    num_timesteps: int,
    settings: Mapping[str, Any],
) -> Draws:
    """draw_noise, then the extras of noise_offset, caption_dropout and random_flip."""
    draws = Draws(*draw_noise(generator, count, shape, num_timesteps))
    if settings["noise_offset"]:
        draws.offsets = torch.randn((count, shape[0]), generator=generator)
    if settings["caption_dropout"]:
        draws.drop = torch.rand(count, generator=generator) < settings["caption_dropout"]
    if settings["random_flip"]:
        draws.flip = torch.rand(count, generator=generator) < 0.5
    return draws


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor, scaling: float
) -> torch.Tensor:
    """A VAE posterior sample ``mean + std * eps``, times the VAE scaling factor."""
    return (mean + std * eps.to(mean)) * scaling


@torch.no_grad()
def encode_batch(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std of a pixel batch (in the VAE's dtype)."""
    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def flipped(x: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """`x` with the samples marked in `flip` mirrored along the width."""
    if flip is None:
        return x
    return torch.where(flip.to(x.device).view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


def denoising_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Per-sample MSE of the UNet's prediction against the scheduler's target.

    With `min_snr_gamma`, each sample is weighted by Min-SNR-γ for the prediction type.
    """
    weights = None
    if min_snr_gamma:
        snr_t = snr(scheduler.alphas_cumprod, timesteps)
        weights = min_snr_weights(snr_t, min_snr_gamma, scheduler.config.prediction_type)
    with torch.no_grad():
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = prediction_target(scheduler, latents, noise, timesteps)
    pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
    return weighted_mse(pred, target, weights)


def heldout_loss_from_moments(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    scheduler: DDPMScheduler,
    mean: torch.Tensor,
    std: torch.Tensor,
    captions: Sequence[str],
    seed: int,
    scaling: float,
    batch_size: int = 8,
) -> float:
    """Mean (unweighted) denoising loss of held-out latent moments, with fixed draws.

    Image i's noise and timestep come from a generator seeded by (seed, i), so two UNets
    evaluated with the same arguments see identical latents, noise and timesteps, whatever
    the batch size.
    """
    if len(mean) == 0:
        return float("nan")
    shape, steps = tuple(mean.shape[1:]), scheduler.config.num_train_timesteps
    per_image = [
        draw_noise(seeded_generator(seed, 0xE7A1, i), 1, shape, steps) for i in range(len(mean))
    ]
    input_ids = tokenize(tokenizer, captions)
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(mean), batch_size):
                chunk = slice(start, start + batch_size)
                eps, noise, timesteps = (
                    torch.cat(parts).to(device) for parts in zip(*per_image[chunk], strict=True)
                )
                latents = sample_latents(
                    mean[chunk].to(device), std[chunk].to(device), eps, scaling
                )
                hidden = text_encoder(input_ids[chunk].to(device), return_dict=False)[0]
                losses = denoising_loss(
                    unet, scheduler, latents, noise.to(latents.dtype), timesteps, hidden
                )
                total += float(losses.sum())
    finally:
        unet.train(was_training)
    return total / len(mean)


def heldout_loss(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    captions: Sequence[str],
    seed: int,
    batch_size: int = 8,
) -> float:
    """heldout_loss_from_moments of `images` ([N, 3, H, W] in [-1, 1]) encoded by `vae`."""
    if len(images) == 0:
        return float("nan")
    mean, std = latent_cache.encode_moments(vae, images, batch_size)
    return heldout_loss_from_moments(
        unet, text_encoder, tokenizer, scheduler, mean, std, captions, seed,
        vae.config.scaling_factor, batch_size,
    )  # fmt: skip
