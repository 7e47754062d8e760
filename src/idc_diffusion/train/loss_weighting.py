"""Loss weighting and noise recipes: Min-SNR-γ weights and offset noise (pure tensor math).

Min-SNR-γ (Hang et al., 2023) clamps each timestep's signal-to-noise ratio at γ. Written as
a weight on the MSE of the model's own target: for epsilon prediction the weight is
``min(SNR, γ) / SNR``; for v-prediction, whose MSE already carries a factor ``SNR + 1``
relative to the epsilon loss, it is ``min(SNR, γ) / (SNR + 1)``.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) of each timestep (float32)."""
    alpha = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]  # no host round trip
    return alpha / (1.0 - alpha)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ for the scheduler's prediction type."""
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    clamped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clamped / snr_t
    if prediction_type == "v_prediction":
        return clamped / (snr_t + 1.0)
    raise ValueError(f"Min-SNR weighting: unsupported prediction_type {prediction_type!r}")


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample MSE in float32, times `weights` when given."""
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
    return per_sample if weights is None else per_sample * weights.to(per_sample)


def offset_noise(noise: torch.Tensor, offsets: torch.Tensor, strength: float) -> torch.Tensor:
    """Noise plus a per-sample, per-channel constant (`offsets` of shape [N, C])."""
    return noise + strength * offsets.to(noise).view(*offsets.shape, 1, 1)
