"""The end of a run: its summary (train_summary.json) and the fine-tuned pipeline saved in
float32 (EMA weights when EMA is on, the base's own frozen parts, LoRA fused), with the
model card when provenance is given."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from idc_diffusion.train.model_card import CARD_NAME, SUMMARY_NAME, render_model_card
from idc_diffusion.train.models import load_base_pipeline
from idc_diffusion.train.run_setup import TrainingRun


def train_summary(
    run: TrainingRun, loss_base: float | None, loss_final: float | None, started: float
) -> dict[str, Any]:
    """What train_summary.json records: held-out losses, data, steps, seconds since
    `started` (a perf_counter reading), options and hardware."""
    settings, accelerator = run.settings, run.accelerator
    summary = {
        "heldout_loss_base": loss_base,
        "heldout_loss_final": loss_final,
        "heldout_split": run.heldout.name,
        "heldout_images": len(run.heldout),
        "steps": settings["max_steps"],
        "prediction_type": run.scheduler.config.prediction_type,
        "base_model": settings["base_model"],
        "resolution": run.resolution,
        "train_images": len(run.train_split),
        "effective_batch_size": run.effective_batch_size,
        "seed": run.seed,
        "seconds": round(time.perf_counter() - started, 3),
        "pixel_source": sorted(set(run.train_split.pixel_sources)),
    }
    summary.update(
        mode=settings["mode"],
        train_text_encoder=run.train_text,
        ema=run.ema is not None,
        latent_cache=str(run.cache_root) if run.cache_root else None,
        hardware=hardware(accelerator),
        mixed_precision=accelerator.mixed_precision,
    )
    return summary


def save_trained_pipeline(
    run: TrainingRun, summary: Mapping[str, Any], provenance: Mapping[str, Any] | None
) -> None:
    """save_outputs of the trained weights (the EMA's when EMA is on); where training cast
    the frozen parts, the base's own float32 VAE and text encoder are saved instead."""
    settings, accelerator = run.settings, run.accelerator
    if run.ema is not None:
        run.ema.copy_to()
    models = {}
    if run.weight_dtype != torch.float32:  # frozen parts were cast: save the base's own
        base = load_base_pipeline(
            run.base_spec, settings["revision"], settings["tiny_seed"], run.resolution
        )
        models.update(vae=base.vae, text_encoder=base.text_encoder)
    models["unet"] = accelerator.unwrap_model(run.unet)
    if run.train_text:
        models["text_encoder"] = accelerator.unwrap_model(run.text_encoder)
    save_outputs(run.pipeline, models, summary, settings, provenance, run.out_dir)


def hardware(accelerator: Accelerator) -> str:
    """The devices training ran on, e.g. '4 x NVIDIA H100 80GB HBM3' or '1 x cpu'."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{accelerator.num_processes} x {name}"


def save_outputs(
    pipeline: Any,
    models: Mapping[str, torch.nn.Module],
    summary: Mapping[str, Any],
    settings: Mapping[str, Any],
    provenance: Mapping[str, Any] | None,
    out_dir: Path,
) -> None:
    """The fine-tuned pipeline (safetensors, float32), train_summary.json and, with
    `provenance`, model_card.md.

    `models` replace the pipeline's parts of the same name (the trained ones, and the
    base's float32 frozen parts when training cast them).

    In LoRA mode the adapters are also saved alone (``pytorch_lora_weights.safetensors``,
    for ``load_lora_weights`` on the base model) and fused into the saved pipeline.
    """
    for name, model in models.items():
        setattr(pipeline, name, model)
    if settings.get("mode") == "lora":
        from idc_diffusion.train.lora import fuse_and_unload, save_lora

        text = models["text_encoder"] if settings.get("train_text_encoder") else None
        save_lora(out_dir, pipeline.unet, text)
        fuse_and_unload(pipeline)
    for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        part.to("cpu", torch.float32)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=1, default=_json), "utf-8")
    if provenance is not None:
        (out_dir / CARD_NAME).write_text(render_model_card(summary, settings, provenance), "utf-8")


def _json(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
