"""The evaluate stage: generated samples vs the prepared dataset → metrics.json + report.html.

FID/KID/PRDC, intensity fidelity and the subgroups compare *matched* sets
(:mod:`idc_diffusion.evaluate.matching`): the same number of real test images and generated
images of each caption/prompt, at most ``max_real_images`` per side. MS-SSIM diversity of the
samples is shown beside the real images' own within-caption MS-SSIM. The memorization audit
(:mod:`idc_diffusion.evaluate.memorization`) compares every generated sample with every training
image, calibrated on the test images (at most ``max_real_images``). The image sets are read once
(:mod:`idc_diffusion.evaluate.image_sets`). A generated image takes the structured fields
(modality, window, body part, sex, age band) of the real caption its prompt equals. Every sample
metric is computed for the fine-tuned model and, when its samples are given, for the base model
(same prompts and seeds), beside the real-vs-real floor (test vs train images); prompt adherence
(:mod:`idc_diffusion.evaluate.adherence`) reads each caption field back from the images.
:func:`evaluate` runs these phases in order, then writes metrics.json
(:mod:`idc_diffusion.evaluate.metrics_file`) and the report
(:mod:`idc_diffusion.evaluate.report_context`, :mod:`idc_diffusion.evaluate.report`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from idc_diffusion.evaluate import intensity as I
from idc_diffusion.evaluate import memorization as MEMO
from idc_diffusion.evaluate import metrics as M
from idc_diffusion.evaluate.adherence import prompt_adherence
from idc_diffusion.evaluate.features import FeatureExtractor, build_extractor
from idc_diffusion.evaluate.image_sets import (
    ModelSamples,
    RealSets,
    read_model_samples,
    read_real_sets,
    to_chw,
)
from idc_diffusion.evaluate.inputs import RunDirs, read_json, read_splits, read_training
from idc_diffusion.evaluate.matching import Matched, match_by_prompt, subset_indices, unmatched
from idc_diffusion.evaluate.metrics_file import assemble_metrics, json_safe, write_metrics
from idc_diffusion.evaluate.report import is_synthetic, render_report
from idc_diffusion.evaluate.report_context import report_context
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


def fill_settings(settings: dict | None) -> dict:
    """``settings`` over :data:`DEFAULT_SETTINGS` (one level deep for the extractor)."""
    merged = copy.deepcopy(DEFAULT_SETTINGS)
    for key, value in (settings or {}).items():
        if key == "feature_extractor" and isinstance(value, dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


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
    dirs = RunDirs(
        Path(samples_dir), Path(dataset_dir), Path(model_dir), Path(cohort_dir), Path(out_dir)
    )
    splits = read_splits(dirs.dataset)
    pixel_source = sorted({str(e.get("pixel_source")) for e in splits.test + splits.train})
    extractor = build_extractor(settings["feature_extractor"], is_synthetic(pixel_source))
    clear_figures(dirs.figures)
    identity = extractor.describe()
    notes: list[str] = []
    warn_if_random(extractor)

    captions = caption_index(splits.test + splits.train + splits.val)
    models = read_models(dirs.samples, base_samples_dir, extractor, captions)
    real_sets = read_real_sets(dirs.dataset, splits.test, splits.train, extractor, settings)
    scores, matches = score_models(models, real_sets, extractor, settings, notes)
    real_indices = matches["fine_tuned"].real
    real_used = [splits.test[i] for i in real_indices]
    floor, adherence = real_references(
        models, real_sets, real_indices, real_used, extractor, settings
    )

    training = read_training(dirs.model, notes)
    cohort = read_json(dirs.cohort / "summary.json")
    counts = {"real_test_available": len(splits.test), "train": len(splits.train)}
    metrics = assemble_metrics(
        identity, pixel_source, scores, counts, floor, adherence, training, settings, notes
    )
    write_metrics(dirs.out, metrics)

    context = report_context(
        config=config,
        dirs=dirs,
        splits=splits,
        real_used=real_used,
        models=models,
        training=training,
        cohort=cohort,
        metrics=metrics,
        identity=identity,
        pixel_source=pixel_source,
        notes=notes,
        adherence=adherence,
        memo=scores["fine_tuned"]["memorization"],
        settings=settings,
    )
    (dirs.out / "report.html").write_text(render_report(context), encoding="utf-8")
    return metrics


def clear_figures(figures_dir: Path) -> None:
    """Create ``figures_dir`` and remove the PNGs a previous run left in it."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    for stale in figures_dir.glob("*.png"):
        stale.unlink()


def warn_if_random(extractor: FeatureExtractor) -> None:
    """Log a warning when the feature extractor is a seeded random network."""
    if extractor.is_random:
        log.warning(
            "feature extractor %s is a seeded RANDOM network (tests/demo only): FID/KID/PRDC "
            "are not comparable to published numbers",
            extractor.name,
        )


