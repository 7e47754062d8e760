"""The report's matplotlib figures, each returned as PNG bytes (None when nothing to draw)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

# adherence result keys and their labels, in table order
ADHERENCE_SETS = (("real_test", "real test (ceiling)"), ("fine_tuned", "fine-tuned"),
                  ("base", "base model"))  # fmt: skip


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
    """Draw a uint8 image (grayscale or RGB) on ``ax`` without axes."""
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
