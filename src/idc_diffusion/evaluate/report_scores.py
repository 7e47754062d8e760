"""The report's score sections: base vs fine-tuned, prompt adherence, metrics, intensity
fidelity, subgroups and memorization."""

from __future__ import annotations

import math
from typing import Any

from idc_diffusion.evaluate.report_figures import ADHERENCE_SETS
from idc_diffusion.evaluate.report_html import (
    ci_text,
    esc,
    extractor_label,
    fmt,
    img_tag,
    note,
    section,
    table,
)


def _kid(fid: dict) -> str | None:
    """Unbiased KID with its interval, or None when it was withheld."""
    if fid.get("kid") is None:
        return None
    ci = ci_text(fid.get("kid_ci"))
    return f"{fmt(fid['kid'])}{' ' + ci if ci else ''}"


def _accuracy(score: dict | None) -> str:
    """An adherence accuracy with its interval and n (a dash without one)."""
    score = score or {}
    if score.get("accuracy") is None:
        return f"— (n={fmt(score.get('n', 0))})"
    ci = ci_text(score.get("ci95"))
    return f"{score['accuracy']:.2f}{' ' + ci if ci else ''} (n={score['n']})"


def comparison_section(metrics: dict | None) -> str:
    """Base model vs fine-tuned on every metric, beside the real-vs-real floor, with n."""
    metrics = metrics or {}
    base = metrics.get("base_model")
    if not base:
        return section("comparison", "Base vs fine-tuned", note("The base model was not sampled."))
    floor = metrics.get("real_floor") or {}
    models = (("base", base), ("fine-tuned", metrics))

    def row(label: str, get: Any, floor_value: Any = None) -> tuple:
        return (label, *(get(m) for _, m in models), floor_value)

    fid = {name: m.get("fid_kid") or {} for name, m in models}
    n_fake = {name: f.get("n_generated") for name, f in fid.items()}
    rows = [
        ("images (n)", *(f"{n_fake[name]} generated vs {fid[name].get('n_real')} real test"
                         for name, _ in models),
         f"{floor.get('n_real')} test vs {floor.get('n_generated')} train" if floor else None),
        row("KID ↓ (unbiased, 95 % interval)", lambda m: _kid(m.get("fid_kid") or {}),
            _kid(floor)),
        row("FID ↓ (plug-in, biased up at small n)",
            lambda m: (m.get("fid_kid") or {}).get("fid"), floor.get("fid")),
    ]  # fmt: skip
    for name in ("precision", "recall", "density", "coverage"):
        rows.append(row(f"{name} ↑", lambda m, k=name: (m.get("fid_kid") or {}).get(k)))
    rows.append(row("MS-SSIM within a prompt (diversity ↓)",
                    lambda m: (m.get("ms_ssim_diversity") or {}).get("overall")))  # fmt: skip
    rows.append(row("memorization: fraction flagged",
                    lambda m: (m.get("memorization") or {}).get("fraction_flagged")))  # fmt: skip
    adherence = metrics.get("adherence") or {}
    for field, result in (adherence.get("by_field") or {}).items():
        scores = [_accuracy(result.get(key)) for key in ("base", "fine_tuned", "real_test")]
        rows.append((f"prompt adherence: {field} ↑", *scores))
    held = metrics.get("heldout_loss") or {}
    rows.append(("held-out diffusion loss ↓", held.get("base"), held.get("final"), None))
    parts = [
        table(["metric", "base model", "fine-tuned", "real vs real (floor / ceiling)"], rows),
        "<p>Same prompts and seeds for both models. KID is an unbiased estimate and is the "
        "number to compare at these sample sizes; FID is biased upward when n is small (its "
        "bias shrinks only as n reaches the thousands), so a FID here says little on its own. "
        "The floor column scores two sets of <em>real</em> images (test vs train patients) "
        'with the same feature extractor: what "as good as real" looks like at this n. '
        "Adherence: accuracy of a classifier fitted on real train images' features at reading "
        "each field of the prompt back from the image; its accuracy on real test images is "
        "the ceiling.</p>",
    ]
    return section("comparison", "Base vs fine-tuned", "\n".join(parts))