def read_models(
    samples_dir: Path,
    base_samples_dir: Path | None,
    extractor: FeatureExtractor,
    captions: dict[str, dict],
) -> dict[str, ModelSamples]:
    """The fine-tuned model's samples and, when given, the base model's (features extracted)."""
    models = {"fine_tuned": read_model_samples("fine-tuned", samples_dir, extractor, captions)}
    if base_samples_dir is not None:
        base_dir = Path(base_samples_dir)
        models["base"] = read_model_samples("base model", base_dir, extractor, captions)
    return models


def score_models(
    models: dict[str, ModelSamples],
    real_sets: RealSets,
    extractor: FeatureExtractor,
    settings: dict,
    notes: list[str],
) -> tuple[dict[str, dict], dict[str, Matched]]:
    """:func:`model_metrics` of each model, and the matched sets, by model."""
    scores, matches = {}, {}
    for name, samples in models.items():
        scores[name], matches[name] = model_metrics(samples, real_sets, extractor, settings, notes)
    return scores, matches


def real_references(
    models: dict[str, ModelSamples],
    real_sets: RealSets,
    real_indices: list[int],
    real_used: list[dict],
    extractor: FeatureExtractor,
    settings: dict,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The real-vs-real floor and prompt adherence (None, None without a train split).

    Both use the real test images matched to the fine-tuned model's samples.
    """
    _, real_feats = real_sets.matched(real_indices, extractor)
    if real_sets.train is None:
        return None, None
    train_feats = real_sets.train[1]
    floor = real_floor(train_feats, real_feats, settings)
    adherence = prompt_adherence(
        (train_feats, real_sets.train_entries),
        (real_feats, real_used),
        {name: (m.features, m.fields) for name, m in models.items()},
        int(settings["bootstrap"]),
        int(settings["seed"]),
        train_blurred=real_sets.train_blurred,
    )
    return floor, adherence


# ----------------------------------------------------------------------------- per model


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
    seed = int(settings["seed"])
    identity = extractor.describe()
    manifest, test_entries = samples.manifest, real_sets.test_entries
    prompts = [str(p) for p in manifest["prompt"]]
    matched = match_samples(samples.name, prompts, test_entries, settings, notes)
    real_used = [test_entries[i] for i in matched.real]
    real, real_feats = real_sets.matched(matched.real, extractor)
    fake_feats = samples.features[torch.tensor(matched.generated)]
    fake_fields = [samples.fields[i] for i in matched.generated]
    fid = headline_metrics(real_feats, fake_feats, settings)
    fid["feature_extractor"] = identity
    comparison = compared_sets(samples.name, matched, len(test_entries), len(manifest), notes)
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


def match_samples(
    name: str, prompts: list[str], test_entries: list[dict], settings: dict, notes: list[str]
) -> Matched:
    """The samples matched to real test images by prompt = caption; all of both sides (and a
    note) when no prompt is a test caption."""
    seed, cap = int(settings["seed"]), int(settings["max_real_images"])
    matched = match_by_prompt([str(e.get("text")) for e in test_entries], prompts, cap, seed)
    if not matched.generated:
        matched = unmatched(len(test_entries), len(prompts), cap, seed)
        notes.append(
            f"UNMATCHED SETS ({name}): no prompt is a caption of the test split "
            "(sample.prompts is not test_captions), so FID/KID/PRDC compare all generated images "
            "with real test images whose mix of conditions may differ; the numbers mix image "
            "quality with that mismatch."
        )
    return matched


def compared_sets(
    name: str, matched: Matched, n_test: int, n_generated: int, notes: list[str]
) -> dict[str, Any]:
    """:meth:`Matched.summary`, and a note when matching left images out."""
    comparison = matched.summary(n_test, n_generated)
    if matched.matched and (comparison["generated_left_out"] or comparison["real_left_out"]):
        notes.append(
            f"{name}: FID/KID/PRDC, intensity and subgroups compare "
            f"{comparison['n_generated']} generated with {comparison['n_real']} real test "
            f"images, the same number per caption ({comparison['captions']} captions); "
            f"{comparison['generated_left_out']} generated and {comparison['real_left_out']} "
            "real images had no counterpart of their caption (or exceeded "
            "evaluate.max_real_images) and were left out."
        )
    return comparison


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


def diversity_by_caption(captions: Sequence[str], gray: list[np.ndarray]) -> dict[str, Any]:
    """MS-SSIM diversity over native-size grayscale images grouped by caption (or prompt)."""
    groups: dict[str, list[int]] = {}
    for i, caption in enumerate(captions):
        groups.setdefault(str(caption), []).append(i)
    images = {c: to_chw([gray[i] for i in idx]) for c, idx in groups.items()}
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
