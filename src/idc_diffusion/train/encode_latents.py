"""The ``latents`` rule: encode the train and held-out splits once with the base VAE."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from idc_diffusion.train.fine_tune import with_defaults
from idc_diffusion.train.latent_cache import cache_fingerprint, write_latent_cache
from idc_diffusion.train.models import load_base_pipeline
from idc_diffusion.train.run_setup import WEIGHT_DTYPES, load_splits

log = logging.getLogger(__name__)


def encode_latents(
    settings: Mapping[str, Any],
    dataset_dir: Path,
    out_dir: Path,
    base_dir: Path | None = None,
    batch_size: int = 32,
) -> None:
    """Write the latent cache of the dataset's train and held-out splits to ``out_dir``.

    The VAE of ``base_dir`` (the base_model stage's folder; else ``train.base_model``) encodes
    in the dtype training will use, so that train accepts the cache (its fingerprint).
    """
    settings = with_defaults(settings)
    train_split, heldout, resolution = load_splits(settings, dataset_dir)
    spec = str(base_dir) if base_dir else settings["base_model"]
    pipeline = load_base_pipeline(spec, settings["revision"], settings["tiny_seed"], resolution)
    dtype = WEIGHT_DTYPES.get(settings["mixed_precision"], torch.float32)
    print_ = cache_fingerprint(pipeline.vae, dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = pipeline.vae.requires_grad_(False).eval().to(device, dtype)
    log.info("encoding %d + %d images on %s in %s", len(train_split), len(heldout), device, dtype)
    write_latent_cache(out_dir, vae, [train_split, heldout], print_, batch_size=batch_size)
