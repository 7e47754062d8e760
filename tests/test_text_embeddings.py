"""The frozen text encoder's cache: exact hidden states, bounded, and training unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from train_fixtures import CAPTIONS, settings, write_dataset

from idc_diffusion.train import run_setup
from idc_diffusion.train.fine_tune import train
from idc_diffusion.train.models import build_tiny_pipeline
from idc_diffusion.train.text_embeddings import BATCH, TextEmbeddingCache
from idc_diffusion.train.train_data import tokenize


@pytest.fixture(scope="module")
def pipeline() -> StableDiffusionPipeline:
    return build_tiny_pipeline(seed=0)


def test_hidden_states_equal_the_encoders(pipeline: StableDiffusionPipeline) -> None:
    captions = [CAPTIONS[0], "", CAPTIONS[1], CAPTIONS[0], "", CAPTIONS[2]]
    ids = tokenize(pipeline.tokenizer, captions)
    cache = TextEmbeddingCache(pipeline.text_encoder)
    with torch.no_grad():
        want = pipeline.text_encoder(ids, return_dict=False)[0]
    assert torch.equal(cache(ids), want)
    assert cache.encoded == len(cache) == 4  # each distinct sequence encoded once
    assert torch.equal(cache(ids.flip(0)), want.flip(0))
    assert cache.encoded == 4


def test_new_sequences_are_encoded_together_whatever_their_companions(
    pipeline: StableDiffusionPipeline,
) -> None:
    ids = tokenize(pipeline.tokenizer, CAPTIONS[:3])
    calls = []
    hook = pipeline.text_encoder.register_forward_hook(
        lambda module, args, out: calls.append(args[0].shape)
    )
    together = TextEmbeddingCache(pipeline.text_encoder)(ids)
    hook.remove()
    assert calls == [(BATCH, ids.shape[1])]  # three misses, one encoder call
    alone = TextEmbeddingCache(pipeline.text_encoder)(ids[1:2])
    assert torch.equal(alone[0], together[1])  # bit for bit: resumes see the same tensors


def test_least_recently_used_sequences_are_dropped(pipeline: StableDiffusionPipeline) -> None:
    a, b, c = tokenize(pipeline.tokenizer, CAPTIONS[:3]).split(1)
    cache = TextEmbeddingCache(pipeline.text_encoder, capacity=2)
    for ids in (a, b, a, c):  # c pushes out b, the least recently used
        cache(ids)
    assert len(cache) == 2 and cache.encoded == 3
    cache(a)
    assert cache.encoded == 3
    cache(b)
    assert cache.encoded == 4 and len(cache) == 2
    with pytest.raises(ValueError, match="capacity"):
        TextEmbeddingCache(pipeline.text_encoder, capacity=0)


def run(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, make, **options) -> dict:
    """Train with `make` in place of TextEmbeddingCache; the log's losses and the UNet."""
    monkeypatch.setattr(run_setup, "TextEmbeddingCache", make)
    data = tmp_path / "data"
    if not data.exists():
        write_dataset(data, train=12, val=2)
    out = tmp_path / name
    common = {"max_steps": 4, "caption_dropout": 0.5}
    train(settings(**common, **options), data, out, {"pixel_source": "synthetic"})
    losses = [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    unet = StableDiffusionPipeline.from_pretrained(out).unet.state_dict()
    return {"losses": losses, "unet": unet}


def test_training_with_the_cache_equals_encoding_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[TextEmbeddingCache] = []

    def recorded(encoder: torch.nn.Module) -> TextEmbeddingCache:
        made.append(TextEmbeddingCache(encoder))
        return made[-1]

    cached = run(tmp_path, "cached", monkeypatch, recorded)
    assert [cache.encoded for cache in made] == [len(CAPTIONS) + 1]  # + dropout's ""
    plain = run(tmp_path, "plain", monkeypatch, lambda encoder: None)
    assert cached["losses"] == plain["losses"]
    assert all(torch.equal(cached["unet"][k], plain["unet"][k]) for k in plain["unet"])
    made.clear()
    run(tmp_path, "trained", monkeypatch, recorded, train_text_encoder=True)
    assert made == []  # an encoder that learns is never cached
