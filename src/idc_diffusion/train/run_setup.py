"""Everything a training run does before its first step: check the settings and the data,
start the accelerator, load the base model and place it for training, build the data
(latent cache or pixels, held-out moments) and the optimizer step."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list
from diffusers import DDPMScheduler

from idc_diffusion.train import latent_cache
from idc_diffusion.train.attention import configure_attention
from idc_diffusion.train.ema import EMA
from idc_diffusion.train.models import load_base_pipeline
from idc_diffusion.train.objective import PREDICTION_TYPES, latent_shape
from idc_diffusion.train.optimization import (
    make_lr_scheduler,
    make_optimizer,
    parameter_groups,
    trainable_parameters,
)
from idc_diffusion.train.text_embeddings import TextEmbeddingCache
from idc_diffusion.train.train_data import (
    CaptionedImages,
    Split,
    image_resolution,
    load_images,
    read_split,
    tokenize,
)
from idc_diffusion.train.train_step import Stepper

log = logging.getLogger(__name__)

# The dtype of frozen weights (VAE, frozen text encoder) per train.mixed_precision.
WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def check_settings(settings: Mapping[str, Any]) -> None:
    """Fail before any model is loaded on options that cannot work here."""
    if settings["mode"] not in ("full", "lora"):
        raise ValueError(f"train.mode must be 'full' or 'lora', got {settings['mode']!r}")
    if settings["optimizer"] == "adamw_8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                "train.optimizer 'adamw_8bit' needs bitsandbytes, which is not importable "
                "here; install it (pip install bitsandbytes, CUDA only) or set "
                "train.optimizer: adamw"
            ) from exc
    elif settings["optimizer"] != "adamw":
        raise ValueError(f"train.optimizer must be adamw or adamw_8bit: {settings['optimizer']!r}")
    if settings["validation_steps"] and not settings["validation_prompts"]:
        log.info("train.validation_steps set without validation_prompts: held-out loss only")


def load_splits(settings: Mapping[str, Any], data_dir: Path) -> tuple[Split, Split, int]:
    """Train and held-out splits and the image resolution (ValueError for unusable data)."""
    train_split = read_split(data_dir, "train")
    if len(train_split) == 0:
        raise ValueError(
            f"no training images: {train_split.metadata} is missing or empty; run the "
            "prepare/dataset stages first, or widen the cohort so the train split gets series"
        )
    resolution = image_resolution(train_split)
    heldout = read_split(data_dir, settings["heldout_split"])
    limit = settings["heldout_max_images"]
    if limit and len(heldout) == 0:
        raise ValueError(
            f"no held-out images: {heldout.metadata} is missing or empty (its DICOM removed "
            "before prepare ran, or a cohort too small for the split); rerun prepare/dataset, "
            "or set train.heldout_max_images: 0 to train without a held-out loss"
        )
    heldout = Split(
        heldout.name,
        heldout.metadata,
        heldout.paths[:limit],
        heldout.captions[:limit],
        heldout.pixel_sources[:limit],
    )
    if len(heldout) and image_resolution(heldout) != resolution:
        raise ValueError(
            f"{heldout.metadata}: held-out images are not {resolution} px like the train split"
        )
    return train_split, heldout, resolution


@dataclass
class TrainingRun:
    """What the phases of a run share once it is set up.

    `unet` and `text_encoder` are the models as accelerate prepared them (wrapped under
    DDP; the text encoder only when trained); the pipeline keeps the unwrapped ones.
    """

    settings: dict[str, Any]
    out_dir: Path
    accelerator: Accelerator
    train_split: Split
    heldout: Split
    resolution: int
    base_spec: str  # what load_base_pipeline loaded: base_dir, else train.base_model
    pipeline: Any
    scheduler: DDPMScheduler  # the training noise scheduler
    weight_dtype: torch.dtype
    attention: str
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    train_text: bool  # the text encoder is trained too
    dataset: Any
    cache_root: Path | None
    heldout_moments: tuple[torch.Tensor, torch.Tensor] | None
    ema: EMA | None = None  # set by prepare_training, like the stepper
    stepper: Stepper | None = None

    @property
    def vae(self) -> torch.nn.Module:
        """The base VAE (frozen)."""
        return self.pipeline.vae

    @property
    def tokenizer(self) -> Any:
        """The base tokenizer."""
        return self.pipeline.tokenizer

    @property
    def seed(self) -> int:
        """train.seed: data order, draws, held-out noise and validation images."""
        return self.settings["seed"]

    @property
    def checkpoint_root(self) -> Path:
        """The folder of the run's checkpoints."""
        return self.out_dir / "checkpoints"

    @property
    def effective_batch_size(self) -> int:
        """Images per optimizer step: per device x devices x accumulation."""
        processes = self.accelerator.num_processes
        accumulation = self.settings["gradient_accumulation_steps"]
        return self.settings["train_batch_size"] * processes * accumulation


