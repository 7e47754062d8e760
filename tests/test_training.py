"""Fine-tuning the tiny model: outputs, held-out loss, resume, data order, v-prediction."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, PNDMScheduler, StableDiffusionPipeline
from train_fixtures import settings, write_dataset, write_split

from idc_diffusion.train import models, run_setup
from idc_diffusion.train.checkpoints import fingerprint, list_checkpoints
from idc_diffusion.train.fine_tune import train, with_defaults
from idc_diffusion.train.models import SD21_BASE_SCHEDULER, ModelError, build_tiny_pipeline
from idc_diffusion.train.objective import heldout_loss, prediction_target
from idc_diffusion.train.run_setup import enable_tf32, place_models, process_group_timeout
from idc_diffusion.train.train_data import BatchStream, batch_indices, load_images, read_split

PROVENANCE = {
    "cohort_summary": {"idc_version": "v25", "licenses": {"CC BY 4.0": 3}},
    "citations_path": "results/cohort/CITATIONS.md",
    "pixel_source": "synthetic",
    "run_name": "test",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def unet_state(folder: Path) -> dict[str, torch.Tensor]:
    return StableDiffusionPipeline.from_pretrained(folder).unet.state_dict()


def test_demo_run_learns_and_saves_pipeline(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    summary = train(settings(max_steps=30, train_batch_size=8), data, out, PROVENANCE)
    assert summary["heldout_loss_final"] < 0.8 * summary["heldout_loss_base"]
    assert summary["steps"] == 30 and summary["train_images"] == 12
    assert summary["effective_batch_size"] == 8 and summary["resolution"] == 64
    assert json.loads((out / "train_summary.json").read_text()) == summary
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert set(log[0]) == {"step", "epoch", "loss", "lr", "seconds"}
    assert log[0]["lr"] < log[-1]["lr"] == pytest.approx(1e-3)  # warmup, then constant
    assert log[-1]["epoch"] == 29 // 2  # 12 images, batches of 8: 2 batches per epoch
    trained = unet_state(out)
    base = build_tiny_pipeline(seed=0).unet.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    card = (out / "model_card.md").read_text()
    assert "WARNING" in card and "synthetic" in card and "Not for clinical use" in card
    assert "CC BY 4.0" in card and "CITATIONS.md" in card and "v25" in card
    assert [step for step, _, _ in list_checkpoints(out / "checkpoints")] == [30]


def test_resume_equals_uninterrupted_run(data: Path, tmp_path: Path) -> None:
    common = {"checkpointing_steps": 2, "gradient_accumulation_steps": 2, "train_batch_size": 4}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(settings(max_steps=6, **common), data, straight, PROVENANCE)
    train(settings(max_steps=3, **common), data, resumed, PROVENANCE)
    assert [s for s, _, _ in list_checkpoints(resumed / "checkpoints")] == [2, 3]
    train(settings(max_steps=6, **common), data, resumed, PROVENANCE)

    want, got = unet_state(straight), unet_state(resumed)
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)
    first, second = read_log(straight), read_log(resumed)
    assert [r["step"] for r in second] == list(range(1, 7))
    assert [r["loss"] for r in second] == pytest.approx([r["loss"] for r in first], abs=1e-6)
    assert [r["lr"] for r in second] == pytest.approx([r["lr"] for r in first])
    assert [s for s, _, _ in list_checkpoints(resumed / "checkpoints")] == [4, 6]  # limit 2


def test_resume_log_starts_after_checkpoint(data: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "model"
    train(settings(max_steps=2), data, out, PROVENANCE)
    # a crashed run's extra lines are dropped, and a log deleted by Snakemake is restored
    with (out / "train_log.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    train(settings(max_steps=3), data, out, PROVENANCE)
    (out / "train_log.jsonl").unlink()
    with caplog.at_level("INFO", logger="idc_diffusion.train.resume"):
        train(settings(max_steps=4), data, out, PROVENANCE)
    assert "resuming from checkpoint-3 (step 3)" in caplog.text
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert read_log(out)[2]["loss"] != 9.0


def test_changed_settings_discard_checkpoints(data: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "model"
    train(settings(max_steps=2), data, out, PROVENANCE)
    with caplog.at_level("INFO", logger="idc_diffusion.train.checkpoints"):
        train(settings(max_steps=2, learning_rate=5e-4), data, out, PROVENANCE)
    assert "deleting checkpoint" in caplog.text
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_fingerprint_ignores_bookkeeping_keys() -> None:
    base = settings()
    assert fingerprint(base) == fingerprint({**base, "resume": "never", "dataloader_workers": 3})
    assert fingerprint(base) == fingerprint({**base, "max_steps": 99})  # constant schedule
    cosine = {**base, "lr_scheduler": "cosine"}
    assert fingerprint(cosine) != fingerprint({**cosine, "max_steps": 99})
    assert fingerprint(base) != fingerprint({**base, "seed": 1})
    assert fingerprint(base, {"data": "a"}) != fingerprint(base, {"data": "b"})


def test_data_order_is_a_function_of_seed_and_step() -> None:
    stream = iter(BatchStream(10, 4, seed=7))
    batches = [next(stream) for _ in range(6)]
    assert sorted(i for b in batches[:3] for i in b) == list(range(10))  # one epoch
    assert batches[3:] != batches[:3]  # next epoch reshuffled
    resumed = iter(BatchStream(10, 4, seed=7, start=4))
    assert next(resumed) == batches[4] == batch_indices(10, 4, 7, 4)


def test_empty_train_split_fails_before_model_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metadata.jsonl").write_text("")

    def must_not_load(*args, **kwargs):
        raise AssertionError("model loaded before the data check")

    monkeypatch.setattr(run_setup, "load_base_pipeline", must_not_load)
    with pytest.raises(ValueError, match=r"train[/\\]metadata\.jsonl"):
        train(settings(), tmp_path, tmp_path / "model", PROVENANCE)


def test_mixed_image_sizes_are_rejected(tmp_path: Path) -> None:
    write_split(tmp_path, "train", 2, size=64)
    write_split(tmp_path / "other", "train", 1, size=32, offset=2)
    (tmp_path / "other" / "train" / "img_002.png").rename(tmp_path / "train" / "img_002.png")
    with (tmp_path / "train" / "metadata.jsonl").open("a") as handle:
        handle.write(json.dumps({"file_name": "img_002.png", "text": "CT"}) + "\n")
    with pytest.raises(ValueError, match="differ in size"):
        train(settings(), tmp_path, tmp_path / "model", PROVENANCE)


def test_bad_local_base_model_fails_before_training(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        train(settings(base_model=str(tmp_path / "nope")), data, tmp_path / "m", PROVENANCE)
    assert not (tmp_path / "m").exists()


def test_prediction_target() -> None:
    scheduler = DDPMScheduler.from_config(SD21_BASE_SCHEDULER)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    assert torch.equal(prediction_target(scheduler, latents, noise, timesteps), noise)
    v_scheduler = DDPMScheduler.from_config(SD21_BASE_SCHEDULER, prediction_type="v_prediction")
    velocity = v_scheduler.get_velocity(latents, noise, timesteps)
    assert torch.equal(prediction_target(v_scheduler, latents, noise, timesteps), velocity)
    alpha = scheduler.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(velocity, alpha * noise - sigma * latents, atol=1e-6)
    sample = DDPMScheduler.from_config(SD21_BASE_SCHEDULER, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_target(sample, latents, noise, timesteps)


def test_v_prediction_run(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def v_pipeline(*args, **kwargs) -> StableDiffusionPipeline:
        pipeline = models.load_base_pipeline(*args, **kwargs)
        config = {**SD21_BASE_SCHEDULER, "prediction_type": "v_prediction"}
        pipeline.scheduler = PNDMScheduler.from_config(config)
        return pipeline

    monkeypatch.setattr(run_setup, "load_base_pipeline", v_pipeline)
    out = tmp_path / "model"
    summary = train(settings(max_steps=3), data, out, PROVENANCE)
    assert summary["prediction_type"] == "v_prediction"
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"


def test_heldout_loss_is_deterministic(data: Path) -> None:
    pipeline = build_tiny_pipeline(seed=0)
    split = read_split(data, "val")
    images = load_images(split.paths)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    parts = (pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, scheduler)
    first = heldout_loss(pipeline.unet, *parts, images, split.captions, seed=3)
    again = heldout_loss(pipeline.unet, *parts, images, split.captions, seed=3, batch_size=3)
    other = heldout_loss(pipeline.unet, *parts, images, split.captions, seed=4)
    assert first == pytest.approx(again, rel=1e-5)
    assert first != pytest.approx(other, rel=1e-5)
    other_unet = build_tiny_pipeline(seed=1).unet
    assert heldout_loss(other_unet, *parts, images, split.captions, seed=3) != first


def test_tf32_setup_and_train_mode() -> None:
    previous = torch.get_float32_matmul_precision()
    try:
        enable_tf32()
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(previous)
    pipeline = build_tiny_pipeline(seed=0)
    parts = {
        "vae": pipeline.vae,
        "unet": pipeline.unet.eval(),
        "text_encoder": pipeline.text_encoder,
    }
    place_models(with_defaults(settings()), parts, torch.device("cpu"), torch.bfloat16)
    assert pipeline.unet.training and not pipeline.vae.training  # DDP's stride fix: train mode
    assert pipeline.unet.dtype == torch.float32 and pipeline.vae.dtype == torch.bfloat16


def test_process_group_timeout_covers_each_process_share_of_the_encoding() -> None:
    # 160,000 images over 8 processes at 5 images/s: 4,000 s each, on top of the 30 min
    assert process_group_timeout(160_000, 8) == timedelta(minutes=30, seconds=4000)
    assert process_group_timeout(0, 1) == timedelta(minutes=30)
