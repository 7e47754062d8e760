"""Training step time: our loop on the latent cache against diffusers' reference loop.

The baseline mirrors one step of diffusers' ``examples/text_to_image/train_text_to_image.py``
(shuffled DataLoader of decoded images, ``vae.encode(...).latent_dist.sample()`` every step,
``randn_like`` noise, random timesteps, text encoder, UNet, MSE to the scheduler's target,
``accelerator.backward``, clipping, AdamW, LR scheduler). Ours is ``fine_tune.train()``
itself, with ``use_latent_cache`` (latents from the cache: no VAE in the step) and
without; its step times come from ``train_log.jsonl`` (0.1 ms resolution). Besides the
skipped encode, ours reuses text embeddings of a frozen text encoder, steps a fused AdamW
and reads the loss back once per step. Both on the same tiny SD-2-architecture model,
images, batch size and precision, in one run. The one-off cost of encoding the cache and
the reference step's shares spent in the VAE and the text encoder are in the details.
``bench/gpu_train_sd21.py`` reuses the loops for the real SD 2.1-base on a GPU.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from PIL import Image

from idc_diffusion.train import latent_cache
from idc_diffusion.train.fine_tune import DEFAULTS, train
from idc_diffusion.train.models import load_base_pipeline
from idc_diffusion.train.train_data import load_image, read_split, tokenize

CAPTIONS = ("CT of the chest, axial slice, lung window", "MR of the brain, axial slice")


def write_images(root: Path, count: int, size: int, seed: int = 0) -> Path:
    """An imagefolder train split of smooth random grayscale squares (+ a 2-image val)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", 2)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            small = rng.random((8, 8))
            image = Image.fromarray((small * 255).astype(np.uint8), mode="L")
            image.resize((size, size), Image.BICUBIC).save(folder / f"{i:04d}.png")
            lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": CAPTIONS[i % 2]}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def settings_for(model: str, **overrides: Any) -> dict:
    """A complete train section for benchmarking (no checkpoints mid-run, no held-out)."""
    base = {
        **DEFAULTS,
        "base_model": model, "revision": None, "tiny_seed": 0, "seed": 0, "max_steps": 20,
        "train_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-5,
        "lr_scheduler": "constant", "lr_warmup_steps": 0, "adam_beta1": 0.9,
        "adam_beta2": 0.999, "adam_weight_decay": 1e-2, "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0, "mixed_precision": "no", "checkpointing_steps": 10**6,
        "checkpoints_total_limit": 1, "resume": "never", "heldout_split": "val",
        "heldout_max_images": 1, "dataloader_workers": 0,
    }  # fmt: skip
    base.update(overrides)
    return base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_step_seconds(settings: dict, data_dir: Path, steps: int) -> list[float]:
    """Per-step seconds of the train_text_to_image.py loop (see the module docstring)."""
    accelerator = Accelerator(mixed_precision=settings["mixed_precision"])
    split = read_split(data_dir, "train")
    pipeline = load_base_pipeline(settings["base_model"], None, 0, load_image_size(split))
    unet, vae, text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    vae.requires_grad_(False).to(accelerator.device, weight_dtype)
    text_encoder.requires_grad_(False).to(accelerator.device, weight_dtype)
    unet.train()
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    ids = tokenize(pipeline.tokenizer, split.captions)
    items = list(zip(split.paths, ids, strict=True))

    def collate(batch: list) -> dict:
        pixels = torch.stack([load_image(path) for path, _ in batch])
        return {"pixel_values": pixels, "input_ids": torch.stack([i for _, i in batch])}

    loader = torch.utils.data.DataLoader(
        items, shuffle=True, batch_size=settings["train_batch_size"], collate_fn=collate,
        num_workers=settings["dataloader_workers"], drop_last=True,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings["learning_rate"])
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(
        unet, optimizer, loader, lr_scheduler
    )
    times: list[float] = []
    while len(times) < steps:
        start = time.perf_counter()
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                    device=latents.device,
                ).long()  # fmt: skip
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder(batch["input_ids"], return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), settings["max_grad_norm"])
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            _sync(accelerator.device)
            now = time.perf_counter()
            times.append(now - start)
            start = now
            if len(times) == steps:
                break
    return times


def load_image_size(split: Any) -> int:
    with Image.open(split.paths[0]) as image:
        return image.size[0]


