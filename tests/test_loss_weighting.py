"""Min-SNR-γ weights for both prediction types, and offset noise."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from idc_diffusion.train.loss_weighting import min_snr_weights, offset_noise, snr, weighted_mse
from idc_diffusion.train.models import SD21_BASE_SCHEDULER


def test_snr_matches_alphas() -> None:
    scheduler = DDPMScheduler.from_config(SD21_BASE_SCHEDULER)
    t = torch.tensor([0, 500, 999])
    a = scheduler.alphas_cumprod[t]
    assert torch.allclose(snr(scheduler.alphas_cumprod, t), a / (1 - a))
    assert snr(scheduler.alphas_cumprod, t).diff().lt(0).all()  # SNR falls with t


def test_weights_clamp_at_gamma() -> None:
    values = torch.tensor([0.5, 5.0, 50.0])
    eps = min_snr_weights(values, 5.0, "epsilon")
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 0.1]))
    v = min_snr_weights(values, 5.0, "v_prediction")
    assert torch.allclose(v, torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 51.0]))
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(values, 5.0, "sample")
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weights(values, 0.0, "epsilon")


def test_both_prediction_types_weight_the_same_x0_error() -> None:
    """One model output expressed as epsilon or v gets the same weighted loss:
    min(SNR, γ) times the x0 error, the definition of Min-SNR-γ."""
    torch.manual_seed(0)
    scheduler = DDPMScheduler.from_config(SD21_BASE_SCHEDULER)
    t = torch.tensor([5, 100, 400, 800, 990])
    x0, eps = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    x0_hat = x0 + 0.3 * torch.randn_like(x0)
    a = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    eps_hat = (x_t - a * x0_hat) / s
    v, v_hat = scheduler.get_velocity(x0, eps, t), a * eps_hat - s * x0_hat
    snr_t, gamma = snr(scheduler.alphas_cumprod, t), 5.0
    want = torch.clamp(snr_t, max=gamma) * weighted_mse(x0_hat, x0)
    got_eps = weighted_mse(eps_hat, eps, min_snr_weights(snr_t, gamma, "epsilon"))
    got_v = weighted_mse(v_hat, v, min_snr_weights(snr_t, gamma, "v_prediction"))
    assert torch.allclose(got_eps, want, rtol=1e-4)
    assert torch.allclose(got_v, want, rtol=1e-4)


def test_offset_noise_shifts_each_channel_by_a_constant() -> None:
    noise, offsets = torch.zeros(2, 4, 3, 3), torch.arange(8.0).view(2, 4)
    out = offset_noise(noise, offsets, 0.1)
    assert out.shape == noise.shape
    assert torch.allclose(out[1, 2], torch.full((3, 3), 0.6))
    assert torch.equal(offset_noise(noise, offsets, 0.0), noise)
