"""Base model resolution: the tiny local SD-2 architecture, local pipeline folders, hub ids.

``load_base_pipeline`` takes the ``train.base_model`` spec:

* ``"tiny"``: a seeded, randomly initialised Stable Diffusion 2 architecture built entirely
  from configs (:func:`build_tiny_pipeline`): for the offline demo and the tests.
* an existing folder: a diffusers ``StableDiffusionPipeline`` folder, checked component by
  component (:func:`~idc_diffusion.train.base_model.check_pipeline_folder`) before anything is
  loaded. The workflow's jobs always load ``results/base_model/`` this way.
* anything else: a Hugging Face hub id, read by diffusers through the hub cache (for use by
  hand and in benchmarks; the workflow fetches hub ids once with the ``base_model`` rule,
  see :mod:`idc_diffusion.train.base_model`).
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from idc_diffusion.core.captions import BODY_PART_TEXT, MODALITY_TEXT, SEX_TEXT, VIEW_TEXT
from idc_diffusion.train.base_model import (
    TINY,
    ModelError,
    check_pipeline_folder,
    is_local,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77

# stable-diffusion-2-1-base's scheduler/scheduler_config.json (PNDM, epsilon prediction).
SD21_BASE_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

# Words the tiny tokenizer knows whole; anything else falls back to characters.
_EXTRA_WORDS = (
    "of the and or with slice window view years older infant child image scan "
    "axial coronal sagittal oblique lung mediastinum bone brain abdomen soft tissue liver "
    "chest head neck pelvis spine breast kidney prostate heart knee hip shoulder hand foot "
    "lateral frontal left right male female ct mr mri radiograph mammogram x ray photo"
)
EXTRA_WORDS = tuple(_EXTRA_WORDS.split())

# --------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def caption_words() -> list[str]:
    """Lower-case words of the caption vocabulary (captions.py's maps plus EXTRA_WORDS)."""
    texts: list[str] = [*EXTRA_WORDS]
    for table in (MODALITY_TEXT, BODY_PART_TEXT, VIEW_TEXT, SEX_TEXT):
        texts.extend(table.values())
    words = {w for text in texts for w in text.lower().replace(",", " ").split() if w.isalpha()}
    return sorted(words)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges (CLIP style, ``</w>`` ends a word) that turn every word into one token.

    Plain BPE training with all words weighted equally, ties broken by the pair itself, so
    the result is deterministic and applying the merges in order reproduces whole words.
    """
    sequences = [[*w[:-1], w[-1] + "</w>"] for w in words if len(w) > 1]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in sequences:
            for pair in itertools.pairwise(seq):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        sequences = [_merge(seq, best) for seq in sequences]
        sequences = [seq for seq in sequences if len(seq) > 1]


def _merge(seq: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Write a CLIP ``vocab.json`` and ``merges.txt`` for the caption vocabulary."""
    alphabet = list(bytes_to_unicode().values())
    merges = learn_merges(caption_words())
    tokens = [*alphabet, *(a + "</w>" for a in alphabet), *(a + b for a, b in merges), BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with whole-word tokens for caption words, characters otherwise."""
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_LENGTH)


# --------------------------------------------------------------------------- models


def build_tiny_pipeline(seed: int = 0, sample_size: int = 64) -> StableDiffusionPipeline:
    """A tiny SD-2-architecture pipeline with seeded random weights, built offline.

    ``sample_size`` is the pixel resolution (a multiple of 8; the VAE downsamples 8x).
    The global torch RNG is left untouched.
    """
    if sample_size % 8:
        raise ModelError(f"tiny model: sample_size must be a multiple of 8, got {sample_size}")
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            sample_size=sample_size,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            scaling_factor=0.18215,
        )
        vocab = tokenizer.get_vocab()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_LENGTH,
                projection_dim=32,
                hidden_act="gelu",
                bos_token_id=vocab[BOS],
                eos_token_id=vocab[EOS],
                pad_token_id=vocab[EOS],
            )
        )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=PNDMScheduler.from_config(SD21_BASE_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# --------------------------------------------------------------------------- loading


def load_base_pipeline(
    spec: str, revision: str | None = None, tiny_seed: int = 0, resolution: int = 64
) -> StableDiffusionPipeline:
    """The base pipeline for a ``train.base_model`` spec (see the module docstring)."""
    if spec == TINY:
        return build_tiny_pipeline(seed=tiny_seed, sample_size=resolution)
    options: dict[str, Any] = {
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    if is_local(spec):
        local = Path(spec).expanduser()
        check_pipeline_folder(local)
        try:
            return StableDiffusionPipeline.from_pretrained(local, **options)
        except Exception as exc:
            raise ModelError(f"{local}: cannot load the pipeline: {exc}") from exc
    try:
        return StableDiffusionPipeline.from_pretrained(spec, revision=revision, **options)
    except Exception as exc:
        raise ModelError(
            f"cannot load base model {spec!r} (revision {revision}) from the Hugging Face hub "
            f"or its cache: {type(exc).__name__}: {exc}. Without internet, point "
            "train.base_model at a local pipeline folder, or pre-download it into the hub "
            "cache (HF_HOME) and set HF_HUB_OFFLINE=1."
        ) from exc