def our_step_seconds(settings: dict, data_dir: Path, out_dir: Path) -> list[float]:
    """Per-step seconds of fine_tune.train() from its train_log.jsonl."""
    train(settings, data_dir, out_dir, {"pixel_source": "synthetic"}, latent_dir=None)
    log = [json.loads(x) for x in (out_dir / "train_log.jsonl").read_text().splitlines()]
    seconds = [0.0] + [r["seconds"] for r in log]
    return [b - a for a, b in itertools.pairwise(seconds)]


def median_seconds(work: Callable[[], object], repeats: int = 10) -> float:
    """Median seconds of `work()` without autograd, after one untimed call."""
    times = []
    with torch.no_grad():
        work()
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def part_seconds(settings: dict, data_dir: Path) -> dict[str, float]:
    """Median seconds of the reference step's VAE encode and text encoder alone (one batch)."""
    split = read_split(data_dir, "train")
    pipeline = load_base_pipeline(settings["base_model"], None, 0, load_image_size(split))
    count = settings["train_batch_size"]
    pixels = torch.stack([load_image(p) for p in split.paths[:count]])
    ids = tokenize(pipeline.tokenizer, split.captions[:count])
    return {
        "vae_encode": median_seconds(lambda: pipeline.vae.encode(pixels).latent_dist.sample()),
        "text_encoder": median_seconds(lambda: pipeline.text_encoder(ids, return_dict=False)),
    }


def cache_seconds(settings: dict, data_dir: Path, root: Path) -> float:
    """Seconds to encode the train split into a latent cache (the one-off cost)."""
    pipeline = load_base_pipeline(settings["base_model"], None, 0, 64)
    start = time.perf_counter()
    latent_cache.write_latent_cache(root, pipeline.vae, [read_split(data_dir, "train")])
    return time.perf_counter() - start


def run(rounds: int = 3, warmup: int = 3, steps: int = 10) -> dict:
    """`rounds` interleaved rounds of reference, ours cached, ours plain; each variant's
    step time is its best round's median (other jobs share this machine's cores)."""
    medians: dict[str, list[float]] = {"reference": [], "cached": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = write_images(tmp_path / "data", 64, 64)
        common = settings_for("tiny", max_steps=warmup + steps)
        cached_settings = {**common, "use_latent_cache": True}
        for k in range(rounds):
            times = reference_step_seconds(common, data, warmup + steps)
            medians["reference"].append(statistics.median(times[warmup:]))
            times = our_step_seconds(cached_settings, data, tmp_path / f"cached{k}")
            medians["cached"].append(statistics.median(times[warmup:]))
            times = our_step_seconds(common, data, tmp_path / f"plain{k}")
            medians["plain"].append(statistics.median(times[warmup:]))
        encode = cache_seconds(common, data, tmp_path / "cache_timing")
        share = {k: v / min(medians["reference"]) for k, v in part_seconds(common, data).items()}
    ref, ours, ours_plain = (min(medians[k]) for k in ("reference", "cached", "plain"))
    ratio = ref / ours
    return {
        "title": "Training step (tiny SD-2, CPU, latent cache)",
        "what": "Median optimizer-step time, 64 px, batch 8, float32: fine_tune.train() on the "
        "latent cache vs a loop mirroring diffusers' train_text_to_image.py (VAE encode "
        "every step), same model, images and run.",
        "baseline": {"label": "diffusers train_text_to_image.py loop", "value": round(ref, 4)},
        "candidate": {"label": "train() with use_latent_cache", "value": round(ours, 4)},
        "unit": "s/step",
        "higher_is_better": False,
        "ratio": round(ratio, 3),
        "goal": ">= 1.25x (step time <= 0.8x reference)",
        "goal_met": ratio >= 1.25,
        "details": {
            "ours_without_cache_s": round(ours_plain, 4),
            "reference_over_ours_without_cache": round(ref / ours_plain, 3),
            "cache_encode_64_images_s": round(encode, 3),
            "vae_encode_share_of_reference_step": round(share["vae_encode"], 3),
            "text_encoder_share_of_reference_step": round(share["text_encoder"], 3),
            "ratio_from_skipping_the_encode_alone": round(
                1 / max(1 - share["vae_encode"], 1e-9), 3
            ),
            "medians_per_round_s": {k: [round(x, 4) for x in v] for k, v in medians.items()},
            "rounds": rounds,
            "steps_timed_per_round": steps,
            "warmup_steps": warmup,
        },
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
