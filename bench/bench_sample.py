"""Sampling throughput: the sample stage's batched generation vs a naive one-image loop.

Baseline: what a first script does — ``StableDiffusionPipeline.from_pretrained(folder)``
(default attention) moved to the device, then one pipeline call per image with its own
seeded generator. Candidate: :func:`idc_diffusion.sample.generate.load_pipeline` (SDPA; bf16 on a
GPU, float32 on CPU; optional ``torch.compile``) and :func:`generate` on ``batch`` images per
call. Both use the same dtype (the candidate's), model, scheduler (DPM-Solver++), steps,
guidance, prompts and seeds, each after one warm-up call: the ratio is batching's, not bf16's.

``python bench/run.py sample`` measures the tiny model on CPU. On a GPU::

    python bench/bench_sample.py --model <SD 2.1-base folder> --device cuda [--compile]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

SRC = Path(__file__).resolve().parents[1] / "src"
for _path in (SRC, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from idc_diffusion.sample.generate import (  # noqa: E402
    SampleJob,
    generate,
    load_pipeline,
    plan_jobs,
    set_scheduler,
)
from idc_diffusion.train.models import build_tiny_pipeline  # noqa: E402

PROMPTS = [
    "CT of the chest, axial slice, lung window",
    "CT of the chest, axial slice, mediastinum window",
    "MR of the brain, axial slice, female",
    "radiograph of the chest, PA view, male",
]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def naive_loop(pipe: StableDiffusionPipeline, jobs: list[SampleJob], steps: int, guidance: float):
    """One pipeline call per image, as in a first script."""
    for job in jobs:
        pipe(
            job.prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="np",
        )


def batched(
    pipe: StableDiffusionPipeline, jobs: list[SampleJob], steps: int, guidance: float, size: int
):
    for start in range(0, len(jobs), size):
        generate(pipe, jobs[start : start + size], steps, guidance)


def _timed(call, device: str) -> float:
    _sync(device)
    began = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - began


def measure(
    model: Path,
    device: str,
    images: int,
    batch: int,
    steps: int,
    guidance: float,
    compile_unet: bool,
    rounds: int = 3,
) -> dict:
    """Best of `rounds` interleaved timings of each mode.

    On CPU both run single-threaded: with other jobs sharing the cores, OpenMP threads that
    wait for a descheduled sibling make small kernels 10-100x slower at random.
    """
    if device == "cpu":
        torch.set_num_threads(1)
    per_prompt = max(1, images // len(PROMPTS))
    jobs = plan_jobs(PROMPTS, per_prompt, base_seed=0)
    n = len(jobs)
    pipe = load_pipeline(model, device=device, compile_unet=compile_unet)
    set_scheduler(pipe, "dpmsolver++")
    naive = StableDiffusionPipeline.from_pretrained(
        model, torch_dtype=pipe.unet.dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    naive.set_progress_bar_config(disable=True)
    set_scheduler(naive, "dpmsolver++")
    naive_loop(naive, jobs[:1], steps, guidance)  # warm-up
    batched(pipe, jobs[:batch], steps, guidance, batch)  # warm-up (and compile)
    naive_times, ours_times = [], []
    for _ in range(rounds):
        naive_times.append(_timed(lambda: naive_loop(naive, jobs, steps, guidance), device))
        ours_times.append(_timed(lambda: batched(pipe, jobs, steps, guidance, batch), device))
    naive_s, ours_s = min(naive_times), min(ours_times)
    return {
        "images": n,
        "batch_size": batch,
        "steps": steps,
        "guidance": guidance,
        "device": device,
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "compile": compile_unet,
        "rounds": rounds,
        "cpu_threads": torch.get_num_threads() if device == "cpu" else None,
        "naive_seconds": [round(t, 3) for t in naive_times],
        "batched_seconds": [round(t, 3) for t in ours_times],
        "naive_images_per_s": n / naive_s,
        "batched_images_per_s": n / ours_s,
    }


def result(details: dict, model_label: str) -> dict:
    ratio = details["batched_images_per_s"] / details["naive_images_per_s"]
    gpu = details["device"] == "cuda"
    return {
        "title": "Sampling throughput",
        "what": (
            f"{model_label}: images/s generating {details['images']} images "
            f"({details['steps']} DPM-Solver++ steps, guidance {details['guidance']}) with the "
            f"sample stage (batch {details['batch_size']}, SDPA, {details['dtype']}) vs a naive "
            f"loop of one {details['dtype']} pipeline call per image, same prompts and seeds."
        ),
        "baseline": {
            "label": f"naive loop, 1 image per call, {details['dtype']}",
            "value": details["naive_images_per_s"],
        },
        "candidate": {
            "label": f"sample stage, batch {details['batch_size']}, {details['dtype']}",
            "value": details["batched_images_per_s"],
        },
        "unit": "images/s",
        "higher_is_better": True,
        "ratio": ratio,
        "goal": "≥ 3× on a GPU at batch 8 (CPU: recorded, > 1×)",
        "goal_met": ratio >= 3.0 if gpu else ratio > 1.0,
        "details": details,
    }


def run(
    model: str | None = None,
    device: str = "cpu",
    images: int = 16,
    batch: int = 8,
    steps: int = 12,
    guidance: float = 4.0,
    compile_unet: bool = False,
) -> dict:
    """The benchmark; the tiny 64 px model on CPU unless a model folder is given
    ('random-sd21': SD 2.1-base-shaped random weights, as in gpu_train_sd21.py)."""
    if model == "random-sd21":
        from gpu_train_sd21 import write_random_sd21

        with tempfile.TemporaryDirectory() as tmp:
            folder = write_random_sd21(Path(tmp) / "random-sd21")
            details = measure(folder, device, images, batch, steps, guidance, compile_unet)
        return result(details, "SD 2.1-base-shaped, random weights (512 px)")
    if model is not None:
        details = measure(Path(model), device, images, batch, steps, guidance, compile_unet)
        return result(details, Path(model).name)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_pipeline(seed=0, sample_size=64).save_pretrained(tmp)
        details = measure(Path(tmp), device, images, batch, steps, guidance, compile_unet)
    return result(details, "tiny SD-2 model (64 px)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="a diffusers pipeline folder or 'random-sd21' (default: the tiny model)"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    args = parser.parse_args(argv)
    out = run(
        args.model, args.device, args.images, args.batch, args.steps, args.guidance, args.compile
    )
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
