"""The sample stage: batched, individually seeded text-to-image generation.

Each image is defined by (prompt, seed) alone: its initial latents come from its own
`torch.Generator`, so it is the same whichever shard, batch or job produced it and can be
regenerated on its own. Prompts are assigned to shards by a hash of their text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from PIL import Image
from transformers import CLIPTokenizer

from idc_diffusion.hashing import file_sha256, key_digest
from idc_diffusion.models import check_pipeline_folder
from idc_diffusion.splits import shard_of

log = logging.getLogger(__name__)

SCHEDULERS = {
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}
MANIFEST_COLUMNS = [
    "file_name",
    "prompt",
    "prompt_index",
    "seed",
    "scheduler",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "model_dir",
    "model_sha256",
    "shard",
    "seconds",
]


class PromptError(ValueError):
    """A prompt set that cannot be sampled (empty, too long, unreadable)."""


@dataclass(frozen=True)
class SampleJob:
    """One image to generate: everything that determines its pixels besides the model."""

    prompt_index: int
    prompt: str
    seed: int

    @property
    def file_stem(self) -> str:
        return f"p{self.prompt_index:04d}_s{self.seed}"


def read_prompts(source: str, dataset_dir: Path, max_prompts: int) -> list[str]:
    """Prompts from the test split's captions (deduplicated, sorted) or a .txt/.csv file."""
    if source == "test_captions":
        path = dataset_dir / "test" / "metadata.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        prompts = sorted({json.loads(line)["text"] for line in lines if line.strip()})
    else:
        path = Path(source)
        if not path.is_file():
            raise PromptError(f"sample.prompts: {path} does not exist")
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path)
            if "prompt" not in frame.columns:
                raise PromptError(f"sample.prompts: {path} has no 'prompt' column")
            prompts = [str(p) for p in frame["prompt"].dropna()]
        else:
            prompts = [line.strip() for line in path.read_text().splitlines()]
        prompts = list(dict.fromkeys(p for p in prompts if p))
    if not prompts:
        raise PromptError(
            f"sample.prompts: no prompts in {path} (empty file or empty test split); "
            "give a prompt file or check the prepare stage's test split"
        )
    return prompts[:max_prompts]


def check_prompt_lengths(prompts: list[str], tokenizer: CLIPTokenizer) -> None:
    """Refuse prompts the text encoder would silently truncate."""
    limit = tokenizer.model_max_length
    for index, prompt in enumerate(prompts):
        n = len(tokenizer(prompt).input_ids)
        if n > limit:
            raise PromptError(
                f"prompt {index} has {n} tokens, over the text encoder's limit of {limit}: "
                f"{prompt[:80]!r}... shorten it (or the caption template)"
            )


def image_seed(base_seed: int, prompt: str, k: int) -> int:
    """Seed of the k-th image of a prompt: depends on the prompt text, not its position."""
    return int.from_bytes(key_digest(base_seed, prompt, k)[:6], "big")


def plan_jobs(prompts: list[str], per_prompt: int, base_seed: int) -> list[SampleJob]:
    """Every (prompt, seed) of the run, in prompt order."""
    return [
        SampleJob(i, prompt, image_seed(base_seed, prompt, k))
        for i, prompt in enumerate(prompts)
        for k in range(per_prompt)
    ]


def shard_jobs(jobs: list[SampleJob], shard: int, n_shards: int) -> list[SampleJob]:
    """The jobs of one shard: all images of a prompt land in the same shard."""
    return [j for j in jobs if shard_of(j.prompt, n_shards) == shard]


