"""The evaluate stage: generated samples vs the prepared dataset → metrics.json + report.html.

FID/KID/PRDC, intensity fidelity and the subgroups compare *matched* sets
(:mod:`idc_diffusion.evaluate.matching`): the same number of real test images and generated
images of each caption/prompt, at most ``max_real_images`` per side. MS-SSIM diversity of the
samples is shown beside the real images' own within-caption MS-SSIM. The memorization audit
(:mod:`idc_diffusion.evaluate.memorization`) compares every generated sample with every training
image, calibrated on the test images (at most ``max_real_images``). Images are read in batches
and reduced as they are read (features; grayscale histograms; grayscale 64 px copies for the
audit; native-size grayscale for MS-SSIM), so memory stays bounded by those reductions. A
generated image takes the structured fields (modality, window, body part, sex, age band) of the
real caption its prompt equals. Every sample metric is computed for the fine-tuned model and,
when its samples are given, for the base model (same prompts and seeds), beside the real-vs-real
floor (test vs train images); prompt adherence (:mod:`idc_diffusion.evaluate.adherence`) reads
each caption field back from the images. An unreadable image, images of different sizes within a
set, or a file listed twice in the manifest stop the stage with one line naming the file.
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
from PIL import Image, UnidentifiedImageError

from idc_diffusion.evaluate import intensity as I
from idc_diffusion.evaluate import memorization as MEMO
from idc_diffusion.evaluate import metrics as M
from idc_diffusion.evaluate import report_figures as F
from idc_diffusion.evaluate.adherence import gaussian_blur, prompt_adherence
from idc_diffusion.evaluate.features import FeatureExtractor, build_extractor
from idc_diffusion.evaluate.matching import Matched, match_by_prompt, subset_indices, unmatched
from idc_diffusion.evaluate.provenance import git_commit, package_versions
from idc_diffusion.evaluate.report import is_synthetic, render_report
from idc_diffusion.evaluate.subgroups import caption_index, subgroup_metrics

DEFAULT_SETTINGS: dict[str, Any] = {
    "feature_extractor": {
        "kind": "inception",
        "allow_random": False,
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
    "memorization_quantile": 0.99,
    "memorization_max_shift": 2,
    "top_pairs": 8,
    "adherence_blur": [1.0, 2.0],
    "report_samples_per_prompt": 4,
    "report_max_prompts": 12,
}
log = logging.getLogger(__name__)
AUDIT_SIZE = MEMO.AUDIT_SIZE
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
    repeated = manifest["file_name"][manifest["file_name"].duplicated()]
    if len(repeated):
        raise ValueError(
            f"{path}: {len(repeated)} duplicated rows (e.g. {repeated.iloc[0]!r} listed more than "
            "once); every sample must be counted once: rerun the sample stage"
        )
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
    return [entries[i] for i in subset_indices(len(entries), cap, seed)]


# ----------------------------------------------------------------------------- images


def load_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 HxWx3 (grayscale repeated); ValueError naming the file when it cannot be decoded
    or, with ``size`` (w, h), has another size (never resized: that would hide a mix-up)."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise ValueError(
            f"{path}: not a readable image ({exc}); regenerate it or remove it from its list"
        ) from exc
    if size is not None and rgb.size != size:
        raise ValueError(
            f"{path}: {rgb.size[0]}x{rgb.size[1]} px, but the other images of its set are "
            f"{size[0]}x{size[1]}; one set must not mix sizes (regenerate it at one size)"
        )
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
        """uint8 RGB batches ``[B, 3, H, W]``; ValueError naming an image of another size."""
        if self.size is None and self.paths:
            first = load_rgb(self.paths[0])
            self.size = (first.shape[1], first.shape[0])
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

    def read(self) -> None:
        """Read every image, filling the kept copies (no features)."""
        for _ in self.batches():
            pass

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


def diversity_by_caption(captions: Sequence[str], gray: list[np.ndarray]) -> dict[str, Any]:
    """MS-SSIM diversity over native-size grayscale images grouped by caption (or prompt)."""
    groups: dict[str, list[int]] = {}
    for i, caption in enumerate(captions):
        groups.setdefault(str(caption), []).append(i)
    images = {c: _chw([gray[i] for i in idx]) for c, idx in groups.items()}
    return M.ms_ssim_diversity(images)


def diversity_with_reference(
    prompts: Sequence[str],
    generated_gray: list[np.ndarray],
    real_captions: Sequence[str],
    real_gray: list[np.ndarray],
) -> dict[str, Any]:
    """MS-SSIM of the samples of each prompt beside the real images' own within-caption MS-SSIM.

    The reference is what "as diverse as the data" looks like: slices of one caption are
    alike, so a sample set far below it (noise, say) is not "more diverse", it is off.
    """
    generated = diversity_by_caption(prompts, generated_gray)
    real = diversity_by_caption(real_captions, real_gray)
    for prompt, row in generated["per_prompt"].items():
        ref = real["per_prompt"].get(prompt) or {}
        row["real_mean"], row["real_samples"] = ref.get("mean"), ref.get("samples", 0)
    return {
        **generated,
        "real_overall": real["overall"],
        "real_prompts_scored": real["prompts_scored"],
        "computed_on": "grayscale pixels",
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


# ----------------------------------------------------------------------------- per model


@dataclass
class ModelSamples:
    """One model's generated images: manifest, images, features, and each prompt's fields."""

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


@dataclass
class RealSets:
    """The real images every model is compared with, read once.

    ``test``: every test entry; ``train``: the train split's images (64 px copies kept for the
    memorization audit) and features, None without a train split; ``train_blurred``: blur
    sigma -> features of the train images blurred by it (the adherence classifier's extra
    rows); ``heldout``: the audit's null (a seeded subset of the test images, 64 px copies).
    """

    dataset_dir: Path
    test_entries: list[dict]
    train_entries: list[dict]
    train: tuple[ImageSet, torch.Tensor] | None
    train_blurred: dict[float, torch.Tensor]
    heldout: ImageSet | None
    _matched: dict[tuple[int, ...], tuple[ImageSet, torch.Tensor]]

    def matched(self, indices: list[int], extractor: FeatureExtractor):
        """The test images at ``indices`` (grayscale kept) and their features, read once."""
        key = tuple(indices)
        if key not in self._matched:
            paths = [self.dataset_dir / "test" / self.test_entries[i]["file_name"] for i in key]
            images = ImageSet(paths, True, False)
            self._matched[key] = (images, images.features(extractor))
        return self._matched[key]


def read_real_sets(
    dataset_dir: Path,
    test_entries: list[dict],
    train_entries: list[dict],
    extractor: FeatureExtractor,
    settings: dict,
) -> RealSets:
    """Read the train split (features, blurred copies' features, audit copies) and the
    audit's held-out null once."""
    train = heldout = None
    blurred: dict[float, torch.Tensor] = {}
    if train_entries:
        paths = [dataset_dir / "train" / e["file_name"] for e in train_entries]
        train_set = ImageSet(paths, False, True)
        train = (train_set, train_set.features(extractor))
        for sigma in map(float, settings["adherence_blur"]):
            batches = ImageSet(paths, False, False).batches()
            blurred[sigma] = M.extract_features(
                (gaussian_blur(b, sigma) for b in batches), extractor
            )
        null_entries = choose_real(
            test_entries, int(settings["max_real_images"]), int(settings["seed"])
        )
        heldout = ImageSet(
            [dataset_dir / "test" / e["file_name"] for e in null_entries], False, True
        )
        heldout.read()
    return RealSets(dataset_dir, test_entries, train_entries, train, blurred, heldout, {})


def model_metrics(
    samples: ModelSamples,
    real_sets: RealSets,
    extractor: FeatureExtractor,
    settings: dict,
    notes: list[str],
) -> tuple[dict[str, Any], Matched]:
    """Every sample metric of one model against matched real test images (and the train split).

    Returns the metrics (``counts``, ``compared``, ``fid_kid``, ``ms_ssim_diversity``,
    ``intensity``, ``subgroups``, ``memorization`` with its ``flagged`` samples and the
    ``shown`` pairs) and the matched sets.
    """
    seed, cap = int(settings["seed"]), int(settings["max_real_images"])
    identity = extractor.describe()
    manifest, test_entries = samples.manifest, real_sets.test_entries
    prompts = [str(p) for p in manifest["prompt"]]
    matched = match_by_prompt([str(e.get("text")) for e in test_entries], prompts, cap, seed)
    if not matched.generated:
        matched = unmatched(len(test_entries), len(manifest), cap, seed)
        notes.append(
            f"UNMATCHED SETS ({samples.name}): no prompt is a caption of the test split "
            "(sample.prompts is not test_captions), so FID/KID/PRDC compare all generated images "
            "with real test images whose mix of conditions may differ; the numbers mix image "
            "quality with that mismatch."
        )
    real_used = [test_entries[i] for i in matched.real]
    real, real_feats = real_sets.matched(matched.real, extractor)
    fake_feats = samples.features[torch.tensor(matched.generated)]
    fake_fields = [samples.fields[i] for i in matched.generated]
    fid = headline_metrics(real_feats, fake_feats, settings)
    fid["feature_extractor"] = identity
    comparison = matched.summary(len(test_entries), len(manifest))
    if matched.matched and (comparison["generated_left_out"] or comparison["real_left_out"]):
        notes.append(
            f"{samples.name}: FID/KID/PRDC, intensity and subgroups compare "
            f"{comparison['n_generated']} generated with {comparison['n_real']} real test "
            f"images, the same number per caption ({comparison['captions']} captions); "
            f"{comparison['generated_left_out']} generated and {comparison['real_left_out']} "
            "real images had no counterpart of their caption (or exceeded "
            "evaluate.max_real_images) and were left out."
        )
    diversity = diversity_with_reference(
        prompts, samples.images.gray, [str(e.get("text")) for e in real_used], real.gray
    )
    intensity = I.intensity_fidelity(
        real.hists,
        [I.group_key(e) for e in real_used],
        [samples.images.hists[i] for i in matched.generated],
        [I.group_key(f) for f in fake_fields],
    )
    subgroups = subgroup_metrics(
        real_feats,
        real_used,
        fake_feats,
        fake_fields,
        int(settings["min_group_size"]),
        int(settings["prdc_k"]),
        n_resamples=int(settings["bootstrap"]),
        seed=seed,
    )
    memo_metrics, flagged, shown = _memorization(settings, samples, real_sets, notes)
    return {
        "counts": {
            "generated": len(manifest),
            "prompts": int(manifest["prompt"].nunique()),
            "real_test_used": len(real_used),
            "generated_used": len(matched.generated),
        },
        "compared": comparison,
        "fid_kid": fid,
        "ms_ssim_diversity": diversity,
        "intensity": intensity,
        "subgroups": {
            "min_group_size": int(settings["min_group_size"]),
            "feature_extractor": identity,
            "groups": subgroups,
        },
        "memorization": {**memo_metrics, "flagged": flagged, "shown": shown},
    }, matched


def real_floor(
    train_feats: torch.Tensor, test_feats: torch.Tensor, settings: dict
) -> dict[str, Any]:
    """FID/KID between real test and real train images: what "as good as real" scores.

    The train side is a seeded subset of as many images as the test side, so both sides
    have the n of the models' comparison (FID's bias depends on n).
    """
    keep = subset_indices(len(train_feats), len(test_feats), int(settings["seed"]))
    floor = headline_metrics(test_feats, train_feats[torch.tensor(keep)], settings)
    floor["compared"] = "real train images (as generated) vs real test images (as real)"
    return floor


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
        png = F.image_rows_png(rows, prompt)
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
    """Each listed sample beside the training image it is most similar to, with that similarity."""
    if not pairs:
        return None
    shown = [
        (
            load_rgb(samples_dir / p["sample_file"]),
            load_rgb(train_dir / p["train_file"]),
            f"{'FLAGGED · ' if p['flagged'] else ''}similarity {p['similarity']:.3f} "
            f"(shift {p['shift_y']:+d},{p['shift_x']:+d} px)",
        )
        for p in pairs
    ]
    return F.pairs_png(shown)


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
    pixel_source = sorted({str(e.get("pixel_source")) for e in test_entries + train_entries})
    extractor = build_extractor(settings["feature_extractor"], is_synthetic(pixel_source))
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
    real_sets = read_real_sets(dataset_dir, test_entries, train_entries, extractor, settings)
    scores, matches = {}, {}
    for name, samples in models.items():
        scores[name], matches[name] = model_metrics(samples, real_sets, extractor, settings, notes)
    fine_tuned, real_indices = scores["fine_tuned"], matches["fine_tuned"].real
    real_used = [test_entries[i] for i in real_indices]
    _, real_feats = real_sets.matched(real_indices, extractor)
    floor = adherence = None
    if real_sets.train is not None:
        train_feats = real_sets.train[1]
        floor = real_floor(train_feats, real_feats, settings)
        adherence = prompt_adherence(
            (train_feats, train_entries),
            (real_feats, real_used),
            {name: (m.features, m.fields) for name, m in models.items()},
            int(settings["bootstrap"]),
            seed,
            train_blurred=real_sets.train_blurred,
        )
    memo = fine_tuned["memorization"]

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
    cohort = read_json(cohort_dir / "summary.json")

    metrics = {
        "feature_extractor": identity,
        "pixel_source": pixel_source,
        **fine_tuned,
        "counts": {
            **fine_tuned["counts"],
            "real_test_available": len(test_entries),
            "train": len(train_entries),
        },
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
                figures_dir, "loss_curve.png", F.loss_curve_png(train_log, val_curve)
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
            "figure": _save(figures_dir, "adherence_confusion.png", F.confusion_png(adherence)),
        },
        "intensity": {
            **metrics["intensity"],
            "figure": _save(
                figures_dir, "intensity_histograms.png", F.histograms_png(metrics["intensity"])
            ),
        },
        "subgroups": metrics["subgroups"],
        "memorization": memorization_context(
            {k: v for k, v in memo.items() if k not in ("flagged", "shown")},
            memo["flagged"],
            memo["shown"],
            samples_dir,
            dataset_dir / "train",
            figures_dir,
        ),
        "provenance": {
            "config": config,
            "packages": package_versions(),
            "git_commit": git_commit(),
            "idc_index_data_version": (cohort or {}).get("idc_index_data_version"),
        },
    }
    (out_dir / "report.html").write_text(render_report(context), encoding="utf-8")
    return metrics


