"""Training throughput of real SD 2.1-base on a GPU: ours (latent cache) vs diffusers' loop.

For gradient checkpointing off and on, times ``training.train()`` with ``use_latent_cache``
and the loop of diffusers' ``train_text_to_image.py`` (bench_train.py's reference: VAE
encode every step) on the same model, images, batch and precision, and reports images/s,
peak GPU memory and model FLOP utilisation (UNet forward + backward FLOPs counted with
``torch.utils.flop_counter`` / step time / the device's peak). Needs a local diffusers
pipeline folder (e.g. ``huggingface-cli download stabilityai/stable-diffusion-2-1-base
--local-dir sd21``)::

    python bench/gpu_train_sd21.py --model sd21 --out bench/results/gpu_train_sd21.json

Smoke test without weights or GPU: ``--model tiny --resolution 64 --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
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

from idc_diffusion.models import load_base_pipeline

# Dense peak TFLOP/s for bf16/fp16 tensor cores (vendor data sheets, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    """The device's peak from --peak-tflops or the table above (None: unknown, e.g. CPU)."""
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def unet_step_flops(model: str, resolution: int, batch: int, device: torch.device) -> int:
    """FLOPs of one UNet forward + backward on a batch (what training must compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    pipeline = load_base_pipeline(model, None, 0, resolution)
    unet = pipeline.unet.to(device).train()
    side = resolution // pipeline.vae_scale_factor
    latents = torch.randn(batch, unet.config.in_channels, side, side, device=device)
    hidden = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)
    steps = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        unet(latents, steps, hidden).sample.float().pow(2).mean().backward()
    del pipeline, unet
    return counter.get_total_flops()


def measure(kind: str, settings: dict, data: Path, out: Path, device: torch.device) -> dict:
    """Per-step seconds and peak memory of one loop."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    steps = settings["max_steps"]
    if kind == "reference":
        times = reference_step_seconds(settings, data, steps)
    else:
        times = our_step_seconds(settings, data, out)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"times": times, "peak_GiB": round(peak, 2) if peak is not None else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local pipeline folder, or 'tiny'")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    elif not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --device cpu")
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    flops = unet_step_flops(args.model, args.resolution, args.batch, device)
    peak = peak_tflops(device, args.peak_tflops)
    result: dict = {
        "model": args.model, "resolution": args.resolution, "batch": args.batch,
        "precision": args.precision, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "peak_tflops": peak,
        "unet_fwd_bwd_TFLOP_per_step": round(flops / 1e12, 4), "runs": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "data", args.images, args.resolution)
        for checkpointing in (False, True):
            settings = settings_for(
                args.model, max_steps=args.warmup + args.steps, train_batch_size=args.batch,
                mixed_precision=args.precision, gradient_checkpointing=checkpointing,
                dataloader_workers=args.workers,
            )  # fmt: skip
            for kind in ("reference", "ours"):
                options = {**settings, "use_latent_cache": kind == "ours"}
                out = Path(tmp) / f"{kind}-{checkpointing}"
                run = measure(kind, options, data, out, device)
                step = statistics.median(run["times"][args.warmup :])
                result["runs"][f"{kind}, checkpointing {'on' if checkpointing else 'off'}"] = {
                    "s_per_step": round(step, 4),
                    "images_per_s": round(args.batch / step, 2),
                    "peak_memory_GiB": run["peak_GiB"],
                    "mfu": round(flops / step / (peak * 1e12), 4) if peak else None,
                }
    for state in ("off", "on"):
        ref, ours = (result["runs"][f"{k}, checkpointing {state}"] for k in ("reference", "ours"))
        result[f"speedup_checkpointing_{state}"] = round(ref["s_per_step"] / ours["s_per_step"], 3)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
