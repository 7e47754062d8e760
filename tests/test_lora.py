"""LoRA mode: only adapters train; saved alone (load_lora_weights) and fused in the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from train_fixtures import own_precision, settings, write_dataset

from idc_diffusion.train.fine_tune import train
from idc_diffusion.train.models import build_tiny_pipeline

PROVENANCE = {"cohort_summary": {"licenses": {"CC BY-NC 4.0": 2}}, "pixel_source": "synthetic"}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("lora")
    data = write_dataset(root / "data")
    options = {"mode": "lora", "lora_rank": 4, "learning_rate": 1e-2, "max_steps": 6}
    summary = train(settings(**options), data, root / "model", PROVENANCE)
    return root / "model", summary


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), hidden).sample


def test_only_attention_projections_change(lora_run: tuple[Path, dict]) -> None:
    folder, summary = lora_run
    assert summary["mode"] == "lora" and not summary["train_text_encoder"]
    trained = StableDiffusionPipeline.from_pretrained(folder).unet.state_dict()
    base = build_tiny_pipeline(seed=0).unet.state_dict()
    assert trained.keys() == base.keys()  # adapters fused: a plain UNet
    changed = {k for k in base if not torch.equal(trained[k], base[k])}
    assert changed, "LoRA training changed nothing"
    projections = (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")
    assert all(any(p in k for p in projections) and k.endswith("weight") for k in changed)


def test_adapters_load_onto_the_base_model(lora_run: tuple[Path, dict]) -> None:
    folder, _ = lora_run
    weights = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    assert weights and all(k.startswith("unet.") for k in weights)
    downs = [v for k, v in weights.items() if k.endswith("lora.down.weight")]
    assert downs and {v.shape[0] for v in downs} == {4}  # rank 4
    base = build_tiny_pipeline(seed=0)
    base.load_lora_weights(folder)
    fused = StableDiffusionPipeline.from_pretrained(folder)
    assert torch.allclose(unet_output(base.unet), unet_output(fused.unet), atol=1e-4)


def test_card_names_mode_and_non_commercial_license(lora_run: tuple[Path, dict]) -> None:
    folder, _ = lora_run
    card = (folder / "model_card.md").read_text()
    assert "LoRA adapters on the UNet attention" in card
    assert "non-commercial use only" in card and "CC BY-NC 4.0" in card


def test_text_encoder_training_uses_its_own_rate(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train=4, val=0)
    options = {"train_text_encoder": True, "text_encoder_learning_rate": 1e-6, "max_steps": 2,
               "heldout_max_images": 0}  # fmt: skip
    summary = train(settings(**options), data, tmp_path / "model", PROVENANCE)
    assert summary["train_text_encoder"] and summary["heldout_loss_base"] is None
    saved = StableDiffusionPipeline.from_pretrained(tmp_path / "model").text_encoder.state_dict()
    base = build_tiny_pipeline(seed=0).text_encoder.state_dict()
    deltas = [(saved[k] - base[k]).abs().max().item() for k in base if k.endswith("weight")]
    assert max(deltas) > 0  # it trained
    assert max(deltas) < 1e-4  # with ~2 Adam steps of lr 1e-6 (the UNet's is 1e-3)
    log = [json.loads(x) for x in (tmp_path / "model" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]


def test_bf16_lora_saves_full_precision_weights(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train=4, val=1)
    options = {"mode": "lora", "lora_rank": 4, "mixed_precision": "bf16", "max_steps": 2}
    with own_precision():
        train(settings(**options), data, tmp_path / "model", PROVENANCE)
    saved = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    base = build_tiny_pipeline(seed=settings()["tiny_seed"])
    for part in ("vae", "text_encoder"):  # frozen, cast to bf16 for training: saved as base
        want, got = getattr(base, part).state_dict(), getattr(saved, part).state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), part
    want, got = base.unet.state_dict(), saved.unet.state_dict()
    assert got["conv_in.weight"].dtype == torch.float32
    assert torch.equal(want["conv_in.weight"], got["conv_in.weight"])  # no bf16 rounding
    fused = [k for k in want if "to_q.weight" in k]
    assert fused and all(not torch.equal(want[k], got[k]) for k in fused)  # adapters merged