def set_scheduler(pipe: StableDiffusionPipeline, name: str) -> None:
    """Swap the pipeline's scheduler for `name`, keeping the model's noise schedule."""
    cls, extra = SCHEDULERS[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def generate(
    pipe: StableDiffusionPipeline,
    jobs: list[SampleJob],
    steps: int,
    guidance: float,
    negative_prompt: str | None = None,
) -> np.ndarray:
    """Images [N, H, W, 3] uint8 for a batch of jobs, each from its own seeded generator."""
    generators = [torch.Generator(device=pipe.device).manual_seed(j.seed) for j in jobs]
    output = pipe(
        prompt=[j.prompt for j in jobs],
        negative_prompt=[negative_prompt] * len(jobs) if negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators,
        output_type="np",
    )
    return (np.clip(output.images, 0.0, 1.0) * 255).round().astype(np.uint8)


def unet_sha256(model_dir: Path) -> str:
    """Identity of the sampled weights: the hash of the UNet's weight file(s)."""
    files = sorted((model_dir / "unet").glob("*.safetensors")) or sorted(
        (model_dir / "unet").glob("*.bin")
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def load_pipeline(model_dir: Path) -> StableDiffusionPipeline:
    """The fine-tuned pipeline, on the GPU in fp16 when there is one."""
    cuda = torch.cuda.is_available()
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, dtype=torch.float16 if cuda else torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda" if cuda else "cpu")


def sample_shard(
    settings: dict, model_dir: Path, dataset_dir: Path, out_dir: Path, shard: int
) -> pd.DataFrame:
    """Generate one shard's images into `out_dir` and write its manifest.parquet there."""
    check_pipeline_folder(model_dir)
    prompts = read_prompts(settings["prompts"], dataset_dir, settings["max_prompts"])
    check_prompt_lengths(prompts, CLIPTokenizer.from_pretrained(model_dir / "tokenizer"))
    jobs = shard_jobs(
        plan_jobs(prompts, settings["per_prompt"], settings["seed"]), shard, settings["n_shards"]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if jobs:
        pipe = load_pipeline(model_dir)
        set_scheduler(pipe, settings["scheduler"])
        model_hash = unet_sha256(model_dir)
        size = settings["batch_size"]
        for start in range(0, len(jobs), size):
            batch = jobs[start : start + size]
            began = time.perf_counter()
            images = generate(
                pipe,
                batch,
                settings["num_inference_steps"],
                settings["guidance_scale"],
                settings["negative_prompt"],
            )
            seconds = (time.perf_counter() - began) / len(batch)
            for job, image in zip(batch, images, strict=True):
                name = f"{job.file_stem}.png"
                Image.fromarray(image).save(out_dir / name)
                rows.append(
                    _manifest_row(job, name, settings, model_dir, model_hash, shard, seconds)
                )
            log.info("shard %d: %d/%d images", shard, start + len(batch), len(jobs))
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest.to_parquet(out_dir / "manifest.parquet", index=False)
    return manifest


def _manifest_row(
    job: SampleJob,
    name: str,
    settings: dict,
    model_dir: Path,
    model_hash: str,
    shard: int,
    seconds: float,
) -> dict:
    return {
        "file_name": f"shard-{shard}/{name}",
        "prompt": job.prompt,
        "prompt_index": job.prompt_index,
        "seed": job.seed,
        "scheduler": settings["scheduler"],
        "num_inference_steps": settings["num_inference_steps"],
        "guidance_scale": float(settings["guidance_scale"]),
        "negative_prompt": settings["negative_prompt"],
        "model_dir": str(model_dir),
        "model_sha256": model_hash,
        "shard": shard,
        "seconds": seconds,
    }


def merge_manifests(shard_dirs: list[Path], out_path: Path) -> pd.DataFrame:
    """One manifest for all sample shards, ordered by prompt and seed."""
    parts = [pd.read_parquet(d / "manifest.parquet") for d in shard_dirs]
    merged = (
        pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=MANIFEST_COLUMNS)
    )
    merged = merged.sort_values(["prompt_index", "seed"], ignore_index=True)
    if merged.empty:
        raise PromptError("sample: no images were generated in any shard")
    merged.to_parquet(out_path, index=False)
    return merged
