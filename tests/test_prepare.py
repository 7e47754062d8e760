"""prepare_shard end to end on a small generated shard."""

import re

import numpy as np
import pandas as pd
import pytest
from dicom_factory import (
    PATIENT_ID,
    PATIENT_NAME,
    SAGITTAL,
    STUDY_DATE,
    ct_phantom,
    prepare_settings,
    strip_pixels,
    truncate,
    write_radiograph,
    write_volume,
)
from PIL import Image

from idc_diffusion.prepare.imaging import foreground_fraction, resize_square, write_png
from idc_diffusion.prepare.shard import RECORD_DTYPES, REJECTED_DTYPES, prepare_shard
from idc_diffusion.prepare.slice_selection import select_indices

SIZE = 32
WATER = (SIZE // 2, SIZE // 4)  # water disc, outside the bone square: HU == original slice k
SPACING = 2.5


def cohort_row(uid, modality, body_part, split="train", sex="M", age="065Y", **extra):
    return {
        "collection_id": "demo_collection",
        "PatientID": PATIENT_ID,
        "StudyInstanceUID": "1.2.840.1",
        "SeriesInstanceUID": uid,
        "Modality": modality,
        "BodyPartExamined": body_part,
        "SeriesDescription": "desc",
        "PatientAge": age,
        "PatientSex": sex,
        "license_short_name": "CC BY 4.0",
        "instanceCount": 1,
        "stratum": f"{modality.lower()}",
        "split": split,
        "shard": 0,
        **extra,
    }


def ok(uid, status="ok", reason=""):
    return {
        "SeriesInstanceUID": uid,
        "expected_instances": 1,
        "files": 1,
        "bytes": 1,
        "status": status,
        "reason": reason,
    }


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    dicom = root / "dicom"
    rows, series = [], []
    # CT chest: 20 slices, shuffled file names, one truncated and one pixel-less file
    order = list(np.random.default_rng(0).permutation(20))
    chest, paths = write_volume(
        dicom / "chest",
        ct_phantom(20, SIZE),
        file_order=order,
        spacing=SPACING,
        series_uid="1.2.3.1",
    )
    truncate(paths[5])
    strip_pixels(paths[12])
    (dicom / "chest").rename(dicom / chest)
    rows.append(cohort_row(chest, "CT", "CHEST"))
    # CT head: 3 slices, the first is all air (skipped for body fraction)
    head_vol = ct_phantom(3, SIZE)
    head_vol[0] = -1000 + 1024
    head, _ = write_volume(dicom / "1.2.3.2", head_vol, series_uid="1.2.3.2")
    rows.append(cohort_row(head, "CT", "HEAD", split="val", sex=None, age=None))
    # MR sagittal, 6 slices
    rng = np.random.default_rng(1)
    mr_vol = rng.integers(100, 1000, size=(6, SIZE, SIZE)).astype(np.uint16)
    mr, _ = write_volume(
        dicom / "1.2.3.3",
        mr_vol,
        "MR",
        orientation=SAGITTAL,
        slope=None,
        intercept=None,
        series_uid="1.2.3.3",
    )
    rows.append(cohort_row(mr, "MR", "BRAIN", split="test", sex="F", age="030Y"))
    # CR MONOCHROME1, two non-square radiographs with a VOI window
    cr_stored = np.tile(np.linspace(0, 4095, 16).astype(np.uint16), (SIZE, 1))
    for name, number in [("z.dcm", 1), ("a.dcm", 2)]:
        write_radiograph(
            dicom / "1.2.3.4" / name, cr_stored, instance_number=number, series_uid="1.2.3.4"
        )
    rows.append(cohort_row("1.2.3.4", "CR", "CHEST", sex="F", age=None))
    # failed downloads and a missing folder
    rows.append(cohort_row("1.2.3.5", "CT", "CHEST"))
    rows.append(cohort_row("1.2.3.6", "CT", "CHEST"))
    rows.append(cohort_row("1.2.3.7", "CT", "CHEST"))
    series = [
        ok(chest),
        ok(head),
        ok(mr),
        ok("1.2.3.4"),
        ok("1.2.3.5", "incomplete", "3 of 5 files"),
        ok("1.2.3.6", "corrupt", "bad.dcm"),
        ok("1.2.3.7", "missing", "no files (expected 1)"),
    ]
    report = {"shard": 0, "source": "test", "pixel_source": "synthetic", "series": series}
    out = root / "out"
    settings = prepare_settings(resolution=SIZE, slices_per_series=4)
    records, rejected = prepare_shard(pd.DataFrame(rows), report, dicom, out, settings, 0)
    return {"out": out, "records": records, "rejected": rejected, "paths": paths}


def test_select_indices():
    assert select_indices(20, 4, (0.1, 0.9)) == [4, 8, 11, 15]
    assert select_indices(1, 8, (0.1, 0.9)) == [0]
    assert select_indices(3, 8, (0.0, 1.0)) == [0, 1, 2]
    assert select_indices(0, 8) == []


def test_image_counts(shard):
    rec = shard["records"]
    per_series = rec.groupby("SeriesInstanceUID").size().to_dict()
    # chest: 4 slices x 2 windows; head: 2 slices (air slice skipped) x 2; MR 4 x 1; CR 2 x 1
    assert per_series == {"1.2.3.1": 8, "1.2.3.2": 4, "1.2.3.3": 4, "1.2.3.4": 2}
    assert sorted(p.name for p in (shard["out"] / "images").iterdir()) == sorted(
        name.removeprefix("images/") for name in rec["file_name"]
    )
    assert set(rec[rec.SeriesInstanceUID == "1.2.3.1"].window) == {"lung", "mediastinum"}
    assert set(rec[rec.SeriesInstanceUID == "1.2.3.2"].window) == {"brain", "bone"}


def test_files_written_match_parquet(shard):
    out = shard["out"]
    on_disk = pd.read_parquet(out / "records.parquet")
    pd.testing.assert_frame_equal(on_disk, shard["records"])
    assert list(on_disk.columns) == list(RECORD_DTYPES)
    assert list(pd.read_parquet(out / "rejected.parquet").columns) == list(REJECTED_DTYPES)
    name = on_disk.file_name.iloc[0]
    assert re.fullmatch(r"images/1\.2\.3\.\d_\d{4}_[a-z]+\.png", name)


def test_ct_pixels_equal_hand_windowed_values(shard):
    rec = shard["records"]
    chest = rec[rec.SeriesInstanceUID == "1.2.3.1"]
    assert chest.slice_position_mm.is_monotonic_increasing
    for row in chest.itertuples():
        png = np.asarray(Image.open(shard["out"] / row.file_name))
        assert png.shape == (SIZE, SIZE) and png.dtype == np.uint8
        k = round(row.slice_position_mm / SPACING)  # the phantom's slice: water == k HU
        if row.window == "lung":
            expected_water = round(((k + 600.5) / 1499 + 0.5) * 255)
            assert png[0, 0] == round(((-1000 + 600.5) / 1499 + 0.5) * 255) == 60  # air
        else:
            expected_water = round(((k - 49.5) / 349 + 0.5) * 255)
            assert png[0, 0] == 0  # air below the mediastinum window
        assert png[WATER] == expected_water
        assert png[SIZE // 2, SIZE // 2] == 255  # 700 HU bone in both windows
        assert (row.window_center, row.window_width) == (
            (-600.0, 1500.0) if row.window == "lung" else (50.0, 350.0)
        )
    # the sorted stack lost 2 files, so slices are those of an 18-slice stack
    assert sorted(set(chest.slice_index)) == select_indices(18, 4, (0.1, 0.9))


def test_bad_files_rejected_by_name_rest_written(shard):
    rej = shard["rejected"]
    paths = shard["paths"]
    chest = rej[rej.SeriesInstanceUID == "1.2.3.1"].set_index("file")
    assert set(chest.index) == {paths[5].name, paths[12].name}
    assert "truncated" in chest.loc[paths[5].name, "reason"]
    assert paths[5].name in chest.loc[paths[5].name, "reason"]
    assert "no PixelData" in chest.loc[paths[12].name, "reason"]
    assert (chest.stage == "prepare").all()


def test_download_failures_and_missing_folder(shard):
    rej = shard["rejected"].set_index("SeriesInstanceUID")
    assert rej.loc["1.2.3.5", "reason"] == "download incomplete: 3 of 5 files"
    assert rej.loc["1.2.3.5", "stage"] == "download"
    assert rej.loc["1.2.3.6", "reason"] == "download corrupt: bad.dcm"
    assert rej.loc["1.2.3.7", "reason"] == "download missing: no files (expected 1)"
    assert pd.isna(rej.loc["1.2.3.5", "file"]) and pd.isna(rej.loc["1.2.3.5", "slice_index"])


def test_air_slice_skipped_with_reason(shard):
    rej = shard["rejected"]
    head = rej[rej.SeriesInstanceUID == "1.2.3.2"]
    assert len(head) == 1 and head.slice_index.iloc[0] == 0
    assert "body fraction 0.000 below min_body_fraction 0.05" in head.reason.iloc[0]


def test_captions(shard):
    rec = shard["records"].set_index("file_name")
    texts = dict(zip(rec.SeriesInstanceUID + "/" + rec.window, rec.text, strict=True))
    assert texts["1.2.3.1/lung"] == "CT of the chest, axial slice, lung window, male, 60-69 years"
    assert texts["1.2.3.2/bone"] == "CT of the head, axial slice, bone window"
    assert texts["1.2.3.3/percentile"] == "MR of the brain, sagittal slice, female, 30-39 years"
    assert texts["1.2.3.4/voi"] == "radiograph of the chest, PA view, female"
    for text in rec.text:
        for secret in (PATIENT_ID, PATIENT_NAME, "Doe", STUDY_DATE, "1.2.3", "1.2.840"):
            assert secret not in text
    assert (rec.pixel_source == "synthetic").all()


def test_mr_percentile_window(shard):
    rec = shard["records"]
    mr = rec[rec.SeriesInstanceUID == "1.2.3.3"]
    assert (mr.window == "percentile").all() and mr.window_center.isna().all()
    assert mr.plane.eq("sagittal").all()
    pixels = np.stack([np.asarray(Image.open(shard["out"] / f)) for f in mr.file_name])
    # values uniform in 100..999: 1st/99th percentiles ~109/990 -> spread over 0..255
    assert pixels.min() == 0 and pixels.max() == 255
    assert 100 < pixels.mean() < 155


def test_monochrome1_radiograph(shard):
    rec = shard["records"]
    cr = rec[rec.SeriesInstanceUID == "1.2.3.4"].sort_values("slice_index")
    assert cr.slice_index.tolist() == [0, 1] and cr.slice_position_mm.isna().all()
    assert (cr.window == "voi").all() and (cr.window_center == 2048.0).all()
    assert cr.view.tolist() == ["PA", "PA"] and cr.plane.isna().all()
    png = np.asarray(Image.open(shard["out"] / cr.file_name.iloc[0]))
    # 32 rows x 16 cols fitted into 32 x 32: 8 padding columns either side
    assert (png[:, :8] == 0).all() and (png[:, 24:] == 0).all()
    row = png[SIZE // 2, 8:24].astype(int)
    assert row[0] >= 250 and row[-1] <= 5  # stored 0 -> white, stored 4095 -> black
    assert np.all(np.diff(row) <= 1)


def test_empty_shard(tmp_path):
    rows = pd.DataFrame(columns=["SeriesInstanceUID", "Modality", "split"])
    report = {"shard": 3, "pixel_source": "idc", "series": []}
    records, rejected = prepare_shard(
        rows, report, tmp_path / "d", tmp_path / "o", prepare_settings(), 3
    )
    assert records.empty and rejected.empty
    assert list(pd.read_parquet(tmp_path / "o" / "records.parquet").columns) == list(RECORD_DTYPES)
    assert list(pd.read_parquet(tmp_path / "o" / "rejected.parquet").columns) == list(
        REJECTED_DTYPES
    )
    assert (tmp_path / "o" / "images").is_dir()


def test_series_ok_in_report_but_gone_stops_before_touching_outputs(tmp_path):
    write_volume(tmp_path / "d" / "1.2.3.1", ct_phantom(2, SIZE), series_uid="1.2.3.1")
    rows = pd.DataFrame(
        [cohort_row("1.2.3.1", "CT", "CHEST"), cohort_row("1.2.3.9", "CT", "CHEST")]
    )
    report = {"shard": 0, "pixel_source": "idc", "series": [ok("1.2.3.1"), ok("1.2.3.9")]}
    earlier = tmp_path / "o" / "images" / "earlier.png"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"png")
    with pytest.raises(ValueError, match=r"d/1\.2\.3\.9: DICOM marked ok .* is gone"):
        prepare_shard(rows, report, tmp_path / "d", tmp_path / "o", prepare_settings(), 0)
    assert earlier.read_bytes() == b"png" and not (tmp_path / "o" / "records.parquet").exists()


def test_no_image_from_a_non_empty_cohort_shard_stops(tmp_path):
    rows = pd.DataFrame([cohort_row("1.2.3.5", "CT", "CHEST")])
    report = {"shard": 4, "pixel_source": "idc", "series": [ok("1.2.3.5", "corrupt", "bad")]}
    with pytest.raises(ValueError, match=r"shard 4: 0 images from the cohort's 1 series"):
        prepare_shard(rows, report, tmp_path / "d", tmp_path / "o", prepare_settings(), 4)
    assert not (tmp_path / "o" / "records.parquet").exists()


def test_disallowed_caption_field_raises(tmp_path):
    settings = prepare_settings()
    settings["caption"] = {"separator": ", ", "parts": [["{modality} of {PatientID}"]]}
    with pytest.raises(ValueError, match="PatientID"):
        prepare_shard(pd.DataFrame(), {"series": []}, tmp_path, tmp_path / "o", settings, 0)


def test_resize_square_keeps_aspect_and_pads():
    image = np.full((64, 32), 200, np.uint8)
    out = resize_square(image, 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert (out[:, :4] == 0).all() and (out[:, 12:] == 0).all()
    assert (out[2:-2, 5:11] == 200).all()  # flat region survives resampling exactly
    same = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(resize_square(same, 16), same)


def test_foreground_fraction_and_png_roundtrip(tmp_path):
    hu = np.array([[-1000, -1000], [-400, 40]])
    assert foreground_fraction(hu, -500) == 0.5
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = write_png(image, tmp_path / "a" / "x.png")
    with Image.open(path) as png:
        assert png.mode == "L" and np.array_equal(np.asarray(png), image)