def adherence_section(adherence: dict | None) -> str:
    """Per-field adherence table and the main field's confusion matrices."""
    adherence = adherence or {}
    by_field = adherence.get("by_field") or {}
    if not by_field:
        return section(
            "adherence",
            "Prompt adherence",
            note("No caption field has two or more values among the training images."),
        )
    header = ["field", "classes", "train images", *(t for _, t in ADHERENCE_SETS), "majority"]
    rows = [
        (field, ", ".join(r["classes"]), r["n_train"],
         *(_accuracy(r.get(key)) for key, _ in ADHERENCE_SETS), r["majority_rate"])
        for field, r in by_field.items()
    ]  # fmt: skip
    parts = [
        "<p>For each caption field with two or more values among the training images, a "
        "logistic regression on the evaluation features of the real train images reads the "
        "field back (also fitted on copies of them blurred by Gaussian sigmas "
        f"{esc(adherence.get('train_blur_sigmas') or 'none')} px, so that it reads the content "
        "rather than the sharpness). Real test images give the ceiling; generated images are "
        "scored against their own prompt's fields. Accuracies with 95 % percentile-bootstrap "
        "intervals and n. "
        "A field the images do not show (e.g. sex in a phantom) stays near the majority rate "
        "even on real images.</p>",
        table(header, rows),
        f"<h3>Confusion matrices: {esc(adherence.get('main_field'))}</h3>",
        img_tag(adherence.get("figure"), "confusion matrices of the main adherence field"),
    ]
    return section("adherence", "Prompt adherence", "\n".join(parts))


def metrics_section(metrics: dict | None) -> str:
    """The compared sets, FID/KID/PRDC with intervals, MS-SSIM diversity and counts."""
    metrics = metrics or {}
    fid = metrics.get("fid_kid") or {}
    extractor = extractor_label(fid.get("feature_extractor") or metrics.get("feature_extractor"))
    parts = [compared_sets_html(metrics.get("compared") or {})]
    if fid.get("withheld"):
        parts.append(
            note(
                f"No FID/KID/PRDC: {fid['withheld']} ({fmt(fid.get('n_real'))} real, "
                f"{fmt(fid.get('n_generated'))} generated; evaluate.min_group_size "
                f"{fmt(fid.get('min_images'))})."
            )
        )
    else:
        parts.append(headline_table_html(fid, extractor))
    parts.append(diversity_html(metrics.get("ms_ssim_diversity") or {}))
    counts = metrics.get("counts") or {}
    if counts:
        parts.append(table(["images", "count"], sorted(counts.items())))
    return section("metrics", "Metrics", "\n".join(parts))


def compared_sets_html(compared: dict) -> str:
    """Which images the distribution metrics compared: counts per caption, both sides."""
    if not compared:
        return ""
    if not compared.get("matched", True):
        return note(
            f"Sets NOT matched by caption (no prompt is a test caption): all "
            f"{fmt(compared.get('n_generated'))} generated vs {fmt(compared.get('n_real'))} real "
            "test images, whose mix of conditions may differ."
        )
    rows = [
        (c["caption"], c["real"], c["generated"], c["used"])
        for c in compared.get("per_caption") or []
    ]
    return (
        f"<p>Matched sets: {fmt(compared.get('n_generated'))} generated vs "
        f"{fmt(compared.get('n_real'))} real test images, the same number of each caption "
        f"({fmt(compared.get('captions'))} captions); left out: "
        f"{fmt(compared.get('generated_left_out'))} generated, "
        f"{fmt(compared.get('real_left_out'))} real.</p>"
        + table(["caption / prompt", "real test", "generated", "compared (each side)"], rows)
    )


