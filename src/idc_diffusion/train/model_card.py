"""The fine-tuned model's card (``model_card.md``): data, provenance, training, limitations."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from idc_diffusion.core.rerun import RUNTIME_ONLY

CARD_NAME = "model_card.md"
SUMMARY_NAME = "train_summary.json"


def is_non_commercial(license_name: str) -> bool:
    """True for licenses that forbid commercial use (CC BY-NC*, TCIA restricted, ...)."""
    text = license_name.upper().replace("_", "-")
    return "NC" in text.replace("-", " ").split() or "-NC" in text or "NON-COMMERCIAL" in text


def weights_license(licenses: Iterable[str]) -> str:
    """The terms the fine-tuned weights inherit from their training data's licenses."""
    names = sorted(set(licenses))
    if not names:
        return "unknown (no license information): do not redistribute until checked"
    restrictive = [n for n in names if is_non_commercial(n)]
    if restrictive:
        return (
            f"non-commercial use only: trained on data under {', '.join(restrictive)}; the "
            "weights and their outputs inherit the most restrictive license"
        )
    return (
        f"inherits {', '.join(names)}: attribution required (cite the sources in CITATIONS.md); "
        "commercial use as far as these licenses and the base model's license allow"
    )


def base_model_lines(manifest: Mapping[str, Any] | None) -> list[str]:
    """The card's "Base model" section: source, revision, license, each file's sha256."""
    if not manifest:
        return []
    fetched = f"; fetched from {manifest['endpoint']}" if manifest.get("endpoint") else ""
    requested = manifest.get("requested_revision")
    files = manifest.get("files", {})
    hub_checked = len(manifest.get("verified_against_hub") or [])
    pinned = len(manifest.get("pinned_by_config") or [])
    return [
        "## Base model",
        "",
        f"- Source: `{manifest['source']}` ({manifest.get('kind', 'n/a')}{fetched})",
        f"- Revision: `{_fmt(manifest.get('revision'))}`"
        + (f" (requested `{requested}`)" if requested else ""),
        f"- License of the base weights: {base_license(manifest)}",
        f"- Files actually used, with the sha256 the `base_model` stage computed; {hub_checked} "
        f"of {len(files)} matched the digests the hub declares, {pinned} the ones pinned in "
        "`train.base_model_sha256`:",
        "",
        "| file | bytes | sha256 |",
        "|---|---|---|",
        *(
            f"| {name} | {info['size']} | `{info['sha256']}` |"
            for name, info in sorted(files.items())
        ),
        "",
    ]


def base_license(manifest: Mapping[str, Any] | None) -> str:
    """The base weights' license as the manifest records it, or a warning when unknown."""
    if manifest and manifest.get("license"):
        card = manifest.get("card_license")
        differs = card and card != manifest["license"]
        return str(manifest["license"]) + (f" (the source's card says {card})" if differs else "")
    return "unknown (the source's card names none): check it before sharing these weights"


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
    sources = pixel_sources(summary, provenance)
    lines = [
        *title_lines(provenance, sources),
        *model_lines(summary, settings),
        *base_model_lines(provenance.get("base_model")),
        *data_lines(summary, provenance, sources),
        *training_lines(summary, settings),
        *LIMITATIONS,
    ]
    return "\n".join(lines)


def pixel_sources(summary: Mapping[str, Any], provenance: Mapping[str, Any]) -> list[str]:
    """Where the training pixels came from (``idc``, ``synthetic``, ...), sorted."""
    source = provenance.get("pixel_source") or summary.get("pixel_source") or "unknown"
    return [source] if isinstance(source, str) else sorted(map(str, source))


def title_lines(provenance: Mapping[str, Any], sources: list[str]) -> list[str]:
    """The card's title, and a warning when the pixels are not real IDC images."""
    lines = [f"# {provenance.get('run_name') or 'IDC-Diffusion'}: fine-tuned Stable Diffusion", ""]
    if sources != ["idc"]:
        lines += [
            f"> **WARNING: trained on `{', '.join(sources) or 'unknown'}` pixel data, not real "
            "IDC images.** This model is a pipeline demonstration only; its outputs mean nothing "
            "medically.",
            "",
        ]
    return lines


