"""A single self-contained HTML evaluation report: the document and the sections on the run.

:func:`render_report` turns a plain ``context`` dict (built by
:mod:`idc_diffusion.evaluate.report_context`) into one HTML string: inline CSS, images as base64
PNG data URIs, no external assets. Every section has an id (:data:`SECTION_IDS`). This module
renders the sections on what went in (overview, cohort, citations, data, training, samples,
provenance); :mod:`idc_diffusion.evaluate.report_scores` renders the scores. Missing parts of the
context render as a short note.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from idc_diffusion.evaluate.report_html import (
    banner,
    esc,
    extractor_label,
    fmt,
    img_tag,
    markdown_html,
    note,
    section,
    table,
)
from idc_diffusion.evaluate.report_scores import (
    adherence_section,
    comparison_section,
    intensity_section,
    memorization_section,
    metrics_section,
    subgroups_section,
)

SECTION_IDS = (
    "overview",
    "cohort",
    "citations",
    "data",
    "training",
    "samples",
    "comparison",
    "adherence",
    "metrics",
    "intensity",
    "subgroups",
    "memorization",
    "provenance",
)

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top} th{background:#f3f3f3}
.banner{background:#c62828;color:#fff;font-weight:bold;padding:.8em 1em;margin:.5em 0;
border-radius:4px} .note{color:#8a6d00;background:#fff8e1;padding:.4em .8em;border-radius:4px}
td{overflow-wrap:anywhere} img{max-width:100%;image-rendering:pixelated}
pre{background:#f6f6f6;padding:.8em;overflow:auto;white-space:pre-wrap}
.mono{font-family:monospace;font-size:.9em}
"""


def is_synthetic(pixel_source: Any) -> bool:
    """True when any pixel source is synthetic."""
    sources = [pixel_source] if isinstance(pixel_source, str) else list(pixel_source or [])
    return any("synthetic" in str(s).lower() for s in sources)


def overview_section(ctx: dict) -> str:
    """Banners (synthetic pixels, random extractor), run facts and the run's notes."""
    extractor = ctx.get("feature_extractor") or {}
    parts = []
    if is_synthetic(ctx.get("pixel_source")):
        parts.append(
            banner(
                "SYNTHETIC PIXEL DATA: the training and test images are synthetic phantoms "
                "carrying real IDC metadata, not IDC images. Nothing here describes a model "
                "of real medical images."
            )
        )
    if extractor.get("is_random"):
        parts.append(
            banner(
                "RANDOM FEATURE EXTRACTOR (tests and demo only): FID, KID, precision/recall/"
                "density/coverage, subgroup metrics and feature cosines were computed with a "
                "seeded, randomly initialised network; numbers are not comparable to published "
                "FID. Set evaluate.feature_extractor.kind: inception for real numbers."
            )
        )
    rows = [
        ("run", ctx.get("run_name")),
        ("date", ctx.get("date")),
        ("IDC version", ctx.get("idc_version")),
        ("pixel source", ", ".join(map(str, ctx.get("pixel_source") or [])) or None),
        ("feature extractor", extractor_label(extractor)),
    ]
    parts.append(table(["", ""], rows))
    parts.extend(note(n) for n in ctx.get("notes") or [])
    return section("overview", "Overview", "\n".join(parts))


def cohort_section(summary: dict | None) -> str:
    """Cohort totals, series per stratum and split, and licenses."""
    if not summary:
        return section("cohort", "Cohort", note("No cohort summary.json found."))
    total = summary.get("total") or {}
    parts = [table(["total", "value"], sorted(total.items()))]
    splits = sorted(
        {s for st in (summary.get("by_stratum") or {}).values() for s in st.get("by_split") or {}}
    )
    rows = []
    for name, stratum in (summary.get("by_stratum") or {}).items():
        by_split = stratum.get("by_split") or {}
        counts = [_count(by_split.get(s)) for s in splits]
        rows.append([name, stratum.get("series"), stratum.get("patients"), *counts])
    if rows:
        parts.append(table(["stratum", "series", "patients", *splits], rows))
    by_split = summary.get("by_split") or {}
    if by_split:
        parts.append(table(["split", "count"], [(k, _count(v)) for k, v in by_split.items()]))
    licenses = summary.get("licenses") or {}
    parts.append(table(["license", "series"], sorted(licenses.items())))
    return section("cohort", "Cohort", "\n".join(parts))


def _count(value: Any) -> Any:
    """A split entry as a number (series when it is a dict of counts)."""
    if isinstance(value, dict):
        return value.get("series", json.dumps(value))
    return value


