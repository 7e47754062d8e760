"""A single self-contained HTML evaluation report, and the matplotlib figures it embeds.

:func:`render_report` turns a plain ``context`` dict (built by :mod:`idc_diffusion.evaluation`)
into one HTML string: inline CSS, images as base64 PNG data URIs, no external assets. Every
section has an id: overview, cohort, citations, data, training, samples, metrics,
memorization, provenance. Missing parts of the context render as a short note.
"""

from __future__ import annotations

import base64
import html
import io
import json
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

SECTION_IDS = (
    "overview",
    "cohort",
    "citations",
    "data",
    "training",
    "samples",
    "metrics",
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
)
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top} th{background:#f3f3f3}
.banner{background:#c62828;color:#fff;font-weight:bold;padding:.8em 1em;margin:.5em 0;
border-radius:4px} .note{color:#8a6d00;background:#fff8e1;padding:.4em .8em;border-radius:4px}
img{max-width:100%;image-rendering:pixelated} pre{background:#f6f6f6;padding:.8em;
overflow:auto;white-space:pre-wrap} .mono{font-family:monospace;font-size:.9em}
"""

# ----------------------------------------------------------------------------- figures


def figure_png(fig: plt.Figure) -> bytes:
    """PNG bytes of a matplotlib figure (closed afterwards)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def loss_curve_png(log: Sequence[dict]) -> bytes | None:
    """Training loss against step (raw and smoothed), or None without log lines."""
    rows = [r for r in log if r.get("loss") is not None and r.get("step") is not None]
    if not rows:
        return None
    steps = np.array([float(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(loss) // 20)
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.8, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
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


def pairs_png(pairs: Sequence[tuple[np.ndarray, np.ndarray, str]]) -> bytes:
    """Generated sample (left) beside its nearest training image (right), one pair per row."""
    fig, axes = plt.subplots(len(pairs), 2, figsize=(4.2, 2.1 * len(pairs)))
    axes = np.atleast_2d(axes).reshape(len(pairs), 2)
    for r, (sample, train, label) in enumerate(pairs):
        _show(axes[r, 0], sample, f"sample · {label}")
        _show(axes[r, 1], train, "nearest training image (SSIM)")
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
                "RANDOM FEATURE EXTRACTOR: FID/KID and feature cosines were computed with a "
                "randomly initialised network; numbers are not comparable to published FID."
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
    return section("citations", "Citations", f'<div class="citations">{linkify(text)}</div>')


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
    parts.extend(note(n) for n in training.get("notes") or [])
    return section("training", "Training", "\n".join(parts))


def samples_section(samples: Sequence[dict] | None) -> str:
    if not samples:
        return section("samples", "Samples", note("No samples to show."))
    parts = []
    for item in samples:
        parts.append(f"<h3>{esc(item.get('prompt'))}</h3>")
        parts.append(
            f"<p>{fmt(item.get('n_generated'))} generated (top row) · "
            f"{fmt(item.get('n_real'))} real test images with this caption (bottom row)</p>"
        )
        parts.append(img_tag(item.get("figure"), f"samples for {item.get('prompt')}"))
    return section("samples", "Samples", "\n".join(parts))


def metrics_section(metrics: dict | None) -> str:
    metrics = metrics or {}
    fid = metrics.get("fid_kid") or {}
    div = metrics.get("ms_ssim_diversity") or {}
    memo = metrics.get("memorization") or {}
    extractor = _extractor_label(fid.get("feature_extractor") or metrics.get("feature_extractor"))
    kid = (
        f"{fmt(fid.get('kid_mean'))} ± {fmt(fid.get('kid_std'))}"
        if fid.get("kid_mean") is not None
        else None
    )
    rows = [
        ("FID ↓", fid.get("fid"), extractor),
        (f"KID ↓ (subset {fid.get('kid_subset_size')})", kid, extractor),
        ("MS-SSIM diversity ↓ (mean pairwise, per prompt)", div.get("overall"), "pixels"),
        (
            "memorization: fraction flagged",
            memo.get("fraction_flagged"),
            extractor + " + pixel SSIM",
        ),
    ]
    parts = [table(["metric", "value", "computed with"], rows)]
    counts = metrics.get("counts") or {}
    if counts:
        parts.append(table(["images", "count"], sorted(counts.items())))
    per_prompt = div.get("per_prompt") or {}
    if per_prompt:
        prompt_rows = [(p, v.get("mean"), v.get("samples")) for p, v in per_prompt.items()]
        parts.append(table(["prompt", "MS-SSIM", "samples"], prompt_rows))
    return section("metrics", "Metrics", "\n".join(parts))


def memorization_section(memo: dict | None) -> str:
    memo = memo or {}
    summary = memo.get("summary") or {}
    if not summary:
        return section("memorization", "Memorization", note(memo.get("note") or "Not computed."))
    parts = [
        table(["", ""], sorted(summary.items())),
        img_tag(memo.get("figure"), "closest sample / training pairs"),
    ]
    pairs = memo.get("pairs") or []
    if pairs:
        header = ["sample", "train (cosine)", "cosine", "train (SSIM)", "SSIM", "flagged"]
        rows = [
            [
                p.get("sample_file"),
                p.get("train_file_by_cosine"),
                p.get("cosine"),
                p.get("train_file_by_ssim"),
                p.get("ssim"),
                p.get("flagged"),
            ]
            for p in pairs
        ]
        parts.append(table(header, rows))
    return section("memorization", "Memorization", "\n".join(parts))


def provenance_section(prov: dict | None) -> str:
    prov = prov or {}
    packages = prov.get("packages") or {}
    parts = [
        table(["", ""], [("git commit", prov.get("git_commit"))]),
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
        metrics_section(context.get("metrics")),
        memorization_section(context.get("memorization")),
        provenance_section(context.get("provenance")),
    ]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n{body}\n</body>\n</html>\n"
    )
