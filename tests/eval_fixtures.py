"""Small fake dataset / samples / model / cohort folders for the evaluate-stage tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

CAPTIONS = (
    "CT of the chest, axial slice, lung window",
    "MR of the brain, axial slice",
    "Chest radiograph, PA view",
)


def blob_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """uint8 HxW image: a few random Gaussian blobs and a mild texture."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = np.zeros((size, size))
    for _ in range(rng.integers(2, 5)):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(size / 16, size / 4)
        image += rng.uniform(0.4, 1.0) * np.exp(
            -((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2)
        )
    image += 0.05 * rng.standard_normal((size, size))
    return (255 * np.clip(image / max(image.max(), 1e-6), 0, 1)).astype(np.uint8)


def blob_tensor(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """uint8 ``[n, 1, size, size]`` blob images."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([blob_image(rng, size) for _ in range(n)]))[:, None]


def noise_tensor(n: int, seed: int, size: int = 64, channels: int = 1) -> torch.Tensor:
    """uint8 ``[n, channels, size, size]`` independent uniform noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


FIELDS = {  # the structured fields behind each caption (as metadata.jsonl carries them)
    CAPTIONS[0]: {"modality": "CT", "body_part": "chest", "window": "lung", "sex": "female"},
    CAPTIONS[1]: {"modality": "MR", "body_part": "brain", "window": None, "sex": "male"},
    CAPTIONS[2]: {"modality": "radiograph", "body_part": "chest", "window": None, "sex": None},
}


def _write_split(root: Path, split: str, images: list[np.ndarray], pixel_source: str) -> list[dict]:
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, image in enumerate(images):
        name = f"shard-0_{split}_{i:04d}.png"
        Image.fromarray(image).save(split_dir / name)
        caption = CAPTIONS[i % len(CAPTIONS)]
        lines.append(
            {"file_name": name, "text": caption, "pixel_source": pixel_source, **FIELDS[caption]}
        )
    (split_dir / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines


@dataclass
class FakeRun:
    samples_dir: Path
    dataset_dir: Path
    model_dir: Path
    cohort_dir: Path
    out_dir: Path
    train_images: list[np.ndarray]
    copied_train: dict[int, int]  # manifest row -> train index it copies

    def evaluate(self, settings: dict, run_name: str = "fake") -> dict:
        """The evaluate stage on this run's folders, with `settings` as the config section."""
        from idc_diffusion.evaluate.evaluation import evaluate

        config = {"run_name": run_name, "evaluate": settings}
        return evaluate(
            settings,
            self.samples_dir,
            self.dataset_dir,
            self.model_dir,
            self.cohort_dir,
            self.out_dir,
            config,
        )


def write_fake_run(
    root: Path,
    n_train: int = 30,
    n_test: int = 12,
    samples_per_prompt: int = 4,
    pixel_source: str = "synthetic",
    rgb_samples: bool = True,
    with_model_files: bool = True,
) -> FakeRun:
    """Dataset (train/test/rejected), samples (2 of them train copies, one shifted), model,
    cohort."""
    rng = np.random.default_rng(0)
    dataset = root / "dataset"
    train = [blob_image(rng) for _ in range(n_train)]
    test = [blob_image(rng) for _ in range(n_test)]
    _write_split(dataset, "train", train, pixel_source)
    _write_split(dataset, "test", test, pixel_source)
    pd.DataFrame(
        {
            "SeriesInstanceUID": ["1.2.3", "1.2.4", "1.2.5"],
            "file": ["a.dcm", "b.dcm", "c.dcm"],
            "slice_index": [0, 1, 2],
            "stage": ["decode", "decode", "window"],
            "reason": ["unsupported transfer syntax", "unsupported transfer syntax", "blank"],
            "shard": ["shard-0"] * 3,
        }
    ).to_parquet(dataset / "rejected.parquet")

    samples = root / "samples"
    (samples / "shard-0").mkdir(parents=True)
    copied = {0: 3, 5: 17}
    shifted = {5: (1, -2)}  # row 5 is train 17 moved 1 px down and 2 px left
    rows = []
    for p, prompt in enumerate(CAPTIONS):
        for s in range(samples_per_prompt):
            row = len(rows)
            image = train[copied[row]] if row in copied else blob_image(rng)
            if row in shifted:
                image = np.roll(image, shifted[row], axis=(0, 1))
            if rgb_samples:
                image = np.repeat(image[:, :, None], 3, axis=2)
            name = f"shard-0/p{p:04d}_s{s:06d}.png"
            Image.fromarray(image).save(samples / name)
            rows.append(
                {
                    "file_name": name,
                    "prompt": prompt,
                    "prompt_index": p,
                    "seed": s,
                    "scheduler": "ddim",
                    "num_inference_steps": 2,
                    "guidance_scale": 4.0,
                    "negative_prompt": "",
                    "model_dir": "results/model",
                    "shard": 0,
                    "seconds": 0.1,
                }
            )
    pd.DataFrame(rows).to_parquet(samples / "manifest.parquet")

    model = root / "model"
    model.mkdir()
    if with_model_files:
        log = [
            {"step": i, "epoch": 0, "loss": 1.0 / (1 + i), "lr": 1e-4, "seconds": i}
            for i in range(1, 41)
        ]
        log += [{"step": 20, "val_loss": 0.18}, {"step": 40, "val_loss": 0.16}]
        (model / "validation").mkdir()
        for step in (20, 40):
            grid = np.full((16, 32), step * 4, np.uint8)
            Image.fromarray(grid).save(model / "validation" / f"step-{step}.png")
        (model / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
        summary = {
            "heldout_loss_base": 0.2,
            "heldout_loss_final": 0.15,
            "heldout_split": "val",
            "heldout_images": 8,
            "steps": 40,
            "prediction_type": "v_prediction",
            "base_model": "tiny",
            "resolution": 64,
            "train_images": n_train,
            "effective_batch_size": 4,
            "seed": 0,
            "seconds": 12.5,
        }
        (model / "train_summary.json").write_text(json.dumps(summary))

    cohort = root / "cohort"
    cohort.mkdir()
    (cohort / "summary.json").write_text(json.dumps(COHORT_SUMMARY))
    (cohort / "CITATIONS.md").write_text(CITATIONS)
    return FakeRun(samples, dataset, model, cohort, root / "eval", train, copied)


COHORT_SUMMARY = {
    "idc_version": "v25",
    "idc_index_data_version": "25.0.5",
    "total": {"series": 10, "patients": 9, "instances": 300, "size_MB": 42.0},
    "by_split": {"train": {"series": 6}, "val": {"series": 2}, "test": {"series": 2}},
    "by_stratum": {
        "chest_ct": {"series": 4, "patients": 4, "by_split": {"train": 2, "val": 1, "test": 1}},
        "brain_mr": {"series": 6, "patients": 5, "by_split": {"train": 4, "val": 1, "test": 1}},
    },
    "licenses": {"CC BY 4.0": 10},
}
CITATIONS = """# Citations

- NLST <script>alert(1)</script> https://doi.org/10.7937/TCIA.HMQ8-J677
- Fedorov et al., *RadioGraphics* 2023, doi:10.1148/rg.230180
- [IDC portal](https://portal.imaging.datacommons.cancer.gov) and [bad](javascript:alert(1))

## Licenses

| license | series |
|---|---|
| CC BY 4.0 | 10 |
"""


def tiny_feature_net() -> torch.nn.Module:
    """A small conv net: the architecture a safetensors extractor test loads weights into."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
    )
