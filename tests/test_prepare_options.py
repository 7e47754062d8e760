"""prepare_shard options: process pool, RGB composite, field of view, slice selection."""

import hashlib

import numpy as np
import pandas as pd
import pytest
from dicom_factory import ct_phantom, prepare_settings, write_volume
from PIL import Image
from test_prepare import cohort_row, ok

from idc_diffusion.prepare.shard import prepare_shard


def _shard(tmp_path, n_series=3, n_slices=6, size=32):
    dicom = tmp_path / "dicom"
    rows = []
    for i in range(n_series):
        uid = f"1.2.9.{i}"
        write_volume(dicom / uid, ct_phantom(n_slices, size), series_uid=uid)
        rows.append(cohort_row(uid, "CT", "CHEST"))
    report = {"series": [ok(r["SeriesInstanceUID"]) for r in rows]}
    return pd.DataFrame(rows), report, dicom


def _digests(out_dir, records):
    return [hashlib.sha256((out_dir / f).read_bytes()).hexdigest() for f in records["file_name"]]


def test_two_workers_give_identical_output(tmp_path):
    rows, report, dicom = _shard(tmp_path)
    settings = prepare_settings(resolution=32, slices_per_series=2)
    one, _ = prepare_shard(rows, report, dicom, tmp_path / "one", settings, 0, workers=1)
    two, _ = prepare_shard(rows, report, dicom, tmp_path / "two", settings, 0, workers=2)
    pd.testing.assert_frame_equal(one, two)
    assert len(one) == 3 * 2 * 2  # series x slices x (lung, mediastinum)
    assert _digests(tmp_path / "one", one) == _digests(tmp_path / "two", two)


def test_composite_fov_and_positions(tmp_path):
    rows, report, dicom = _shard(tmp_path, n_series=1, n_slices=9)
    settings = prepare_settings(
        resolution=32,
        ct_composite=["lung", "mediastinum", "bone"],
        field_of_view_mm=44.8,  # 32 px of 0.7 mm = 22.4 mm -> half of the 32-px output
        slice_selection="positions",
        slice_positions=[0.0, 0.5, 1.0],
    )
    records, _ = prepare_shard(rows, report, dicom, tmp_path / "out", settings, 0)
    assert records["slice_index"].tolist() == [0, 4, 8]
    assert set(records["window"]) == {"composite"}
    assert records["text"].str.contains("lung/mediastinum/bone composite window").all()
    image = np.asarray(Image.open(tmp_path / "out" / records["file_name"].iloc[0]))
    assert image.shape == (32, 32, 3)
    assert not image[:8].any() and image[8:24, 8:24].any()  # 16-px content, centred


def test_near_constant_slices_rejected_with_category(tmp_path):
    dicom = tmp_path / "dicom"
    flat = np.full((4, 16, 16), 1024 + 40, np.int16)  # 40 HU everywhere: constant slices
    write_volume(dicom / "1.2.8", flat, series_uid="1.2.8")
    rows = pd.DataFrame([cohort_row("1.2.8", "CT", "ABDOMEN")])
    settings = prepare_settings(resolution=16, slices_per_series=2, min_slice_std=2.0)
    with pytest.raises(ValueError, match="0 images from the cohort's 1 series"):
        prepare_shard(rows, {"series": [ok("1.2.8")]}, dicom, tmp_path / "o", settings, 0)
    assert not (tmp_path / "o" / "records.parquet").exists()
    rejected = pd.read_parquet(tmp_path / "o" / "rejected.parquet")
    assert rejected["category"].tolist() == ["near_constant", "near_constant", "series"]