def headline_table_html(fid: dict, extractor: str) -> str:
    """FID, KID and PRDC with their intervals and n."""
    level = f"{fid.get('level', 0.95):.0%}"
    n = f"{fmt(fid.get('n_generated'))} gen / {fmt(fid.get('n_real'))} real"
    subsets = fid.get("kid_subsets") or {}
    rows = [
        ("FID ↓ (plug-in, as published; biased up at small n)", fid.get("fid"), "—", n),
        (
            "FID ↓ bias-corrected (half-sampling)",
            fid.get("fid_bias_corrected"),
            ci_text(fid.get("fid_ci")) or fid.get("fid_interval_note"),
            n,
        ),
        ("KID ↓ (unbiased, all images)", fid.get("kid"), ci_text(fid.get("kid_ci")), n),
    ]
    if subsets:
        rows.append(
            (
                f"KID ↓ (mean ± std of {fmt(subsets.get('kid_subsets'))} subsets of "
                f"{fmt(subsets.get('kid_subset_size'))}, torch-fidelity convention)",
                f"{fmt(subsets.get('kid_mean'))} ± {fmt(subsets.get('kid_std'))}",
                "—",
                n,
            )
        )
    for name in ("precision", "recall", "density", "coverage"):
        if fid.get(name) is not None:
            rows.append((f"{name} ↑ (k={fmt(fid.get('prdc_k'))})", fid[name], "—", n))
    return table(["metric", "estimate", f"{level} interval", "n"], rows) + (
        f"<p>Features: {esc(extractor)}. KID's interval: estimate ± z × its two-sample "
        "jackknife standard error. FID's: bias-corrected estimate (2 × FID − mean FID of "
        f"{fmt(fid.get('fid_resamples'))} half-samples drawn without replacement, seed "
        f"{fmt(fid.get('seed'))}) ± z × the delete-d jackknife standard error; given only with "
        "at least 4 images per feature dimension in each set, where FID's bias is linear in "
        "1/n. Each interval holds its own estimate.</p>"
    )


def diversity_html(div: dict) -> str:
    """Samples' MS-SSIM per prompt beside the real test images' own within-caption MS-SSIM."""
    if not div:
        return ""
    rows = [
        (p, v.get("mean"), v.get("samples"), v.get("real_mean"), v.get("real_samples"))
        for p, v in (div.get("per_prompt") or {}).items()
    ]
    rows.append(("all prompts (mean)", div.get("overall"), "", div.get("real_overall"), ""))
    return (
        "<h3>MS-SSIM within a prompt</h3><p>Mean pairwise MS-SSIM of the samples of one prompt "
        "beside that of the real test images of the same caption (grayscale pixels). Lower is "
        "more varied; the real value is the reference: far below it is not diversity.</p>"
        + table(["prompt", "generated", "n", "real (reference)", "n real"], rows)
    )


def intensity_section(intensity: dict | None) -> str:
    """Grey-level distances per group and the histogram figure."""
    intensity = intensity or {}
    groups = intensity.get("groups") or []
    if not groups:
        return section("intensity", "Intensity fidelity", note("No modality/window groups."))
    rows = [
        (g["group"], g["n_real"], g["n_generated"], g.get("wasserstein_1"), g.get("jensen_shannon"))
        for g in groups
    ]
    parts = [
        "<p>Grey-level histograms of real test images vs generated images, per "
        f"{esc(' / '.join(intensity.get('grouped_by') or []))} (a generated image takes the "
        "fields of the real caption its prompt equals). W1: earth mover's distance as a fraction "
        "of the 0–255 range; JS: Jensen-Shannon divergence (base 2). Lower is closer.</p>",
        table(["group", "real", "generated", "W1 ↓", "JS ↓"], rows),
        img_tag(intensity.get("figure"), "grey-level histograms, real vs generated"),
    ]
    if intensity.get("unmatched_generated"):
        parts.append(
            note(f"{intensity['unmatched_generated']} generated images matched no real caption.")
        )
    return section("intensity", "Intensity fidelity", "\n".join(parts))


