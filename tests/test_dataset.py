"""Merging prepared shards into the imagefolder view."""

import json

import pandas as pd
import pytest
from dicom_factory import ct_phantom, prepare_settings, write_volume

from idc_diffusion.prepare.dataset import build_imagefolder
from idc_diffusion.prepare.shard import prepare_shard


def make_shard(root, k, series):
    """Prepare shard k from (uid, split, status) triples of 4-slice CT abdomen series."""
    dicom = root / f"dicom/shard-{k}"
    rows, entries = [], []
    for uid, split, status in series:
        if status == "ok":
            write_volume(dicom / uid, ct_phantom(4, 16), series_uid=uid)
        rows.append(
            {
                "SeriesInstanceUID": uid,
                "StudyInstanceUID": "1.9",
                "Modality": "CT",
                "BodyPartExamined": "ABDOMEN",
                "PatientSex": "F",
                "PatientAge": "045Y",
                "split": split,
                "collection_id": "c",
                "stratum": "ct",
                "license_short_name": "CC BY 4.0",
            }
        )
        entries.append({"SeriesInstanceUID": uid, "status": status, "reason": "gone"})
    report = {"shard": k, "pixel_source": "synthetic", "series": entries}
    report_path = root / f"dicom/shard-{k}.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report))
    out = root / f"dataset/shard-{k}"
    settings = prepare_settings(resolution=16, slices_per_series=2)
    prepare_shard(pd.DataFrame(rows), report, dicom, out, settings, k)
    return out, report_path


@pytest.fixture
def merged(tmp_path):
    s0, r0 = make_shard(tmp_path, 0, [("1.5.1", "train", "ok"), ("1.5.2", "val", "missing")])
    s1, r1 = make_shard(tmp_path, 1, [("1.5.3", "train", "ok"), ("1.5.4", "train", "ok")])
    root = tmp_path / "dataset"
    counts = build_imagefolder([s1, s0], root, [r0, r1])
    return root, counts, (s0, s1)


def read_metadata(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_counts_and_all_splits(merged):
    root, counts, _ = merged
    # 3 usable series x 2 slices x 1 window (abdomen), all in train
    assert {k: counts[k] for k in ("train", "val", "test")} == {"train": 6, "val": 0, "test": 0}
    assert counts["download_status"] == {"missing": 1, "ok": 3}
    assert counts["pixel_source"] == ["synthetic"]
    for split in ("val", "test"):
        assert (root / split / "metadata.jsonl").read_text() == ""
        assert [p.name for p in (root / split).iterdir()] == ["metadata.jsonl"]


def test_metadata_lines(merged):
    root, _, (s0, _) = merged
    lines = read_metadata(root / "train" / "metadata.jsonl")
    names = [line["file_name"] for line in lines]
    assert names == sorted(names) and len(set(names)) == 6
    assert names[0].startswith("shard-0_1.5.1_") and names[-1].startswith("shard-1_1.5.4_")
    for line in lines:
        image = root / "train" / line["file_name"]
        assert image.is_file()
        assert line["text"] == "CT of the abdomen, axial slice, abdomen window, female, 40-49 years"
        assert line["pixel_source"] == "synthetic" and line["window"] == "abdomen"
    src = s0 / "images" / names[0].removeprefix("shard-0_")
    assert (root / "train" / names[0]).stat().st_ino == src.stat().st_ino  # hard link


def test_rejected_merged(merged):
    root, counts, _ = merged
    rejected = pd.read_parquet(root / "rejected.parquet")
    assert counts["rejected"] == len(rejected) == 1
    row = rejected.iloc[0]
    assert pd.isna(row.file) and pd.isna(row.slice_index)
    assert (row.SeriesInstanceUID, row.stage, row.reason, row.shard) == (
        "1.5.2",
        "download",
        "download missing: gone",
        "shard-0",
    )


def test_rerun_is_idempotent(merged, tmp_path):
    root, counts, shards = merged
    before = (root / "train" / "metadata.jsonl").read_text()
    again = build_imagefolder(list(shards), root, [])
    assert again["train"] == counts["train"]
    assert (root / "train" / "metadata.jsonl").read_text() == before


def test_no_shards(tmp_path):
    counts = build_imagefolder([], tmp_path / "ds", [])
    assert {k: counts[k] for k in ("train", "val", "test", "rejected")} == dict.fromkeys(
        ("train", "val", "test", "rejected"), 0
    )
    assert pd.read_parquet(tmp_path / "ds" / "rejected.parquet").empty
