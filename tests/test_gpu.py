"""What only a CUDA GPU can show; skipped elsewhere (CI has none; run on a GPU machine by
`bench/gpu_session.sh`).

The latents stage encodes on the GPU in the training dtype and a bf16 training run reads
that cache instead of building its own (the fingerprint is the one it was written with);
the fine-tuned pipeline is saved in float32; LoRA under bf16 fuses into float32 weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_fixtures import own_precision, settings, write_dataset

from idc_diffusion.cli import main
from idc_diffusion.train import latent_cache
from idc_diffusion.train.fine_tune import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROVENANCE = {"cohort_summary": {"licenses": {"CC BY 4.0": 1}}, "pixel_source": "synthetic"}


def _dtypes(path: Path) -> set[torch.dtype]:
    with safe_open(str(path), framework="pt") as handle:
        return {handle.get_tensor(key).dtype for key in handle.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), train=8, val=4)


def test_bf16_training_reads_the_latents_stage_cache(data: Path, tmp_path: Path) -> None:
    options = settings(mixed_precision="bf16", use_latent_cache=True, max_steps=6)
    cache = tmp_path / "latents"
    argv = ["latents", "--settings", json.dumps(options), "--dataset-dir", str(data),
            "--out-dir", str(cache), "--gpus", "1", "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    assert latent_cache.shard_metadata(cache, 0)["vae"].endswith("-bfloat16")
    with own_precision():
        summary = train(options, data, tmp_path / "model", PROVENANCE, cache)
    assert summary["latent_cache"] == str(cache)  # used, not rebuilt
    assert not (tmp_path / "model" / "latent_cache").exists()
    assert _dtypes(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors") == {
        torch.float32
    }
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "model" / "train_log.jsonl").read_text().splitlines()
        if line
    ]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


def test_lora_under_bf16_saves_full_precision_fused_weights(data: Path, tmp_path: Path) -> None:
    options = settings(mixed_precision="bf16", max_steps=3, mode="lora", lora_rank=4)
    with own_precision():
        train(options, data, tmp_path / "model", PROVENANCE)
    assert _dtypes(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors") == {
        torch.float32
    }
    assert (tmp_path / "model" / "pytorch_lora_weights.safetensors").is_file()
