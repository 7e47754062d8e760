"""Per-subgroup metrics (modality, body part, sex, age band) where a group has enough images.

Real test images carry their caption's structured fields (metadata.jsonl); a generated image
takes the fields of the real caption its prompt equals (:func:`caption_index`). For each value
of each field with at least ``min_group_size`` real and generated images:
:func:`metrics.compare_sets` (FID, KID with its interval, PRDC); smaller groups are listed
with their counts and the reason, and no point estimate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from idc_diffusion.evaluate.metrics import compare_sets

SUBGROUP_FIELDS = ("modality", "body_part", "sex", "age_band")


def caption_index(entries: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Caption text → the structured fields of the first metadata entry with that caption."""
    index: dict[str, dict[str, Any]] = {}
    for entry in entries:
        text = entry.get("text")
        if text is not None and str(text) not in index:
            index[str(text)] = {k: v for k, v in entry.items() if k not in ("file_name", "text")}
    return index


def subgroup_metrics(
    real_feats: Tensor,
    real_fields: Sequence[Mapping[str, Any]],
    fake_feats: Tensor,
    fake_fields: Sequence[Mapping[str, Any] | None],
    min_group_size: int,
    k: int = 5,
    fields: Sequence[str] = SUBGROUP_FIELDS,
    n_resamples: int = 200,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (field, value) seen on either side, scored when both sides are large enough."""
    rows = []
    for field in fields:
        values = {f.get(field) for f in real_fields} | {
            f.get(field) for f in fake_fields if f is not None
        }
        for value in sorted(v for v in values if v is not None):
            real_idx = [i for i, f in enumerate(real_fields) if f.get(field) == value]
            fake_idx = [i for i, f in enumerate(fake_fields) if f and f.get(field) == value]
            row: dict[str, Any] = {
                "field": field,
                "value": value,
                "n_real": len(real_idx),
                "n_generated": len(fake_idx),
            }
            if min(len(real_idx), len(fake_idx)) < max(min_group_size, 2):
                row["skipped"] = f"fewer than {max(min_group_size, 2)} real or generated images"
            else:
                row.update(
                    compare_sets(
                        real_feats[torch.tensor(real_idx)],
                        fake_feats[torch.tensor(fake_idx)],
                        min_group_size,
                        n_resamples,
                        seed,
                        k,
                    )
                )
            rows.append(row)
    return rows
