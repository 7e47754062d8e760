"""Other bases on the same code: SD 2.1-base, SD 2.1 768 (v-prediction), SD 1.x.

Each tiny stand-in (tests/base_fixtures.py) goes through the base_model stage as a local
folder, is fine-tuned for a few steps, reloaded, and sampled from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from base_fixtures import SD1_WIDTH, VARIANTS, tiny_variant
from diffusers import StableDiffusionPipeline
from train_fixtures import CAPTIONS, settings, write_dataset

from idc_diffusion.sample.generate import sample_shard
from idc_diffusion.train.base_model import fetch_base_model
from idc_diffusion.train.fine_tune import train

EXPECTED = {  # what tells the architectures apart, and must survive fine-tuning
    "sd2-base": {"prediction": "epsilon", "scheduler": "PNDMScheduler", "width": 32,
                 "linear": True, "upcast": False, "act": "gelu"},
    "sd2-768": {"prediction": "v_prediction", "scheduler": "DDIMScheduler", "width": 32,
                "linear": True, "upcast": True, "act": "gelu"},
    "sd1": {"prediction": "epsilon", "scheduler": "PNDMScheduler", "width": SD1_WIDTH,
            "linear": False, "upcast": False, "act": "quick_gelu"},
}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_dataset(tmp_path_factory.mktemp("data"), train=8, val=4, size=32)
    (root / "test").mkdir()
    (root / "test" / "metadata.jsonl").write_text(
        "".join(f'{{"file_name": "{i}.png", "text": "{c}"}}\n' for i, c in enumerate(CAPTIONS))
    )
    return root


def architecture(pipe: StableDiffusionPipeline) -> dict:
    return {
        "prediction": pipe.scheduler.config.prediction_type,
        "scheduler": type(pipe.scheduler).__name__,
        "width": pipe.unet.config.cross_attention_dim,
        "linear": pipe.unet.config.use_linear_projection,
        "upcast": pipe.unet.config.upcast_attention,
        "act": pipe.text_encoder.config.hidden_act,
    }


@pytest.mark.parametrize("name", VARIANTS)
def test_train_reload_and_sample_each_base(name: str, data: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    variant = tiny_variant(name, seed=0, sample_size=32)
    assert architecture(variant) == EXPECTED[name]
    assert variant.text_encoder.config.hidden_size == EXPECTED[name]["width"]
    variant.save_pretrained(source, safe_serialization=True)
    base = tmp_path / "base_model"
    manifest = fetch_base_model({"base_model": str(source)}, base, 32)

    out = tmp_path / "model"
    provenance = {"run_name": name, "pixel_source": "synthetic", "base_model": manifest}
    summary = train(settings(max_steps=2, train_batch_size=4), data, out, provenance, base_dir=base)
    assert summary["prediction_type"] == EXPECTED[name]["prediction"]
    assert summary["resolution"] == 32

    reloaded = StableDiffusionPipeline.from_pretrained(out)
    assert architecture(reloaded) == EXPECTED[name]
    base_unet = variant.unet.state_dict()
    tuned = reloaded.unet.state_dict()
    assert base_unet.keys() == tuned.keys()
    assert any(not torch.equal(base_unet[k], tuned[k]) for k in base_unet)  # it trained
    assert all(  # and only the UNet did
        torch.equal(v, reloaded.text_encoder.state_dict()[k])
        for k, v in variant.text_encoder.state_dict().items()
    )
    card = (out / "model_card.md").read_text()
    weights = manifest["files"]["unet/diffusion_pytorch_model.safetensors"]["sha256"]
    assert f"`{weights}`" in card and str(source) in card

    sample = {"prompts": "test_captions", "max_prompts": 2, "per_prompt": 1, "batch_size": 2,
              "scheduler": "dpmsolver++", "num_inference_steps": 2, "guidance_scale": 3.0,
              "seed": 0, "n_shards": 1, "dicom_export": False}  # fmt: skip
    images = sample_shard(sample, out, data, tmp_path / "samples" / "shard-0", 0)
    assert len(images) == 2
    assert all((tmp_path / "samples" / f).is_file() for f in images["file_name"])
