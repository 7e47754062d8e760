"""The report's context: figures saved under ``figures/`` and the plain dict that
:func:`idc_diffusion.evaluate.report.render_report` renders, one part per report section."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Any

from idc_diffusion.evaluate import report_figures as F
from idc_diffusion.evaluate.image_sets import ModelSamples, load_rgb
from idc_diffusion.evaluate.inputs import RunDirs, Splits, TrainingRecord, read_text, rejected_stats
from idc_diffusion.evaluate.provenance import git_commit, package_versions


def report_context(
    *,
    config: dict,
    dirs: RunDirs,
    splits: Splits,
    real_used: list[dict],
    models: dict[str, ModelSamples],
    training: TrainingRecord,
    cohort: dict | None,
    metrics: dict,
    identity: dict,
    pixel_source: list[str],
    notes: list[str],
    adherence: dict | None,
    memo: dict,
    settings: dict,
) -> dict[str, Any]:
    """Every part of the report, saving its figures on the way.

    ``metrics`` is metrics.json's content; ``adherence`` and ``memo`` (the fine-tuned model's
    memorization audit with its ``flagged`` and ``shown`` samples) are the values it was made of.
    """
    figures_dir = dirs.figures
    return {
        "run_name": config.get("run_name") or config.get("name") or dirs.out.resolve().parent.name,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "idc_version": (cohort or {}).get("idc_version"),
        "pixel_source": pixel_source,
        "feature_extractor": identity,
        "notes": notes,
        "cohort": cohort,
        "citations": read_text(dirs.cohort / "CITATIONS.md"),
        "data": data_context(splits, real_used, dirs.dataset),
        "training": training_context(training, figures_dir),
        "samples": sample_figures(
            models["fine_tuned"],
            models.get("base"),
            captioned_test_images(splits.test, dirs.dataset),
            settings,
            figures_dir,
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
            dirs.samples,
            dirs.dataset / "train",
            figures_dir,
        ),
        "provenance": provenance_context(config, cohort),
    }


def _save(figures_dir: Path, name: str, png: bytes | None) -> bytes | None:
    """Write ``png`` (when there is one) as ``figures_dir/name``; return it."""
    if png:
        (figures_dir / name).write_bytes(png)
    return png


def data_context(splits: Splits, real_used: list[dict], dataset_dir: Path) -> dict[str, Any]:
    """The data section: image counts, caption statistics and rejected inputs."""
    return {
        "train_images": len(splits.train),
        "test_images": len(splits.test),
        "test_images_used": len(real_used),
        **caption_stats(splits.train),
        **rejected_stats(dataset_dir / "rejected.parquet"),
    }


def caption_stats(entries: list[dict], top: int = 10) -> dict[str, Any]:
    """Unique captions and the most frequent ones."""
    counts = Counter(str(e.get("text")) for e in entries)
    return {"unique_captions": len(counts), "top_captions": counts.most_common(top)}


def training_context(training: TrainingRecord, figures_dir: Path) -> dict[str, Any]:
    """The training section: summary, loss-curve figure, validation grids and notes."""
    return {
        "summary": training.summary,
        "loss_figure": _save(
            figures_dir, "loss_curve.png", F.loss_curve_png(training.log, training.curve)
        ),
        "validation_grids": [(step, path.read_bytes()) for step, path in training.grids],
        "notes": training.notes,
    }


def captioned_test_images(test_entries: list[dict], dataset_dir: Path) -> dict[str, list[Path]]:
    """The test images' paths grouped by caption, in file order."""
    test_by_caption: dict[str, list[Path]] = {}
    for entry in test_entries:
        test_by_caption.setdefault(str(entry.get("text")), []).append(
            dataset_dir / "test" / entry["file_name"]
        )
    return test_by_caption


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


def provenance_context(config: dict, cohort: dict | None) -> dict[str, Any]:
    """The provenance section: config, package versions, git commit, idc-index-data version."""
    return {
        "config": config,
        "packages": package_versions(),
        "git_commit": git_commit(),
        "idc_index_data_version": (cohort or {}).get("idc_index_data_version"),
    }