def set_up_run(
    settings: dict[str, Any],
    data_dir: Path,
    out_dir: Path,
    latent_dir: Path | None,
    base_dir: Path | None,
) -> TrainingRun:
    """Splits, accelerator, base model placed for training, data and the optimizer step."""
    train_split, heldout, resolution = load_splits(settings, data_dir)
    accelerator = start_accelerator(settings, len(train_split) + len(heldout))
    base_spec = str(base_dir) if base_dir else settings["base_model"]
    pipeline, scheduler = load_pipeline(settings, base_spec, resolution)
    weight_dtype = WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
    if accelerator.device.type == "cuda":
        enable_tf32()
    use_cache = settings["use_latent_cache"]
    vae_print = latent_cache.cache_fingerprint(pipeline.vae, weight_dtype) if use_cache else ""
    attention = configure_attention(
        pipeline.unet, settings["attention"], accelerator.mixed_precision
    )
    unet_params, text_params = trainable_parameters(settings, pipeline.unet, pipeline.text_encoder)
    parts = {"vae": pipeline.vae, "unet": pipeline.unet, "text_encoder": pipeline.text_encoder}
    place_models(settings, parts, accelerator.device, weight_dtype)
    dataset, cache_root, heldout_moments = training_data(
        settings, accelerator, pipeline, (train_split, heldout), resolution, vae_print,
        out_dir, latent_dir,
    )  # fmt: skip
    run = TrainingRun(
        settings=settings,
        out_dir=out_dir,
        accelerator=accelerator,
        train_split=train_split,
        heldout=heldout,
        resolution=resolution,
        base_spec=base_spec,
        pipeline=pipeline,
        scheduler=scheduler,
        weight_dtype=weight_dtype,
        attention=attention,
        unet=pipeline.unet,
        text_encoder=pipeline.text_encoder,
        train_text=bool(text_params),
        dataset=dataset,
        cache_root=cache_root,
        heldout_moments=heldout_moments,
    )
    prepare_training(run, unet_params, text_params)
    return run


def start_accelerator(settings: Mapping[str, Any], images: int) -> Accelerator:
    """The Accelerator (its collectives wait long enough to encode `images`); torch seeded."""
    timeout = process_group_timeout(images, int(os.environ.get("WORLD_SIZE", "1")))
    accelerator = Accelerator(
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        mixed_precision=settings["mixed_precision"],
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )
    torch.manual_seed(settings["seed"])
    return accelerator


def load_pipeline(
    settings: Mapping[str, Any], base_spec: str, resolution: int
) -> tuple[Any, DDPMScheduler]:
    """The base pipeline and a DDPM training scheduler of its config (ValueError for a
    prediction type training cannot learn)."""
    pipeline = load_base_pipeline(
        base_spec,
        settings["revision"],
        settings["tiny_seed"],
        resolution,
    )
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"base model's prediction_type {prediction_type!r} is not supported")
    return pipeline, scheduler


