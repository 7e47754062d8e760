"""Training throughput of SD 2.1-base on a GPU: ours (latent cache, and without it) vs
diffusers' loop.

For gradient checkpointing off and on, times ``fine_tune.train()`` with and without
``use_latent_cache`` and the loop of diffusers' ``train_text_to_image.py`` (bench_train.py's
reference: VAE encode every step) on the same model, images, batch and precision, and
reports images/s, peak GPU memory above what was allocated before the run, and model FLOP
utilisation (UNet forward + backward FLOPs counted on the meta device / step time / the
dense peak of the exact GPU model for the precision). Every measurement starts after
``gc.collect()`` and an emptied CUDA cache; each run's folder is deleted after it.

``--model random-sd21`` (the default) builds SD 2.1-base-shaped random weights offline
(speed and memory do not depend on the values); ``--model FOLDER`` uses a diffusers
pipeline folder. The defaults finish in under 8 minutes on an H100/H200::

    python bench/gpu_train_sd21.py --out bench/results/gpu_train_sd21.json

Dry run without a GPU: ``--model tiny --resolution 64 --device cpu --steps 2 --warmup 1``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_train import (
    our_step_seconds,
    reference_step_seconds,
    settings_for,
    write_images,
)

from idc_diffusion.train.models import TINY, build_tiny_pipeline, build_tiny_tokenizer

# Dense (no sparsity) tensor-core peak TFLOP/s per GPU model and precision, from the vendor
# data sheets; "no" is float32 matmuls on TF32 tensor cores (train enables TF32). The
# first key found in torch.cuda.get_device_name() wins, so specific names come first.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "no": 378.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "no": 418.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "no": 495.0},  # SXM ("H100 80GB HBM3")
    "H200": {"bf16": 989.0, "fp16": 989.0, "no": 495.0},
    "GH200": {"bf16": 989.0, "fp16": 989.0, "no": 495.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "no": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "no": 183.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "no": 60.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "no": 62.5},
}
RANDOM_SD21 = "random-sd21"
KINDS = ("reference", "ours", "ours without cache")


def peak_tflops(device_name: str, precision: str, given: float | None = None) -> float | None:
    """The dense peak for `device_name` at `precision` (None: unknown GPU, or CPU)."""
    if given:
        return given
    found = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    return found[precision] if found else None


def sd21_unet_config() -> dict:
    """The UNet config of stabilityai/stable-diffusion-2-1-base."""
    return {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 1024,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True,
    }  # fmt: skip


def write_random_sd21(folder: Path) -> Path:
    """An SD 2.1-base-shaped pipeline with random weights (the tiny tokenizer) in `folder`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = build_tiny_pipeline()
    tokenizer = build_tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    text = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, projection_dim=512,
        hidden_act="gelu", bos_token_id=vocab[tokenizer.bos_token],
        eos_token_id=vocab[tokenizer.eos_token], pad_token_id=vocab[tokenizer.eos_token],
    )  # fmt: skip
    vae = AutoencoderKL(
        sample_size=512, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, scaling_factor=0.18215,
    )  # fmt: skip
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**sd21_unet_config()), scheduler=tiny.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def unet_step_flops(model: str, resolution: int, batch: int) -> int:
    """FLOPs of one UNet forward + backward on a batch, counted on the meta device (no
    memory, no weights loaded, nothing run)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    if model == TINY:
        config = dict(build_tiny_pipeline().unet.config)
    elif model == RANDOM_SD21:
        config = sd21_unet_config()
    else:
        config = UNet2DConditionModel.load_config(model, subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).train()
        side = resolution // 8
        latents = torch.randn(batch, unet.config.in_channels, side, side)
        hidden = torch.randn(batch, 77, unet.config.cross_attention_dim)
        steps = torch.randint(0, 1000, (batch,))
        with FlopCounterMode(display=False) as counter:
            unet(latents, steps, hidden).sample.float().pow(2).mean().backward()
    return counter.get_total_flops()


def measure(kind: str, settings: dict, data: Path, out: Path, device: torch.device) -> dict:
    """Per-step seconds and the peak memory above the start of one loop; `out` removed."""
    gc.collect()
    start = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    try:
        if kind == "reference":
            times = reference_step_seconds(settings, data, settings["max_steps"])
        else:
            times = our_step_seconds(settings, data, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    peak = None
    if device.type == "cuda":
        peak = round((torch.cuda.max_memory_allocated(device) - start) / 2**30, 2)
    return {"times": times, "peak_GiB": peak}


def summarise(times: list[float], warmup: int, batch: int, flops: int, peak: float | None):
    """s/step (median after warm-up), images/s and MFU of one run."""
    step = statistics.median(times[warmup:])
    return {
        "s_per_step": round(step, 4),
        "images_per_s": round(batch / step, 2),
        "mfu": round(flops / step / (peak * 1e12), 4) if peak else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=RANDOM_SD21, help="folder, 'random-sd21' or 'tiny'")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=["bf16", "fp16", "no"], default="bf16")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    elif not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --device cpu")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    flops = unet_step_flops(args.model, args.resolution, args.batch)
    peak = peak_tflops(name, args.precision, args.peak_tflops)
    result: dict = {
        "model": args.model, "resolution": args.resolution, "batch": args.batch,
        "precision": args.precision, "device": name, "peak_tflops": peak,
        "unet_fwd_bwd_TFLOP_per_step": round(flops / 1e12, 4), "runs": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == RANDOM_SD21:
            model = str(write_random_sd21(Path(tmp) / "random-sd21"))
        data = write_images(Path(tmp) / "data", args.images, args.resolution)
        for checkpointing in (False, True):
            settings = settings_for(
                model, max_steps=args.warmup + args.steps, train_batch_size=args.batch,
                mixed_precision=args.precision, gradient_checkpointing=checkpointing,
                dataloader_workers=args.workers,
            )  # fmt: skip
            for kind in KINDS:
                options = {**settings, "use_latent_cache": kind == "ours"}
                run = measure(kind, options, data, Path(tmp) / "run", device)
                label = f"{kind}, checkpointing {'on' if checkpointing else 'off'}"
                summary = summarise(run["times"], args.warmup, args.batch, flops, peak)
                result["runs"][label] = {**summary, "peak_memory_GiB": run["peak_GiB"]}
    for state in ("off", "on"):
        runs = {k: result["runs"][f"{k}, checkpointing {state}"]["s_per_step"] for k in KINDS}
        for kind in KINDS[1:]:
            key = f"speedup_{kind.replace(' ', '_')}_checkpointing_{state}"
            result[key] = round(runs["reference"] / runs[kind], 3)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
