"""The sample stage: batched, individually seeded text-to-image generation.

Each image is defined by (prompt, seed) alone: its initial latents come from its own
`torch.Generator`, so it is the same whichever shard, batch or job produced it and can be
regenerated on its own (to within one grey level, see :func:`generate`). Prompts are
assigned to shards by a hash of their text, so all images of a prompt (one DICOM series)
come from one job.

Speed: images are generated ``batch_size`` at a time, attention runs through PyTorch's
scaled-dot-product attention, the GPU path runs in bf16 (fp16 where bf16 is unsupported),
and ``compile: true`` wraps the UNet in ``torch.compile``. The model is the fine-tuned
pipeline (``results/model``), or ``sample.model`` (a pipeline folder, hub id or ``tiny``),
optionally with LoRA weights (``sample.lora_weights``, loaded with diffusers'
``load_lora_weights``; needs ``peft``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from transformers import CLIPTokenizer

from idc_diffusion.cohort.splits import shard_of
from idc_diffusion.core.hashing import file_sha256, key_digest
from idc_diffusion.sample.dicom_export import (
    RunInfo,
    secondary_capture,
    series_folder,
    write_secondary_capture,
)
from idc_diffusion.sample.prompts import PromptError, check_prompt_lengths, read_prompts
from idc_diffusion.train.models import ModelError, check_pipeline_folder, load_base_pipeline

__all__ = [
    "MANIFEST_COLUMNS",
    "PromptError",
    "SampleJob",
    "check_prompt_lengths",
    "export_dicom",
    "generate",
    "image_seed",
    "load_pipeline",
    "merge_manifests",
    "plan_jobs",
    "read_prompts",
    "sample_shard",
    "set_scheduler",
    "shard_jobs",
]

log = logging.getLogger(__name__)

SCHEDULERS = {
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
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
    "lora_weights",
    "dicom_file",
]
# Keys added after the first release; settings without them (older configs, tests) get these.
DEFAULTS: dict[str, Any] = {
    "negative_prompt": None,
    "model": None,
    "lora_weights": None,
    "device": "auto",
    "dtype": "auto",
    "compile": False,
    "grid": {"split": "train", "fields": ["modality", "body_part", "window"]},
}


@dataclass(frozen=True)
class SampleJob:
    """One image to generate: everything that determines its pixels besides the model."""

    prompt_index: int
    prompt: str
    seed: int
    k: int = 0  # the image's index among its prompt's seeds

    @property
    def file_stem(self) -> str:
        return f"p{self.prompt_index:04d}_s{self.seed}"


def image_seed(base_seed: int, prompt: str, k: int) -> int:
    """Seed of the k-th image of a prompt: depends on the prompt text, not its position."""
    return int.from_bytes(key_digest(base_seed, prompt, k)[:6], "big")


def plan_jobs(prompts: list[str], per_prompt: int, base_seed: int) -> list[SampleJob]:
    """Every (prompt, seed) of the run, in prompt order."""
    return [
        SampleJob(i, prompt, image_seed(base_seed, prompt, k), k)
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
    """Images [N, H, W, 3] uint8 for a batch of jobs, each from its own seeded generator.

    The initial latents of each image come from its own generator and the schedulers used
    are deterministic (no noise after the first step), so the image depends only on
    (prompt, seed) mathematically. Numerically it can differ by one grey level between
    batch compositions: convolution and matmul kernels pick their blocking and summation
    order by tensor shape, so float rounding of an image depends on the batch size, and a
    value at x.5 grey levels can round either way. PyTorch has no batch-invariant kernels
    and per-image UNet calls would give up batching, so in float32/bf16/fp16 the contract
    (and the tests) is "equal within 1 grey level, and in more than 99.9% of pixels".
    ``dtype: float64`` (CPU; slow, and very slow on GPUs) pushes the rounding noise ~9
    orders of magnitude below a grey level: the images are then bit-identical in our tests,
    though a tie can still in principle round differently.
    """
    generators = [torch.Generator(device="cpu").manual_seed(j.seed) for j in jobs]
    output = pipe(
        prompt=[j.prompt for j in jobs],
        negative_prompt=[negative_prompt] * len(jobs) if negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators,
        output_type="np",
    )
    return (np.clip(output.images, 0.0, 1.0) * 255).round().astype(np.uint8)


# --------------------------------------------------------------------------- model


def unet_sha256(model_dir: Path) -> str:
    """Identity of the sampled weights: the hash of the UNet's weight file(s)."""
    files = sorted((model_dir / "unet").glob("*.safetensors")) or sorted(
        (model_dir / "unet").glob("*.bin")
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def module_sha256(module: torch.nn.Module) -> str:
    """Hash of a module's state dict (names and float32 bytes): for models with no folder."""
    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_identity(spec: Path | str, pipe: StableDiffusionPipeline, lora: str | None) -> str:
    """SHA-256 naming the sampled weights: UNet files (or tensors), plus the LoRA file."""
    folder = Path(spec)
    base = unet_sha256(folder) if folder.is_dir() else module_sha256(pipe.unet)
    if not lora:
        return base
    lora_path = Path(lora)
    files = [lora_path] if lora_path.is_file() else sorted(lora_path.glob("*.safetensors"))
    digest = hashlib.sha256(base.encode())
    for path in files:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def resolve_device(device: str) -> str:
    """``auto`` is cuda when a GPU is visible, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("sample.device: cuda requested but no GPU is visible; use auto or cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto``: float32 on CPU, bf16 on a GPU that supports it, else fp16."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_pipeline(
    spec: Path | str,
    device: str = "auto",
    dtype: str = "auto",
    lora_weights: str | None = None,
    compile_unet: bool = False,
) -> StableDiffusionPipeline:
    """The pipeline to sample from, on `device` in `dtype`, with SDPA attention.

    `spec` is a pipeline folder, a hub id or ``tiny``; `lora_weights` a LoRA file or folder
    as written by diffusers' ``save_lora_weights``.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    folder = Path(spec)
    if folder.is_dir():
        check_pipeline_folder(folder)
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
        )
    else:
        pipe = load_base_pipeline(str(spec)).to(dtype=torch_dtype)
    if lora_weights:
        load_lora(pipe, lora_weights)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe = pipe.to(device)
    if device == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet)
    return pipe


