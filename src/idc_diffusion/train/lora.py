"""LoRA adapters (peft) on the attention projections of the UNet and the text encoder.

Saved in diffusers' format (``pytorch_lora_weights.safetensors`` via
``StableDiffusionPipeline.save_lora_weights``), so ``pipeline.load_lora_weights(folder)``
puts them on the base model; the saved pipeline itself has them fused into its weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def _config(rank: int, alpha: float, targets: tuple[str, ...]):
    try:
        from peft import LoraConfig
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise ImportError("train.mode 'lora' needs peft (pip install peft)") from exc
    return LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)
    )


def add_lora(model: torch.nn.Module, rank: int, alpha: float, text: bool = False) -> None:
    """Freeze `model` and add trainable LoRA layers to its attention projections."""
    model.requires_grad_(False)
    model.add_adapter(_config(rank, alpha, TEXT_TARGETS if text else UNET_TARGETS))


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of `model` in diffusers' key format."""
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def adapter_metadata(model: torch.nn.Module) -> dict:
    """The adapter's LoraConfig as a dict: saved with the weights so loading keeps its
    rank and alpha (without it, load_lora_weights assumes alpha = rank)."""
    return model.peft_config["default"].to_dict()


def save_lora(folder: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> Path:
    """Write the adapters and their config with ``save_lora_weights``; returns the file."""
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=lora_state_dict(unet),
        text_encoder_lora_layers=lora_state_dict(text_encoder) if text_encoder else None,
        safe_serialization=True,
        unet_lora_adapter_metadata=adapter_metadata(unet),
        text_encoder_lora_adapter_metadata=adapter_metadata(text_encoder) if text_encoder else None,
    )
    return Path(folder) / WEIGHTS_NAME


def fuse_and_unload(pipeline: StableDiffusionPipeline) -> None:
    """Merge the adapters into the base weights and remove the LoRA layers."""
    pipeline.fuse_lora(components=["unet", "text_encoder"])
    pipeline.unload_lora_weights()
