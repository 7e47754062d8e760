"""What training optimizes and how: the trained parameters (the full UNet or LoRA adapters,
the text encoder optionally), their groups and learning rates, the optimizer and the
learning-rate schedule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.optimization import get_scheduler


def trainable_parameters(
    settings: Mapping[str, Any], unet: torch.nn.Module, text_encoder: torch.nn.Module
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Set up the mode (full or LoRA adapters); returns the UNet's and text encoder's
    trainable parameters (the latter empty unless train_text_encoder)."""
    train_text = settings["train_text_encoder"]
    if settings["mode"] == "lora":
        from idc_diffusion.train.lora import add_lora

        add_lora(unet, settings["lora_rank"], settings["lora_alpha"])
        if train_text:
            add_lora(text_encoder, settings["lora_rank"], settings["lora_alpha"], text=True)
        else:
            text_encoder.requires_grad_(False)
    else:
        unet.requires_grad_(True)
        text_encoder.requires_grad_(train_text)
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    text_params = [p for p in text_encoder.parameters() if p.requires_grad] if train_text else []
    return unet_params, text_params


def parameter_groups(
    settings: Mapping[str, Any],
    unet_params: list[torch.nn.Parameter],
    text_params: list[torch.nn.Parameter],
) -> list[dict]:
    """The optimizer's groups: the UNet at learning_rate, a trained text encoder at
    text_encoder_learning_rate (learning_rate when unset)."""
    groups = [{"params": unet_params, "lr": settings["learning_rate"]}]
    if text_params:
        text_lr = settings["text_encoder_learning_rate"] or settings["learning_rate"]
        groups.append({"params": text_params, "lr": text_lr})
    return groups


def make_optimizer(settings: Mapping[str, Any], groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (torch) or 8-bit AdamW (bitsandbytes) over parameter groups with their own lr.

    torch's AdamW runs its fused kernel where `fusable`, except under fp16: there the
    GradScaler skips an overflowing step inside a fused kernel, unseen by accelerate, which
    would then advance the LR schedule on a skipped step.
    """
    hyper = {
        "lr": settings["learning_rate"],
        "betas": (settings["adam_beta1"], settings["adam_beta2"]),
        "weight_decay": settings["adam_weight_decay"],
        "eps": settings["adam_epsilon"],
    }
    if settings["optimizer"] == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **hyper)
    fused = fusable(groups) and settings["mixed_precision"] != "fp16"
    return torch.optim.AdamW(groups, fused=True if fused else None, **hyper)


def fusable(groups: Sequence[Mapping[str, Any]]) -> bool:
    """Whether torch's fused AdamW serves every parameter: floating, on CPU or CUDA.

    One kernel updates all tensors (same AdamW update, rounded in another order), instead
    of a dozen ops per tensor; on CPU that is ~4x faster for a small UNet.
    """
    params = [p for group in groups for p in group["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def make_lr_scheduler(settings: Mapping[str, Any], optimizer, num_processes: int):
    """diffusers' get_scheduler; steps scaled by processes (accelerate steps it once each)."""
    return get_scheduler(
        settings["lr_scheduler"],
        optimizer=optimizer,
        num_warmup_steps=settings["lr_warmup_steps"] * num_processes,
        num_training_steps=settings["max_steps"] * num_processes,
    )