def headline_metrics(real: torch.Tensor, fake: torch.Tensor, settings: dict) -> dict[str, Any]:
    """:func:`metrics.compare_sets` of the matched sets, plus KID by torchmetrics' subsets.

    The subset KID (mean ± std over 100 random subsets of ``kid_subset_size``, the convention
    of torch-fidelity and clean-fid) is kept for comparison with published KID; the KID with an
    interval is the unbiased estimate over all images, of which the subset mean is a noisier
    estimate of the same quantity.
    """
    seed = int(settings["seed"])
    result = M.compare_sets(
        real,
        fake,
        int(settings["min_group_size"]),
        n_resamples=int(settings["bootstrap"]),
        seed=seed,
        prdc_k=int(settings["prdc_k"]),
    )
    if "withheld" not in result:
        result["kid_subsets"] = M.subset_kid(real, fake, settings["kid_subset_size"], seed=seed)
    return result


def _memorization(
    settings: dict, samples: ModelSamples, real_sets: RealSets, notes: list[str]
) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """Audit summary, every flagged sample, and the samples to show as figures.

    The null is the held-out test images of ``real_sets``; a note replaces the audit when
    there is no train split.
    """
    if real_sets.train is None or real_sets.heldout is None:
        train_list = real_sets.dataset_dir / "train" / "metadata.jsonl"
        message = f"{train_list}: no training images; not audited."
        notes.append(message)
        return {"note": message, "fraction_flagged": None}, [], []
    table, summary = MEMO.audit(
        samples.images.small_tensor(),
        real_sets.heldout.small_tensor(),
        real_sets.train[0].small_tensor(),
        quantile=float(settings["memorization_quantile"]),
        max_shift=int(settings["memorization_max_shift"]),
    )
    train_files = [e["file_name"] for e in real_sets.train_entries]
    sample_files = [str(f) for f in samples.manifest["file_name"]]

    def records(rows: pd.DataFrame) -> list[dict]:
        return [
            json_safe(
                {
                    **row,
                    "sample_file": sample_files[row["sample_index"]],
                    "train_file": train_files[row["nearest_train"]],
                }
            )
            for row in rows.to_dict("records")
        ]

    flagged = records(table[table["flagged"]].sort_values("similarity", ascending=False))
    shown = records(MEMO.shown_pairs(table, int(settings["top_pairs"])))
    return summary, flagged, shown


def memorization_context(
    summary: dict,
    flagged: list[dict],
    shown: list[dict],
    samples_dir: Path,
    train_dir: Path,
    figures_dir: Path,
) -> dict[str, Any]:
    """The report's memorization part: summary, the null histogram, flagged list, pair figures."""
    return {
        "summary": summary,
        "flagged": flagged,
        "shown": shown,
        "histogram": _save(figures_dir, "memorization_null.png", F.null_histogram_png(summary)),
        "figure": _save(
            figures_dir, "memorization_pairs.png", pairs_figure(shown, samples_dir, train_dir)
        ),
        "note": summary.get("note"),
    }


def _read_text(path: Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