def load_lora(pipe: StableDiffusionPipeline, path: str) -> None:
    """Load LoRA weights into the pipeline; ModelError naming the file when that fails."""
    lora = Path(path)
    if not lora.exists():
        raise ModelError(f"sample.lora_weights: {lora} does not exist")
    try:
        import peft  # noqa: F401  (diffusers needs it for LoRA)
    except ImportError as exc:
        raise ModelError("sample.lora_weights needs the 'peft' package: pip install peft") from exc
    try:
        if lora.is_file():
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        else:
            pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()  # into the base weights: no extra LoRA matmuls per step
        pipe.unload_lora_weights()
    except Exception as exc:
        raise ModelError(f"sample.lora_weights: cannot load {lora}: {exc}") from exc


# --------------------------------------------------------------------------- stage


def sample_shard(
    settings: dict,
    model_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    shard: int,
    *,
    caption: dict | None = None,
) -> pd.DataFrame:
    """Generate one shard's images into `out_dir` and write its manifest.parquet there.

    Every input is checked (model folder, prompts, prompt lengths, LoRA file) before the
    first image is generated. The DICOM export is written when the shards are merged
    (:func:`merge_manifests`), so that naming the run never regenerates an image.
    """
    settings = {**DEFAULTS, **settings}
    spec = settings["model"] or model_dir
    local = settings["model"] is None or Path(spec).is_dir()
    if local:
        check_pipeline_folder(spec)
    prompts = read_prompts(
        settings["prompts"], dataset_dir, settings["max_prompts"], settings["grid"], caption
    )
    jobs = shard_jobs(
        plan_jobs(prompts, settings["per_prompt"], settings["seed"]), shard, settings["n_shards"]
    )
    negative = settings["negative_prompt"]
    checked = prompts + ([negative] if negative else [])
    if local:  # check prompts before loading (an empty shard loads no model at all)
        check_prompt_lengths(checked, CLIPTokenizer.from_pretrained(Path(spec) / "tokenizer"))
    if settings["lora_weights"] and not Path(settings["lora_weights"]).exists():
        raise ModelError(f"sample.lora_weights: {settings['lora_weights']} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not jobs:
        log.info("shard %d: no prompts hash to this shard", shard)
        return _write_manifest([], out_dir)
    pipe = load_pipeline(
        spec, settings["device"], settings["dtype"], settings["lora_weights"], settings["compile"]
    )
    check_prompt_lengths(checked, pipe.tokenizer)
    set_scheduler(pipe, settings["scheduler"])
    model_hash = model_identity(spec, pipe, settings["lora_weights"])
    rows: list[dict] = []
    size = settings["batch_size"]
    for start in range(0, len(jobs), size):
        batch = jobs[start : start + size]
        began = time.perf_counter()
        images = generate(
            pipe, batch, settings["num_inference_steps"], settings["guidance_scale"], negative
        )
        seconds = (time.perf_counter() - began) / len(batch)
        for job, image in zip(batch, images, strict=True):
            name = f"{job.file_stem}.png"
            Image.fromarray(image).save(out_dir / name)
            rows.append(
                {
                    "file_name": f"{out_dir.name}/{name}",
                    "prompt": job.prompt,
                    "prompt_index": job.prompt_index,
                    "seed": job.seed,
                    "scheduler": settings["scheduler"],
                    "num_inference_steps": settings["num_inference_steps"],
                    "guidance_scale": float(settings["guidance_scale"]),
                    "negative_prompt": negative,
                    "model_dir": str(spec),
                    "model_sha256": model_hash,
                    "shard": shard,
                    "seconds": seconds,
                    "lora_weights": settings["lora_weights"],
                    "dicom_file": None,  # set by merge_manifests when it exports DICOM
                }
            )
        log.info("shard %d: %d/%d images", shard, start + len(batch), len(jobs))
    return _write_manifest(rows, out_dir)


def _write_manifest(rows: list[dict], out_dir: Path) -> pd.DataFrame:
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).astype(
        {"lora_weights": "string", "dicom_file": "string", "negative_prompt": "string"}
    )
    manifest.to_parquet(out_dir / "manifest.parquet", index=False)
    return manifest


