"""The tiny SD-2 pipeline, base-model resolution and pipeline folder checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from idc_diffusion.train.models import (
    ModelError,
    build_tiny_pipeline,
    check_pipeline_folder,
    learn_merges,
    load_base_pipeline,
)


@pytest.fixture(scope="module")
def tiny() -> StableDiffusionPipeline:
    return build_tiny_pipeline(seed=0, sample_size=64)


@pytest.fixture(scope="module")
def saved(tiny: StableDiffusionPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    tiny.save_pretrained(folder, safe_serialization=True)
    return folder


def test_unet_is_sd2_like(tiny: StableDiffusionPipeline) -> None:
    config = tiny.unet.config
    assert config.use_linear_projection is True
    assert config.sample_size == 8
    assert config.cross_attention_dim == tiny.text_encoder.config.hidden_size
    assert tiny.scheduler.config.prediction_type == "epsilon"
    assert tiny.scheduler.config.beta_schedule == "scaled_linear"


def test_vae_downsamples_8x(tiny: StableDiffusionPipeline) -> None:
    with torch.no_grad():
        latents = tiny.vae.encode(torch.zeros(2, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (2, 4, 8, 8)
    assert tiny.vae.config.scaling_factor == pytest.approx(0.18215)


def test_tokenizer_has_whole_caption_words(tiny: StableDiffusionPipeline) -> None:
    text = "CT of the chest, axial slice, lung window"
    tokens = tiny.tokenizer.convert_ids_to_tokens(tiny.tokenizer(text).input_ids)
    words = ["ct", "of", "the", "chest", ",", "axial", "slice", ",", "lung", "window"]
    assert tokens == ["<|startoftext|>", *(w + "</w>" for w in words), "<|endoftext|>"]
    assert len(tokens) < len(text) / 3
    assert tiny.tokenizer.model_max_length == 77
    unknown = tiny.tokenizer("zyx").input_ids
    assert len(unknown) == 5  # unknown words fall back to characters


def test_learned_merges_rebuild_every_word() -> None:
    words = ["chest", "check", "the", "then"]
    merges = learn_merges(words)
    assert ("t", "he</w>") in merges or ("th", "e</w>") in merges
    assert len(merges) <= sum(len(w) - 1 for w in words)


def test_tiny_pipeline_is_seeded(tiny: StableDiffusionPipeline) -> None:
    again = build_tiny_pipeline(seed=0)
    other = build_tiny_pipeline(seed=1)
    first = next(iter(tiny.unet.state_dict().values()))
    assert torch.equal(first, next(iter(again.unet.state_dict().values())))
    assert not torch.equal(first, next(iter(other.unet.state_dict().values())))


def test_roundtrip_and_sampling(tiny: StableDiffusionPipeline, saved: Path) -> None:
    loaded = load_base_pipeline(str(saved))
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    text = "MR of the brain"
    assert loaded.tokenizer(text).input_ids == tiny.tokenizer(text).input_ids
    image = loaded(
        "CT of the chest",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_folder_missing_component_is_named(saved: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelError, match="'vae'"):
        check_pipeline_folder(broken)
    with pytest.raises(ModelError, match="'vae'"):
        load_base_pipeline(str(broken))
    (broken / "model_index.json").unlink()
    with pytest.raises(ModelError, match=r"model_index\.json"):
        check_pipeline_folder(broken)


def test_missing_weights_are_named(saved: Path, tmp_path: Path) -> None:
    broken = tmp_path / "noweights"
    shutil.copytree(saved, broken)
    for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(ModelError, match="'unet' lacks diffusion_pytorch_model"):
        check_pipeline_folder(broken)


@pytest.mark.parametrize("spec", ["/nonexistent/sd21", "./models/sd21"])
def test_missing_local_path_is_clear(spec: str) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_base_pipeline(spec)


def test_unreachable_hub_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", offline)
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        load_base_pipeline("stabilityai/stable-diffusion-2-1-base")
