"""The fine-tuned model's card (``model_card.md``): data, provenance, training, limitations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render_model_card(
    summary: Mapping[str, Any], settings: Mapping[str, Any], provenance: Mapping[str, Any]
) -> str:
    """Markdown model card from the train summary, the train settings and the provenance."""
    cohort = provenance.get("cohort_summary") or {}
    source = provenance.get("pixel_source") or summary.get("pixel_source") or "unknown"
    sources = [source] if isinstance(source, str) else sorted(map(str, source))
    pixel_source = ", ".join(sources) or "unknown"
    licenses = cohort.get("licenses") or {}
    lines = [f"# {provenance.get('run_name') or 'IDC-Diffusion'}: fine-tuned Stable Diffusion", ""]
    if sources != ["idc"]:
        lines += [
            f"> **WARNING: trained on `{pixel_source}` pixel data, not real IDC images.** "
            "This model is a pipeline demonstration only; its outputs mean nothing "
            "medically.",
            "",
        ]
    lines += [
        "## Model",
        "",
        f"- Base model: `{summary['base_model']}`"
        + (f" (revision `{settings.get('revision')}`)" if settings.get("revision") else ""),
        "- Fine-tuned: the UNet only (VAE and text encoder frozen)",
        f"- Prediction type: `{summary['prediction_type']}`; resolution {summary['resolution']} px",
        "",
        "## Data",
        "",
        f"- Training images: {summary['train_images']} (pixel source: `{pixel_source}`)",
        f"- Held-out split: `{summary['heldout_split']}`, {summary['heldout_images']} images",
        f"- IDC data release: {_fmt(cohort.get('idc_version'))}"
        f" (idc-index-data {_fmt(cohort.get('idc_index_data_version'))})",
        "- Licenses of the training series: "
        + (", ".join(f"{k} ({v} series)" for k, v in sorted(licenses.items())) or "unknown"),
        f"- Cite: see `{provenance.get('citations_path') or 'results/cohort/CITATIONS.md'}` "
        "(each collection's source DOI, IDC and TCIA)",
        "",
        "## Training",
        "",
        f"- Optimizer steps: {summary['steps']}; effective batch size "
        f"{summary['effective_batch_size']}",
        f"- Seed: {summary['seed']}; tiny-model seed: {settings.get('tiny_seed')}",
        f"- Held-out loss (same images, noise and timesteps): base "
        f"{_fmt(summary['heldout_loss_base'])} -> fine-tuned {_fmt(summary['heldout_loss_final'])}",
        f"- Training time: {_fmt(summary['seconds'])} s",
        "",
        "| hyperparameter | value |",
        "|---|---|",
        *(f"| {key} | {_fmt(value)} |" for key, value in settings.items()),
        "",
        "## Intended use and limitations",
        "",
        "- Research use only (methods development, data-augmentation studies). **Not for "
        "clinical use**: generated images are not diagnostic and must never be presented as "
        "patient data.",
        "- The licenses of the training data apply to this model and its outputs; some "
        "licenses (e.g. CC BY) require attribution: cite the sources listed above.",
        "- The model reflects its training cohort's modalities, body parts, scanners and "
        "demographics, including their biases and gaps; captions carry only coarse "
        "de-identified fields.",
        "- Diffusion models can memorize training images: audit nearest neighbours before "
        "sharing samples.",
        "",
    ]
    return "\n".join(lines)
