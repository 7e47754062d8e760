"""Per-subgroup metrics: caption → fields matching, group-size threshold, known separations."""

from __future__ import annotations

import pytest
import torch

from idc_diffusion.evaluate.metrics import frechet_distance
from idc_diffusion.evaluate.subgroups import caption_index, subgroup_metrics


def test_caption_index_keeps_first_fields() -> None:
    entries = [
        {"file_name": "a.png", "text": "CT chest", "modality": "CT", "sex": "female"},
        {"file_name": "b.png", "text": "CT chest", "modality": "CT", "sex": "male"},
        {"file_name": "c.png", "text": "MR brain", "modality": "MR"},
    ]
    index = caption_index(entries)
    assert index == {
        "CT chest": {"modality": "CT", "sex": "female"},
        "MR brain": {"modality": "MR"},
    }


def test_subgroups_scored_only_when_large_enough() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(20, 4, generator=g), torch.randn(4, 4, generator=g) + 5])
    fake = torch.cat([torch.randn(20, 4, generator=g), torch.randn(3, 4, generator=g) + 50])
    real_fields = [{"modality": "CT"}] * 20 + [{"modality": "MR"}] * 4
    fake_fields = [{"modality": "CT"}] * 20 + [{"modality": "MR"}] * 3
    rows = subgroup_metrics(real, real_fields, fake, fake_fields, min_group_size=5, k=3)
    by_value = {(r["field"], r["value"]): r for r in rows}
    ct = by_value[("modality", "CT")]
    assert (ct["n_real"], ct["n_generated"]) == (20, 20) and "skipped" not in ct
    assert ct["fid"] == pytest.approx(frechet_distance(real[:20], fake[:20]))
    assert ct["precision"] > 0.5 and ct["prdc_k"] == 3
    assert ct["kid_ci"][0] <= ct["kid"] <= ct["kid_ci"][1]  # same distribution: covers 0 too
    assert ct["fid_ci"][0] <= ct["fid_bias_corrected"] <= ct["fid_ci"][1]  # 20 >= 4 x 4
    mr = by_value[("modality", "MR")]
    assert (mr["n_real"], mr["n_generated"]) == (4, 3) and "fewer than 5" in mr["skipped"]
    assert "fid" not in mr
    rows = subgroup_metrics(real, real_fields, fake, fake_fields, min_group_size=3, k=5)
    mr = {r["value"]: r for r in rows}["MR"]
    assert mr["precision"] == 0.0 and mr["prdc_k"] == 2  # k capped below the group size
    assert mr["fid"] > 1000


def test_unmatched_samples_are_left_out() -> None:
    feats = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    rows = subgroup_metrics(
        feats, [{"sex": "male"}] * 6, feats, [None] * 3 + [{"sex": "male"}] * 3, min_group_size=3
    )
    assert len(rows) == 1 and rows[0]["n_generated"] == 3 and rows[0]["n_real"] == 6
