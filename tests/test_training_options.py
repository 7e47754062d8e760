"""Option checks that fail before any model is loaded, and the draws the options add."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from train_fixtures import settings, write_dataset

from idc_diffusion.train import run_setup
from idc_diffusion.train.fine_tune import train, with_defaults
from idc_diffusion.train.objective import draw_batch, draw_noise
from idc_diffusion.train.optimization import fusable, make_optimizer
from idc_diffusion.train.train_data import seeded_generator


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="installed")
def test_8bit_adam_without_bitsandbytes_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_dataset(tmp_path / "data", train=2, val=0)
    monkeypatch.setattr(run_setup, "load_base_pipeline", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=r"adamw_8bit.*bitsandbytes.*optimizer: adamw"):
        train(settings(optimizer="adamw_8bit", heldout_max_images=0), data, tmp_path / "m", {})


def test_unknown_mode_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train\.mode"):
        train(settings(mode="dreambooth"), tmp_path, tmp_path / "m", {})


def test_options_append_draws_without_changing_earlier_ones() -> None:
    plain = with_defaults(settings())
    extra = {**plain, "noise_offset": 0.1, "caption_dropout": 0.5, "random_flip": True}
    base = draw_noise(seeded_generator(1, 2), 64, (4, 8, 8), 1000)
    first = draw_batch(seeded_generator(1, 2), 64, (4, 8, 8), 1000, plain)
    second = draw_batch(seeded_generator(1, 2), 64, (4, 8, 8), 1000, extra)
    for got in (first, second):
        assert all(
            torch.equal(a, b)
            for a, b in zip(base, (got.eps, got.noise, got.timesteps), strict=True)
        )
    assert first.offsets is None and first.drop is None and first.flip is None
    assert second.offsets.shape == (64, 4)
    assert 10 < int(second.drop.sum()) < 54 and 10 < int(second.flip.sum()) < 54


def test_adamw_is_fused_except_under_fp16() -> None:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(3))]}]
    assert make_optimizer(with_defaults(settings()), groups).defaults["fused"]
    fp16 = with_defaults(settings(mixed_precision="fp16"))
    assert not make_optimizer(fp16, groups).defaults["fused"]
    meta = [{"params": [torch.nn.Parameter(torch.zeros(3, device="meta"))]}]
    assert not fusable(meta)


def test_empty_heldout_split_is_a_clear_error(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train=2, val=0)
    with pytest.raises(
        ValueError, match=r"no held-out images: .*val/metadata\.jsonl .*heldout_max_images: 0"
    ):
        train(settings(), data, tmp_path / "m", {})
    assert not (tmp_path / "m" / "model_index.json").exists()