def merge_manifests(
    shard_dirs: list[Path],
    out_path: Path,
    dicom_dir: Path | None = None,
    run_name: str = "idc-diffusion",
) -> pd.DataFrame:
    """One manifest for all sample shards, ordered by prompt and seed.

    With `dicom_dir`, every image is also written there as a DICOM Secondary Capture (one
    series per prompt, ``p<prompt index>/<image>.dcm``; see dicom_export), its path relative
    to the manifest's folder in ``dicom_file``, and the folder is replaced. The export is
    here, in the cheap merge, rather than in the sample jobs: `run_name` names the synthetic
    patient, so renaming a run rewrites the DICOM files and never regenerates an image.
    """
    parts = [pd.read_parquet(d / "manifest.parquet") for d in shard_dirs]
    parts = [p for p in parts if not p.empty]
    for part in parts:  # all images of a prompt are in one shard, in seed-index order
        part["seed_index"] = part.groupby("prompt_index").cumcount()
    merged = (
        pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=MANIFEST_COLUMNS)
    )
    if merged.empty:
        raise PromptError("sample: no images were generated in any shard")
    merged = merged.sort_values(["prompt_index", "seed"], ignore_index=True)
    if dicom_dir is not None:
        merged["dicom_file"] = export_dicom(
            merged, Path(shard_dirs[0]).parent, Path(dicom_dir), Path(out_path).parent, run_name
        )
        merged = merged.astype({"dicom_file": "string"})
    merged = merged.drop(columns="seed_index")
    merged.to_parquet(out_path, index=False)
    return merged


def export_dicom(
    manifest: pd.DataFrame, samples_dir: Path, dicom_dir: Path, relative_to: Path, run_name: str
) -> list[str]:
    """Write each manifest row's image (``samples_dir/file_name``) as a Secondary Capture
    under `dicom_dir` (replaced); the files' paths, relative to `relative_to` when inside it.

    Rows need the merge's ``seed_index`` column: the image's index among its prompt's seeds.
    """
    shutil.rmtree(dicom_dir, ignore_errors=True)
    created = dt.datetime.now(dt.UTC)
    paths = []
    for row in manifest.itertuples(index=False):
        negative = None if pd.isna(row.negative_prompt) else str(row.negative_prompt)
        run = RunInfo(
            run_name=run_name,
            model_id=str(row.model_dir),
            model_sha256=str(row.model_sha256),
            scheduler=str(row.scheduler),
            num_inference_steps=int(row.num_inference_steps),
            guidance_scale=float(row.guidance_scale),
            negative_prompt=negative,
            created=created,
        )
        with Image.open(samples_dir / row.file_name) as png:
            image = np.asarray(png.convert("RGB"))
        ds = secondary_capture(
            image,
            run,
            prompt=str(row.prompt),
            prompt_index=int(row.prompt_index),
            seed=int(row.seed),
            instance_number=int(row.seed_index) + 1,
        )
        path = dicom_dir / series_folder(int(row.prompt_index)) / f"{Path(row.file_name).stem}.dcm"
        write_secondary_capture(ds, path)
        paths.append(
            path.relative_to(relative_to).as_posix()
            if path.is_relative_to(relative_to)
            else str(path)
        )
    log.info("DICOM export: %d Secondary Capture files in %s", len(paths), dicom_dir)
    return paths
