"""The evaluate stage: generated samples vs the prepared dataset → metrics.json + report.html.

Real images for FID/KID/PRDC are the test split (a seeded subset of at most ``max_real_images``);
the memorization audit compares every generated sample with every training image. Images are
read in batches and reduced as they are read (features; grayscale histograms; grayscale 64 px
copies for the audit; native-size grayscale samples for MS-SSIM), so memory stays bounded by
those reductions. A generated image takes the structured fields (modality, window, body part,
sex, age band) of the real caption its prompt equals: intensity fidelity and the per-subgroup
metrics compare like with like.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from idc_diffusion import intensity as I
from idc_diffusion import metrics as M
from idc_diffusion import report as R
from idc_diffusion.adherence import prompt_adherence
from idc_diffusion.features import FeatureExtractor, build_extractor
from idc_diffusion.prdc import prdc
from idc_diffusion.subgroups import caption_index, subgroup_metrics

DEFAULT_SETTINGS: dict[str, Any] = {
    "feature_extractor": {
        "kind": "random",
        "seed": 0,
        "path": None,
        "input_size": 299,
        "input_range": None,
        "module": None,
    },
    "kid_subset_size": 50,
    "bootstrap": 200,
    "seed": 0,
    "prdc_k": 5,
    "min_group_size": 20,
    "max_real_images": 2000,
    "memorization_cosine_threshold": 0.95,
    "memorization_ssim_threshold": 0.9,
    "top_pairs": 8,
    "report_samples_per_prompt": 4,
    "report_max_prompts": 12,
}
log = logging.getLogger(__name__)
AUDIT_SIZE = 64  # side of the grayscale copies the memorization audit compares
BATCH_SIZE = 32
SUBSET_SEED = 0


def fill_settings(settings: dict | None) -> dict:
    """``settings`` over :data:`DEFAULT_SETTINGS` (one level deep for the extractor)."""
    merged = copy.deepcopy(DEFAULT_SETTINGS)
    for key, value in (settings or {}).items():
        if key == "feature_extractor" and isinstance(value, dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


# ----------------------------------------------------------------------------- inputs


def read_manifest(samples_dir: Path) -> pd.DataFrame:
    """The sample manifest; ValueError naming the file when missing or empty."""
    path = Path(samples_dir) / "manifest.parquet"
    if not path.is_file():
        raise ValueError(f"{path}: sample manifest not found")
    manifest = pd.read_parquet(path)
    if manifest.empty:
        raise ValueError(f"{path}: sample manifest is empty (no generated images)")
    missing = {"file_name", "prompt"} - set(manifest.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    if "prompt_index" not in manifest.columns:
        codes = {p: i for i, p in enumerate(dict.fromkeys(manifest["prompt"]))}
        manifest = manifest.assign(prompt_index=manifest["prompt"].map(codes))
    order = [c for c in ("prompt_index", "seed", "file_name") if c in manifest.columns]
    return manifest.sort_values(order, ignore_index=True)


def read_metadata(split_dir: Path) -> list[dict]:
    """The lines of ``split_dir/metadata.jsonl`` (empty when the file is missing)."""
    path = Path(split_dir) / "metadata.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    """A JSON-lines file's records (skipping bad lines), or [] when missing."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def choose_real(entries: list[dict], cap: int, seed: int = SUBSET_SEED) -> list[dict]:
    """At most ``cap`` entries: a seeded random subset, kept in file order."""
    if len(entries) <= cap:
        return entries
    keep = np.sort(np.random.default_rng(seed).choice(len(entries), size=cap, replace=False))
    return [entries[i] for i in keep]


# ----------------------------------------------------------------------------- images


def load_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 HxWx3 (grayscale repeated), optionally resized to ``size`` (w, h)."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        if size is not None and rgb.size != size:
            rgb = rgb.resize(size, Image.BILINEAR)
        return np.asarray(rgb)