def training_data(
    settings: Mapping[str, Any],
    accelerator: Accelerator,
    pipeline: Any,
    splits: tuple[Split, Split],
    resolution: int,
    vae_print: str,
    out_dir: Path,
    latent_dir: Path | None,
) -> tuple[Any, Path | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """(train dataset, latent cache or None, held-out latent moments or None): cached
    latents when use_latent_cache, else pixels encoded every step."""
    train_split, heldout = splits
    vae, tokenizer = pipeline.vae, pipeline.tokenizer
    input_ids = tokenize(tokenizer, train_split.captions)
    cache_root = None
    if settings["use_latent_cache"]:
        own = out_dir / "latent_cache"
        cache_root = ensure_latent_cache(
            accelerator, latent_dir, own, vae, vae_print, [train_split, heldout], resolution
        )
        dataset = latent_cache.CachedLatents(cache_root, train_split, input_ids)
    else:
        dataset = CaptionedImages(train_split, input_ids)
    heldout_moments = None
    if len(heldout) and cache_root is not None:
        heldout_ids = tokenize(tokenizer, heldout.captions)
        heldout_moments = latent_cache.CachedLatents(cache_root, heldout, heldout_ids).all_moments()
    elif len(heldout):
        heldout_moments = latent_cache.encode_moments(vae, load_images(heldout.paths))
    return dataset, cache_root, heldout_moments


def prepare_training(
    run: TrainingRun,
    unet_params: list[torch.nn.Parameter],
    text_params: list[torch.nn.Parameter],
) -> None:
    """Optimizer and LR schedule prepared by accelerate with the trained models, the EMA
    (checkpointed with them) and the run's optimizer step."""
    settings, accelerator = run.settings, run.accelerator
    optimizer = make_optimizer(settings, parameter_groups(settings, unet_params, text_params))
    lr_scheduler = make_lr_scheduler(settings, optimizer, accelerator.num_processes)
    if text_params:
        run.unet, run.text_encoder, optimizer, lr_scheduler = accelerator.prepare(
            run.unet, run.text_encoder, optimizer, lr_scheduler
        )
    else:
        run.unet, optimizer, lr_scheduler = accelerator.prepare(run.unet, optimizer, lr_scheduler)
    run.ema = EMA(unet_params, settings["ema_decay"]) if settings["ema_decay"] else None
    if run.ema is not None:
        accelerator.register_for_checkpointing(run.ema)
    parts = {
        "vae": run.vae,
        "unet": run.unet,
        "text_encoder": run.text_encoder,
        "scheduler": run.scheduler,
        "empty_ids": tokenize(run.tokenizer, [""])[0],
        "text_embeddings": None if text_params else TextEmbeddingCache(run.text_encoder),
    }
    trained = [run.unet, run.text_encoder] if text_params else [run.unet]
    run.stepper = Stepper(
        accelerator, parts, settings, optimizer, lr_scheduler, trained, unet_params + text_params,
        latent_shape(run.vae, run.resolution), run.ema, run.checkpoint_root,
    )  # fmt: skip


def place_models(
    settings: Mapping[str, Any],
    parts: Mapping[str, torch.nn.Module],
    device: torch.device,
    weight_dtype: torch.dtype,
) -> None:
    """Frozen weights in the mixed-precision dtype, the UNet (and a trained text encoder,
    LoRA base included) in float32, all on device; the UNet in train mode.

    A LoRA base stays in float32 so that the adapters fuse into full-precision weights
    (autocast runs its matmuls in the mixed-precision dtype anyway).
    """
    vae, unet, text_encoder = parts["vae"], parts["unet"], parts["text_encoder"]
    _move(vae.requires_grad_(False).eval(), device, weight_dtype)
    if not settings["train_text_encoder"]:
        _move(text_encoder.eval(), device, weight_dtype)
    else:
        _move(text_encoder.train(), device, torch.float32)
    _move(unet.train(), device, torch.float32)  # diffusers' DDP stride fix needs train mode
    for model in (unet, text_encoder):
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        if settings["train_text_encoder"]:
            text_encoder.gradient_checkpointing_enable()


def enable_tf32() -> None:
    """TF32 tensor cores for float32 matmuls and convolutions (Ampere and later): the
    float32 parts of a mixed-precision step (and all of an fp32 one) run several times
    faster, with a 10-bit mantissa for the products and float32 accumulation."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def _move(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move to `device`, casting only when the dtype differs (diffusers warns on casts)."""
    model.to(device) if model.dtype == dtype else model.to(device, dtype)


def ensure_latent_cache(
    accelerator: Accelerator,
    shared: Path | None,
    own: Path,
    vae: torch.nn.Module,
    vae_print: str,
    splits: Sequence[Split],
    resolution: int,
) -> Path:
    """A latent cache serving `splits`: `shared` (e.g. results/latents) when it fits,
    else train's own cache under the model folder, built now when missing or stale.

    The main process decides and tells the others (no process reads a cache that another
    is about to replace); a build is shared out, shard by shard, between all processes.
    """
    splits = [s for s in splits if len(s)]
    choice: list[str | None] = [None]
    if accelerator.is_main_process:
        choice = [usable_cache((shared, own), splits, vae_print, resolution)]
    if accelerator.num_processes > 1:
        choice = broadcast_object_list(choice)
    if choice[0] is not None:
        log.info("latent cache: %s", choice[0])
        return Path(choice[0])
    log.info("encoding %d images into the latent cache %s", sum(map(len, splits)), own)
    latent_cache.write_latent_cache(
        own, vae, splits, vae_print, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, wait=accelerator.wait_for_everyone,
    )  # fmt: skip
    return own


def usable_cache(
    roots: Sequence[Path | None], splits: Sequence[Split], vae_print: str, resolution: int
) -> str | None:
    """The first of `roots` that serves every split (None: none does; each reason logged)."""
    for root in roots:
        if root is None:
            continue
        problems = [latent_cache.cache_problem(root, s, vae_print, resolution) for s in splits]
        problems = [p for p in problems if p]
        if not problems:
            return str(root)
        log.info("latent cache %s not used: %s", root, "; ".join(problems))
    return None


# The slowest rate planned for when processes encode a latent cache between two barriers
# (images/s per process at 512 px), and the slack for other lone work between collectives
# (the main process saving a checkpoint or rendering validation images).
ENCODE_RATE = 5.0
GROUP_TIMEOUT_FLOOR = timedelta(minutes=30)


def process_group_timeout(images: int, processes: int) -> timedelta:
    """How long a process waits for the others at a collective before failing: the floor
    plus its share of `images` encoded at ENCODE_RATE (torch's default is 10 min)."""
    return GROUP_TIMEOUT_FLOOR + timedelta(seconds=math.ceil(images / processes / ENCODE_RATE))