def subgroups_section(subgroups: dict | None) -> str:
    """FID/KID/PRDC per value of each structured caption field."""
    subgroups = subgroups or {}
    groups = subgroups.get("groups") or []
    if not groups:
        return section("subgroups", "Subgroups", note("No subgroups (no structured fields)."))
    header = [
        "field",
        "value",
        "real",
        "generated",
        "FID ↓ (plug-in)",
        "KID ↓",
        "KID 95% interval",
        "precision",
        "recall",
        "density",
        "coverage",
    ]
    rows = []
    for g in groups:
        scores = [g.get("fid"), g.get("kid"), ci_text(g.get("kid_ci"))] + [
            g.get(k) for k in ("precision", "recall", "density", "coverage")
        ]
        if g.get("skipped"):
            scores = [g["skipped"]] + [None] * 6
        rows.append([g["field"], g["value"], g["n_real"], g["n_generated"], *scores])
    parts = [
        f"<p>Scored where a group has at least {fmt(subgroups.get('min_group_size'))} real and "
        f"generated images (evaluate.min_group_size); features: "
        f"{esc(extractor_label(subgroups.get('feature_extractor')))}.</p>",
        table(header, rows),
    ]
    return section("subgroups", "Subgroups", "\n".join(parts))


def memorization_section(memo: dict | None) -> str:
    """The audit's threshold, flagged samples, null histogram and sample/training pairs."""
    memo = memo or {}
    summary = memo.get("summary") or {}
    if not summary or summary.get("threshold") is None:
        return section("memorization", "Memorization", note(memo.get("note") or "Not computed."))
    flagged, shown = memo.get("flagged") or [], memo.get("shown") or []
    parts = [
        f"<p>Similarity = highest correlation (NCC) of a sample with a training image over shifts "
        f"of up to ±{fmt(summary.get('max_shift'))} px, on {fmt(summary.get('image_size'))} px "
        f"grayscale copies. Threshold {fmt(summary.get('threshold'))} = the "
        f"{fmt(summary.get('quantile'))} quantile of the same similarity for "
        f"{fmt(summary.get('n_null'))} held-out test images (not copies by construction), so a "
        f"held-out image is flagged with probability about "
        f"{fmt(summary.get('expected_heldout_flag_rate'))}.</p>",
        f"<p><b>{fmt(summary.get('n_flagged'))} of {fmt(summary.get('n_samples'))} samples "
        "flagged</b> as copies of a training image.</p>",
        _small_null_note(summary),
        img_tag(memo.get("histogram"), "memorization null histogram with samples"),
    ]
    if flagged:
        rows = [
            (
                "yes",
                p["similarity"],
                p["sample_file"],
                p["train_file"],
                f"{p['shift_y']:+d},{p['shift_x']:+d}",
            )
            for p in flagged
        ]
        parts.append(
            table(["flagged", "similarity", "sample", "nearest training image", "shift"], rows)
        )
    if flagged:
        caption = f"{len(shown)} of {len(flagged)} flagged samples shown"
    else:
        caption = (
            f"None flagged: the {len(shown)} most similar of {fmt(summary.get('n_samples'))} "
            "samples shown"
        )
    parts.append(f"<h3>{esc(caption)}</h3>" if shown else "")
    parts.append(img_tag(memo.get("figure"), "sample / nearest training image pairs"))
    if shown:
        items = "".join(
            f"<li>{esc(p['sample_file'])} beside {esc(p['train_file'])}: similarity "
            f"{fmt(p['similarity'])}</li>"
            for p in shown
        )
        parts.append(f"<ol>{items}</ol>")
    return section("memorization", "Memorization", "\n".join(parts))


def _small_null_note(summary: dict) -> str:
    """A note when the null is too small to resolve its quantile (the threshold is its max)."""
    n_null, quantile = summary.get("n_null") or 0, summary.get("quantile") or 0.0
    if quantile >= 1 or n_null >= 1 / (1 - quantile):
        return ""
    return note(
        f"Only {n_null} held-out images: the {quantile} quantile needs at least "
        f"{math.ceil(1 / (1 - quantile))}, so the threshold is their largest value and "
        f"about 1 in {n_null + 1} samples that are no copies is flagged too. Inspect the pairs."
    )