def citations_section(text: str | None) -> str:
    """CITATIONS.md rendered as HTML."""
    if not text:
        return section("citations", "Citations", note("No CITATIONS.md found."))
    return section("citations", "Citations", f'<div class="citations">{markdown_html(text)}</div>')


def data_section(data: dict | None) -> str:
    """Image counts, the most frequent captions and the rejection reasons."""
    data = data or {}
    parts = [
        table(
            ["", ""],
            [
                ("training images", data.get("train_images")),
                ("test images (available / used for FID)", _pair(data, "test_images")),
                ("unique training captions", data.get("unique_captions")),
                ("rejected inputs", data.get("rejected")),
            ],
        )
    ]
    if data.get("top_captions"):
        parts.append(table(["top caption", "images"], data["top_captions"]))
    if data.get("top_reasons"):
        parts.append(table(["rejection reason", "count"], data["top_reasons"]))
    return section("data", "Data", "\n".join(parts))


def _pair(data: dict, key: str) -> str:
    """``key`` and ``key_used`` of ``data`` as "a / b"."""
    return f"{fmt(data.get(key))} / {fmt(data.get(key + '_used'))}"


def training_section(training: dict | None) -> str:
    """Loss curve, held-out losses, training settings and validation grids."""
    training = training or {}
    summary = training.get("summary") or {}
    parts = [img_tag(training.get("loss_figure"), "training loss curve")]
    base, final = summary.get("heldout_loss_base"), summary.get("heldout_loss_final")
    if base is not None and final is not None:
        rel = (base - final) / base if base else None
        rows = [
            ("held-out loss, base model", base),
            ("held-out loss, fine-tuned", final),
            ("relative improvement", f"{rel:.1%}" if rel is not None else None),
            (
                "held-out split / images",
                f"{summary.get('heldout_split')} / {summary.get('heldout_images')}",
            ),
        ]
        parts.append(table(["", ""], rows))
    else:
        parts.append(note("No held-out losses (train_summary.json missing or incomplete)."))
    keys = [k for k in summary if not k.startswith("heldout")]
    if keys:
        parts.append(table(["training setting", "value"], [(k, summary[k]) for k in keys]))
    grids = training.get("validation_grids") or []
    if grids:
        parts.append("<h3>Validation images across steps</h3>")
        for step, png in grids:
            parts.append(
                f"<h4>step {esc(step)}</h4>" + img_tag(png, f"validation grid, step {step}")
            )
    parts.extend(note(n) for n in training.get("notes") or [])
    return section("training", "Training", "\n".join(parts))


def samples_section(samples: Sequence[dict] | None) -> str:
    """Each shown prompt's figure of base, fine-tuned and real images."""
    if not samples:
        return section("samples", "Samples", note("No samples to show."))
    parts = []
    for item in samples:
        parts.append(f"<h3>{esc(item.get('prompt'))}</h3>")
        rows = " · ".join(item.get("rows") or ["generated", "real (test)"])
        parts.append(
            f"<p>Rows, top to bottom: {esc(rows)}. {fmt(item.get('n_generated'))} generated "
            f"per model (same seeds) · {fmt(item.get('n_real'))} real test images with this "
            "caption</p>"
        )
        parts.append(img_tag(item.get("figure"), f"samples for {item.get('prompt')}"))
    return section("samples", "Samples", "\n".join(parts))


def provenance_section(prov: dict | None) -> str:
    """Git commit, idc-index-data version, package versions and the run's config."""
    prov = prov or {}
    packages = prov.get("packages") or {}
    parts = [
        table(
            ["", ""],
            [
                ("git commit", prov.get("git_commit")),
                ("idc-index-data (cohort)", prov.get("idc_index_data_version")),
            ],
        ),
        table(["package", "version"], sorted(packages.items())),
        "<h3>Config</h3>",
        f"<pre>{esc(json.dumps(prov.get('config'), indent=2, sort_keys=True, default=str))}</pre>",
    ]
    return section("provenance", "Provenance", "\n".join(parts))


def render_report(context: dict) -> str:
    """The whole report as one self-contained HTML document."""
    title = f"IDC-Diffusion evaluation — {context.get('run_name') or 'run'}"
    sections = [
        overview_section(context),
        cohort_section(context.get("cohort")),
        citations_section(context.get("citations")),
        data_section(context.get("data")),
        training_section(context.get("training")),
        samples_section(context.get("samples")),
        comparison_section(context.get("metrics")),
        adherence_section(context.get("adherence")),
        metrics_section(context.get("metrics")),
        intensity_section(context.get("intensity")),
        subgroups_section(context.get("subgroups")),
        memorization_section(context.get("memorization")),
        provenance_section(context.get("provenance")),
    ]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n{body}\n</body>\n</html>\n"
    )