def gray_of(rgb: np.ndarray) -> np.ndarray:
    """uint8 grayscale HxW of an HxWx3 image (ITU-R 601 luma, as PIL's "L")."""
    return np.asarray(Image.fromarray(rgb).convert("L"))


def small_gray(gray: np.ndarray, side: int = AUDIT_SIZE) -> np.ndarray:
    """uint8 ``side x side`` grayscale copy (bilinear with reduction)."""
    image = Image.fromarray(gray)
    return (
        np.asarray(image.resize((side, side), Image.BILINEAR))
        if image.size != (side, side)
        else gray
    )


def _chw(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` from HxW or HxWxC arrays."""
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked))


class ImageSet:
    """Images read in batches, reduced on the way: features, native grayscale, audit copies."""

    def __init__(self, paths: Sequence[Path], keep_gray: bool, keep_small: bool) -> None:
        self.paths = [Path(p) for p in paths]
        self.keep_gray, self.keep_small = keep_gray, keep_small
        self.gray: list[np.ndarray] = []
        self.small: list[np.ndarray] = []
        self.hists: list[np.ndarray] = []
        self.size: tuple[int, int] | None = None

    def batches(self, batch_size: int = BATCH_SIZE) -> Iterator[torch.Tensor]:
        """uint8 RGB batches ``[B, 3, H, W]`` (all resized to the first image's size)."""
        if self.size is None and self.paths:
            with Image.open(self.paths[0]) as first:
                self.size = first.size
        for start in range(0, len(self.paths), batch_size):
            rgbs = [load_rgb(p, self.size) for p in self.paths[start : start + batch_size]]
            for rgb in rgbs:
                gray = gray_of(rgb)
                self.hists.append(I.gray_histogram(gray))
                if self.keep_gray:
                    self.gray.append(gray)
                if self.keep_small:
                    self.small.append(small_gray(gray))
            yield _chw(rgbs)

    def features(self, extractor: FeatureExtractor) -> torch.Tensor:
        """Features of every image (reading them, and filling the kept copies)."""
        return M.extract_features(self.batches(), extractor)

    def small_tensor(self) -> torch.Tensor:
        return _chw(self.small) if self.small else torch.zeros(0, 1, AUDIT_SIZE, AUDIT_SIZE)


# ----------------------------------------------------------------------------- pieces


def caption_stats(entries: list[dict], top: int = 10) -> dict[str, Any]:
    """Unique captions and the most frequent ones."""
    counts = Counter(str(e.get("text")) for e in entries)
    return {"unique_captions": len(counts), "top_captions": counts.most_common(top)}


def rejected_stats(path: Path, top: int = 8) -> dict[str, Any]:
    """Rejected-input count and top reasons (None when the file is missing)."""
    if not Path(path).is_file():
        return {"rejected": None, "top_reasons": []}
    frame = pd.read_parquet(path)
    reasons = Counter(str(r) for r in frame.get("reason", pd.Series(dtype=str)))
    return {"rejected": len(frame), "top_reasons": reasons.most_common(top)}


def heldout_losses(summary: dict | None) -> dict[str, Any]:
    """Base and fine-tuned held-out loss with the relative improvement."""
    summary = summary or {}
    base, final = summary.get("heldout_loss_base"), summary.get("heldout_loss_final")
    rel = (base - final) / base if base and final is not None else None
    return {
        "base": base,
        "final": final,
        "relative_improvement": rel,
        "split": summary.get("heldout_split"),
        "images": summary.get("heldout_images"),
    }


def validation_curve(log: list[dict]) -> list[dict]:
    """``{"step", "heldout_loss"}`` of the train-log lines written at validation steps.

    The trainer writes the held-out loss of a validation step as ``val_loss``.
    """
    return [
        {"step": int(r["step"]), "heldout_loss": float(r["val_loss"])}
        for r in log
        if r.get("val_loss") is not None and r.get("step") is not None
    ]


def validation_grids(model_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of ``model_dir/validation/step-N.png``, by step."""
    found = []
    for path in (Path(model_dir) / "validation").glob("step-*.png"):
        step = path.stem.removeprefix("step-")
        if step.isdigit():
            found.append((int(step), path))
    return sorted(found)


def diversity_by_prompt(manifest: pd.DataFrame, gray: list[np.ndarray]) -> dict[str, Any]:
    """MS-SSIM diversity over the native-size grayscale samples grouped by prompt."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(manifest["prompt"]):
        groups.setdefault(str(prompt), []).append(i)
    images = {p: _chw([gray[i] for i in idx]) for p, idx in groups.items()}
    return M.ms_ssim_diversity(images)


def _pair_record(row: dict, sample_files: list[str], train_files: list[str]) -> dict[str, Any]:
    return {
        **row,
        "sample_file": sample_files[row["sample_index"]],
        "train_file_by_cosine": train_files[row["nearest_train_by_cosine"]],
        "train_file_by_ssim": train_files[row["nearest_train_by_ssim"]],
    }


def json_safe(value: Any) -> Any:
    """Recursively: NaN/inf → None, numpy scalars → Python, tuples → lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class ModelSamples:
    """One model's generated images: manifest, features, and the fields of each prompt."""

    name: str
    samples_dir: Path
    manifest: pd.DataFrame
    images: ImageSet
    features: torch.Tensor
    fields: list[dict | None]


def read_model_samples(
    name: str, samples_dir: Path, extractor: FeatureExtractor, captions: dict[str, dict]
) -> ModelSamples:
    """Read a sample folder (manifest + images) and extract its features once."""
    manifest = read_manifest(samples_dir)
    images = ImageSet([samples_dir / f for f in manifest["file_name"]], True, True)
    features = images.features(extractor)
    fields = [captions.get(str(prompt)) for prompt in manifest["prompt"]]
    return ModelSamples(name, samples_dir, manifest, images, features, fields)


def real_floor(
    train_feats: torch.Tensor, test_feats: torch.Tensor, settings: dict
) -> dict[str, Any]:
    """FID/KID between the real test and train images: what "as good as real" scores."""
    seed = int(settings["seed"])
    floor = M.fid_kid_from_features(test_feats, train_feats, settings["kid_subset_size"], seed=seed)
    floor["bootstrap"] = M.bootstrap_fid_kid(
        test_feats, train_feats, int(settings["bootstrap"]), seed
    )
    floor["compared"] = "real test images (n_real) vs real train images (n_generated)"
    return floor


def model_metrics(
    samples: ModelSamples,
    real: ImageSet,
    real_feats: torch.Tensor,
    real_used: list[dict],
    train: tuple[ImageSet, torch.Tensor] | None,
    train_entries: list[dict],
    dataset_dir: Path,
    settings: dict,
    identity: dict,
    notes: list[str],
) -> dict[str, Any]:
    """Every sample metric of one model against the real test images (and the train split)."""
    seed, k = int(settings["seed"]), int(settings["prdc_k"])
    fake_feats, manifest = samples.features, samples.manifest
    fid = M.fid_kid_from_features(real_feats, fake_feats, settings["kid_subset_size"], seed=seed)
    fid["bootstrap"] = M.bootstrap_fid_kid(real_feats, fake_feats, int(settings["bootstrap"]), seed)
    fid["feature_extractor"] = identity
    fidelity = _prdc(real_feats, fake_feats, k, notes)
    if fidelity is not None:
        fidelity["feature_extractor"] = identity
    diversity = diversity_by_prompt(manifest, samples.images.gray)
    unmatched = sum(f is None for f in samples.fields)
    if unmatched:
        notes.append(
            f"{samples.name}: {unmatched} of {len(manifest)} generated images have a prompt that "
            "is no caption of the dataset: left out of intensity fidelity, subgroup metrics and "
            "prompt adherence."
        )
    intensity = I.intensity_fidelity(
        real.hists,
        [I.group_key(e) for e in real_used],
        samples.images.hists,
        [I.group_key(f) for f in samples.fields],
    )
    subgroups = subgroup_metrics(
        real_feats, real_used, fake_feats, samples.fields, int(settings["min_group_size"]), k
    )
    memo_metrics, pairs = _memorization(settings, samples, train, dataset_dir, train_entries, notes)
    memo_metrics["feature_extractor"] = identity
    return {
        "fid_kid": fid,
        "prdc": fidelity,
        "ms_ssim_diversity": {**diversity, "computed_on": "grayscale pixels"},
        "intensity": intensity,
        "subgroups": {
            "min_group_size": int(settings["min_group_size"]),
            "feature_extractor": identity,
            "groups": subgroups,
        },
        "memorization": {**memo_metrics, "top_pairs": pairs},
    }


# ----------------------------------------------------------------------------- figures


def _save(figures_dir: Path, name: str, png: bytes | None) -> bytes | None:
    if png:
        (figures_dir / name).write_bytes(png)
    return png


def sample_figures(
    fine_tuned: ModelSamples,
    base: ModelSamples | None,
    test_by_caption: dict[str, list[Path]],
    settings: dict,
    figures_dir: Path,
) -> list[dict]:
    """Per prompt (the first ``report_max_prompts``): base, fine-tuned and real images.

    The base model's row shows the same prompt and seeds as the fine-tuned row.
    """
    per_prompt = int(settings["report_samples_per_prompt"])
    items = []
    for index, group in list(fine_tuned.manifest.groupby("prompt_index", sort=True))[
        : int(settings["report_max_prompts"])
    ]:
        prompt = str(group["prompt"].iloc[0])
        rows = []
        if base is not None:
            same = base.manifest[base.manifest["prompt"] == prompt]
            files = same["file_name"][:per_prompt]
            rows.append(("base model", [load_rgb(base.samples_dir / f) for f in files]))
        files = group["file_name"][:per_prompt]
        rows.append(("fine-tuned", [load_rgb(fine_tuned.samples_dir / f) for f in files]))
        real = [load_rgb(p) for p in test_by_caption.get(prompt, [])[:per_prompt]]
        rows += [("real (test)", real)] if real else []
        png = R.image_rows_png(rows, prompt)
        items.append(
            {
                "prompt": prompt,
                "n_generated": len(group),
                "n_real": len(test_by_caption.get(prompt, [])),
                "rows": [label for label, _ in rows],
                "figure": _save(figures_dir, f"samples_p{int(index):04d}.png", png),
            }
        )
    return items


def pairs_figure(pairs: list[dict], samples_dir: Path, train_dir: Path) -> bytes | None:
    """Top memorization pairs (sample beside its nearest training image by SSIM)."""
    if not pairs:
        return None
    shown = [
        (
            load_rgb(samples_dir / p["sample_file"]),
            load_rgb(train_dir / p["train_file_by_ssim"]),
            f"cos {p['cosine']:.3f} · SSIM {p['ssim']:.3f}",
        )
        for p in pairs
    ]
    return R.pairs_png(shown)


# ----------------------------------------------------------------------------- stage


def evaluate(
    settings: dict,
    samples_dir: Path,
    dataset_dir: Path,
    model_dir: Path,
    cohort_dir: Path,
    out_dir: Path,
    config: dict,
    base_samples_dir: Path | None = None,
) -> dict:
    """Compute the metrics, write ``metrics.json``, ``report.html`` and ``figures/``.

    With ``base_samples_dir`` (the base model's samples of the same prompts and seeds) every
    sample metric is computed for both models, and the report shows them side by side.
    """
    settings = fill_settings(settings)
    samples_dir, dataset_dir, model_dir = Path(samples_dir), Path(dataset_dir), Path(model_dir)
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    test_entries = read_metadata(dataset_dir / "test")
    if not test_entries:
        raise ValueError(f"{dataset_dir / 'test' / 'metadata.jsonl'}: no test images")
    train_entries = read_metadata(dataset_dir / "train")
    val_entries = read_metadata(dataset_dir / "val")
    extractor = build_extractor(settings["feature_extractor"])
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    for stale in figures_dir.glob("*.png"):
        stale.unlink()

    identity = extractor.describe()
    notes: list[str] = []
    if extractor.is_random:
        log.warning(
            "feature extractor %s is a seeded RANDOM network (tests/demo only): FID/KID/PRDC "
            "are not comparable to published numbers",
            extractor.name,
        )
    seed = int(settings["seed"])

    captions = caption_index(test_entries + train_entries + val_entries)
    models = {"fine_tuned": read_model_samples("fine-tuned", samples_dir, extractor, captions)}
    if base_samples_dir is not None:
        base_dir = Path(base_samples_dir)
        models["base"] = read_model_samples("base model", base_dir, extractor, captions)
    real_used = choose_real(test_entries, int(settings["max_real_images"]), seed)
    real = ImageSet([dataset_dir / "test" / e["file_name"] for e in real_used], False, False)
    real_feats = real.features(extractor)
    train = None
    if train_entries:
        paths = [dataset_dir / "train" / e["file_name"] for e in train_entries]
        train_set = ImageSet(paths, False, True)
        train = (train_set, train_set.features(extractor))
    context = (real, real_feats, real_used, train, train_entries, dataset_dir, settings)
    scores = {
        name: model_metrics(samples, *context, identity, notes) for name, samples in models.items()
    }
    floor = real_floor(train[1], real_feats, settings) if train else None
    adherence = None
    if train:
        adherence = prompt_adherence(
            (train[1], train_entries),
            (real_feats, real_used),
            {name: (m.features, m.fields) for name, m in models.items()},
            int(settings["bootstrap"]),
            seed,
        )
    manifest = models["fine_tuned"].manifest

    train_summary = read_json(model_dir / "train_summary.json")
    train_log = read_jsonl(model_dir / "train_log.jsonl")
    val_curve = validation_curve(train_log)
    grids = validation_grids(model_dir)
    if train_summary is None:
        notes.append(f"{model_dir / 'train_summary.json'} is missing: no held-out losses.")
    if not train_log:
        notes.append(f"{model_dir / 'train_log.jsonl'} is missing or empty: no loss curve.")
    training_notes = []
    if train_log and not val_curve:
        training_notes.append(
            f"{model_dir / 'train_log.jsonl'} has no val_loss lines: no validation-loss curve."
        )
    if not grids:
        training_notes.append(
            f"No validation grids ({model_dir / 'validation' / 'step-N.png'} not found)."
        )
    pixel_source = sorted({str(e.get("pixel_source")) for e in test_entries + train_entries})
    cohort = read_json(cohort_dir / "summary.json")

    metrics = {
        "feature_extractor": identity,
        "pixel_source": pixel_source,
        "counts": {
            "generated": len(manifest),
            "prompts": int(manifest["prompt"].nunique()),
            "real_test_available": len(test_entries),
            "real_test_used": len(real_used),
            "train": len(train_entries),
        },
        **scores["fine_tuned"],
        "base_model": scores.get("base"),
        "real_floor": floor,
        "adherence": adherence,
        "heldout_loss": heldout_losses(train_summary),
        "validation": {"heldout_loss": val_curve, "grids": [int(step) for step, _ in grids]},
        "train_summary": train_summary,
        "settings": settings,
        "notes": notes,
    }
    metrics = json_safe(metrics)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")

    test_by_caption: dict[str, list[Path]] = {}
    for entry in test_entries:
        test_by_caption.setdefault(str(entry.get("text")), []).append(
            dataset_dir / "test" / entry["file_name"]
        )
    context = {
        "run_name": config.get("run_name") or config.get("name") or out_dir.resolve().parent.name,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "idc_version": (cohort or {}).get("idc_version"),
        "pixel_source": pixel_source,
        "feature_extractor": identity,
        "notes": notes,
        "cohort": cohort,
        "citations": _read_text(cohort_dir / "CITATIONS.md"),
        "data": {
            "train_images": len(train_entries),
            "test_images": len(test_entries),
            "test_images_used": len(real_used),
            **caption_stats(train_entries),
            **rejected_stats(dataset_dir / "rejected.parquet"),
        },
        "training": {
            "summary": train_summary,
            "loss_figure": _save(
                figures_dir, "loss_curve.png", R.loss_curve_png(train_log, val_curve)
            ),
            "validation_grids": [(step, path.read_bytes()) for step, path in grids],
            "notes": training_notes,
        },
        "samples": sample_figures(
            models["fine_tuned"], models.get("base"), test_by_caption, settings, figures_dir
        ),
        "metrics": metrics,
        "adherence": {
            **(metrics["adherence"] or {}),
            "figure": _save(figures_dir, "adherence_confusion.png", R.confusion_png(adherence)),
        },
        "intensity": {
            **metrics["intensity"],
            "figure": _save(
                figures_dir, "intensity_histograms.png", R.histograms_png(metrics["intensity"])
            ),
        },
        "subgroups": metrics["subgroups"],
        "memorization": memorization_context(
            metrics["memorization"], samples_dir, dataset_dir, figures_dir
        ),
        "provenance": {
            "config": config,
            "packages": R.package_versions(),
            "git_commit": R.git_commit(),
            "idc_index_data_version": (cohort or {}).get("idc_index_data_version"),
        },
    }
    (out_dir / "report.html").write_text(R.render_report(context), encoding="utf-8")
    return metrics


def memorization_context(
    memo: dict, samples_dir: Path, dataset_dir: Path, figures_dir: Path
) -> dict[str, Any]:
    """The fine-tuned model's memorization audit as the report shows it."""
    pairs = memo.get("top_pairs") or []
    figure = pairs_figure(pairs, samples_dir, dataset_dir / "train")
    return {
        "summary": {k: v for k, v in memo.items() if k not in ("feature_extractor", "top_pairs")},
        "pairs": pairs,
        "figure": _save(figures_dir, "memorization_pairs.png", figure),
        "note": memo.get("note"),
    }


def _prdc(real: torch.Tensor, fake: torch.Tensor, k: int, notes: list[str]) -> dict | None:
    """PRDC with ``k`` neighbours (capped below the set sizes; None with a note when too few)."""
    k_eff = min(k, len(real) - 1, len(fake) - 1)
    if k_eff < 1:
        notes.append("Too few images for precision/recall/density/coverage.")
        return None
    if k_eff < k:
        notes.append(f"PRDC computed with k={k_eff} (evaluate.prdc_k={k} needs more images).")
    return prdc(real, fake, k=k_eff)


def _memorization(
    settings: dict,
    samples: ModelSamples,
    train: tuple[ImageSet, torch.Tensor] | None,
    dataset_dir: Path,
    train_entries: list[dict],
    notes: list[str],
) -> tuple[dict[str, Any], list[dict]]:
    """Memorization summary and top pairs (a note instead when there is no train split).

    ``train`` is the train split's images (with 64 px grayscale copies) and features.
    """
    cos_t = float(settings["memorization_cosine_threshold"])
    ssim_t = float(settings["memorization_ssim_threshold"])
    if train is None:
        message = f"{dataset_dir / 'train' / 'metadata.jsonl'}: no training images; not audited."
        notes.append(message)
        return {"note": message, "fraction_flagged": None}, []
    train_set, train_feats = train
    table = M.memorization(
        samples.images.small_tensor(),
        train_set.small_tensor(),
        samples.features,
        train_feats,
        threshold=cos_t,
        top_k=32,
        ssim_threshold=ssim_t,
        ssim_size=AUDIT_SIZE,
    )
    summary = M.memorization_summary(table, cos_t, ssim_t, 32)
    summary["audit_image_size"] = AUDIT_SIZE
    train_files = [e["file_name"] for e in train_entries]
    sample_files = [str(f) for f in samples.manifest["file_name"]]
    top = M.top_pairs(table, int(settings["top_pairs"])).to_dict("records")
    pairs = [json_safe(_pair_record(row, sample_files, train_files)) for row in top]
    return summary, pairs


def _read_text(path: Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