def model_lines(summary: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """The card's "Model" section: base, what was fine-tuned, prediction type, resolution."""
    mode = summary.get("mode", "full")
    trained = "LoRA adapters on the UNet attention" if mode == "lora" else "the whole UNet"
    if summary.get("train_text_encoder"):
        trained += " and the text encoder" + (" (LoRA)" if mode == "lora" else "")
    frozen = "VAE frozen" if summary.get("train_text_encoder") else "VAE and text encoder frozen"
    return [
        "## Model",
        "",
        f"- Base model: `{summary['base_model']}`"
        + (f" (revision `{settings.get('revision')}`)" if settings.get("revision") else ""),
        f"- Fine-tuned: {trained} ({frozen})"
        + ("; saved weights are the EMA of the trained weights" if summary.get("ema") else ""),
        *(
            [
                "- LoRA adapters alone: `pytorch_lora_weights.safetensors` "
                "(`pipeline.load_lora_weights(folder)` on the base model); fused in this pipeline"
            ]
            if mode == "lora"
            else []
        ),
        f"- Prediction type: `{summary['prediction_type']}`; resolution {summary['resolution']} px",
        "",
    ]


def data_lines(
    summary: Mapping[str, Any], provenance: Mapping[str, Any], sources: list[str]
) -> list[str]:
    """The card's "Data" section: images, release, licenses, collections, citation."""
    cohort = provenance.get("cohort_summary") or {}
    licenses = cohort.get("licenses") or {}
    collections = provenance.get("collections") or cohort.get("collections") or {}
    base = provenance.get("base_model")
    return [
        "## Data",
        "",
        f"- Training images: {summary['train_images']} (pixel source: "
        f"`{', '.join(sources) or 'unknown'}`)",
        f"- Held-out split: `{summary['heldout_split']}`, {summary['heldout_images']} images",
        f"- IDC data release: {_fmt(cohort.get('idc_version'))}"
        f" (idc-index-data {_fmt(cohort.get('idc_index_data_version'))})",
        "- Licenses of the training series: "
        + (", ".join(f"{k} ({v} series)" for k, v in sorted(licenses.items())) or "unknown"),
        "- Collections: "
        + (", ".join(f"{k} ({v} series)" for k, v in sorted(collections.items())) or "unknown"),
        f"- **License of these weights**: {weights_license(licenses)}",
        *(
            [
                f"- **License of the base model**: {base_license(base)}; its use restrictions "
                "carry over to this fine-tuned model and its outputs"
            ]
            if base
            else []
        ),
        f"- Cite: see `{provenance.get('citations_path') or 'results/cohort/CITATIONS.md'}` "
        "(each collection's source DOI, IDC and TCIA)",
        "",
    ]


def training_lines(summary: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """The card's "Training" section: steps, seeds, held-out loss, time, hyperparameters."""
    return [
        "## Training",
        "",
        f"- Optimizer steps: {summary['steps']}; effective batch size "
        f"{summary['effective_batch_size']}",
        f"- Seed: {summary['seed']}; tiny-model seed: {settings.get('tiny_seed')}",
        f"- Held-out loss (same images, noise and timesteps): base "
        f"{_fmt(summary['heldout_loss_base'])} -> fine-tuned {_fmt(summary['heldout_loss_final'])}",
        f"- Training time (wall): {_fmt(summary['seconds'])} s on "
        f"{summary.get('hardware', 'n/a')} (mixed precision: "
        f"{summary.get('mixed_precision', settings.get('mixed_precision'))})",
        "",
        "| hyperparameter | value |",
        "|---|---|",
        *(
            f"| {key} | {_fmt(value)} |"
            for key, value in settings.items()
            if key not in RUNTIME_ONLY["train"]  # how the job ran, not what it computed
        ),
        "",
    ]


# The card's "Intended use and limitations" section.
LIMITATIONS = (
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
)


def card_provenance(run_name: str, cohort_dir: Path, base_dir: Path | None) -> dict[str, Any]:
    """What the card says of the run beyond the training summary: run name, cohort summary,
    citations, series per collection of the train split, the base_model stage's manifest."""
    provenance: dict[str, Any] = {
        "run_name": run_name,
        "cohort_summary": json.loads((cohort_dir / "summary.json").read_text()),
        "citations_path": str(cohort_dir / "CITATIONS.md"),
    }
    cohort_table = cohort_dir / "cohort.parquet"
    if cohort_table.is_file():
        rows = pd.read_parquet(cohort_table, columns=["collection_id", "split"])
        counts = rows[rows["split"] == "train"]["collection_id"].value_counts()
        provenance["collections"] = {str(k): int(v) for k, v in counts.items()}
    manifest = base_dir / "manifest.json" if base_dir else None
    if manifest is not None and manifest.is_file():
        provenance["base_model"] = json.loads(manifest.read_text(encoding="utf-8"))
    return provenance


def write_model_card(
    model_dir: Path,
    settings: Mapping[str, Any],
    provenance: Mapping[str, Any],
    out: Path | None = None,
) -> Path:
    """Render the card of the model in `model_dir` (its train_summary.json) into `out`
    (default ``model_dir/model_card.md``); the model-card stage, cheap and apart from
    training, so that renaming a run rewrites only the card."""
    model_dir = Path(model_dir)
    summary = json.loads((model_dir / SUMMARY_NAME).read_text(encoding="utf-8"))
    out = Path(out) if out is not None else model_dir / CARD_NAME
    out.write_text(render_model_card(summary, settings, provenance), "utf-8")
    return out
