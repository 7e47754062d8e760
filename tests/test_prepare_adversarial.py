"""prepare_shard on a shard of real-world oddities: every odd file is rejected with its reason,
the good slices of the same series are written with the right pixels, and no caption is empty."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from dicom_factory import (
    ct_phantom,
    make_dataset,
    prepare_settings,
    replace_bytes,
    rewrite,
    save,
    write_j2k,
    write_radiograph,
    write_volume,
)
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless
from test_prepare import cohort_row, ok

from idc_diffusion.prepare.dataset import build_imagefolder
from idc_diffusion.prepare.shard import prepare_shard
from idc_diffusion.prepare.slice_header import MAX_FRAME_PIXELS
from idc_diffusion.prepare.slice_selection import (
    band_candidates,
    nearest_candidates,
    select_indices,
)

SIZE = 32
WATER = (SIZE // 2, SIZE // 4)  # water disc, outside the bone square: HU == slice k
SPACING = 2.5
RT_IMAGE = "1.2.840.10008.5.1.4.1.1.481.1"


def lung(hu: float) -> int:
    """The lung window (c -600, w 1500) of a HU value, as prepare writes it."""
    return int(np.clip(round(((hu + 600.5) / 1499 + 0.5) * 255), 0, 255))


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    dicom = root / "dicom"
    rows, files = [], {}
    # CT chest, 20 slices (water == k HU), with one file of each kind of trouble
    chest, paths = write_volume(dicom / "chest", ct_phantom(20, SIZE), series_uid="1.2.7.1")
    replace_bytes(paths[2], b"-1024.0", b"NaN")  # would shift the slice by 1024 HU
    rewrite(paths[17], remove=["ImagePositionPatient"])  # would drop the series' geometry
    shutil.copy(paths[5], dicom / "chest" / "copy-of-5.dcm")  # same SOPInstanceUID
    _, stray = write_volume(root / "other", ct_phantom(3, SIZE), series_uid="1.2.7.99")
    shutil.copy(stray[1], dicom / "chest" / "stray.dcm")  # another series' file
    write_j2k(
        dicom / "chest" / "huge.dcm",
        ct_phantom(1, SIZE)[0],
        SeriesInstanceUID=chest,
        Rows=60000,
        Columns=60000,
    )
    # the band centre of the second sub-band (k = 8) does not decode: replaced by k = 7
    rewrite(
        paths[8],
        meta={"TransferSyntaxUID": JPEG2000Lossless},
        PixelData=encapsulate([b"\x00garbage" * 16]),
    )
    (dicom / "chest").rename(dicom / chest)
    files["chest"] = paths
    rows.append(cohort_row(chest, "CT", "CHEST"))
    # RT Dose (pydicom's bundled file) and an RT Image: not image series
    dose = dcmread(get_testdata_file("rtdose.dcm"), stop_before_pixels=True).SeriesInstanceUID
    (dicom / dose).mkdir(parents=True)
    shutil.copy(get_testdata_file("rtdose.dcm"), dicom / dose / "dose.dcm")
    rows.append(cohort_row(dose, "RTDOSE", None))
    portal = make_dataset(np.full((SIZE, SIZE), 900, np.uint16), "CR", "1.2.7.3", "1.2.7.4")
    portal.SOPClassUID = portal.file_meta.MediaStorageSOPClassUID = RT_IMAGE
    portal.Modality = "RTIMAGE"
    save(portal, dicom / "1.2.7.3" / "portal.dcm")
    rows.append(cohort_row("1.2.7.3", "RTIMAGE", None))
    # CR: 16 x 32 stored pixels of 1.0 x 0.25 mm (portrait), MONOCHROME2 then MONOCHROME1
    ramp = np.tile(np.linspace(0, 4095, 32).astype(np.uint16), (16, 1))
    for name, number, photometric in [("a.dcm", 1, "MONOCHROME2"), ("b.dcm", 2, "MONOCHROME1")]:
        path = write_radiograph(
            dicom / "1.2.7.5" / name,
            ramp,
            photometric=photometric,
            instance_number=number,
            series_uid="1.2.7.5",
        )
        rewrite(path, PixelSpacing=[1.0, 0.25])
    rows.append(cohort_row("1.2.7.5", "CR", "CHEST"))
    report = {"series": [ok(r["SeriesInstanceUID"]) for r in rows]}
    out = root / "out"
    settings = prepare_settings(resolution=SIZE, slices_per_series=4)
    records, rejected = prepare_shard(pd.DataFrame(rows), report, dicom, out, settings, 0)
    return {"out": out, "records": records, "rejected": rejected, "files": files, "uid": chest}


def test_ct_series_keeps_geometry_hu_and_its_band(shard):
    rec = shard["records"]
    chest = rec[rec.SeriesInstanceUID == shard["uid"]]
    lungs = chest[chest.window == "lung"].sort_values("slice_index")
    # 20 files - NaN intercept (k=2) - no position (k=17) = 18 slices, band slices 3, 7, 10, 14
    # of which 7 (k=8) failed to decode and was replaced by its sub-band neighbour 6 (k=7)
    assert lungs.slice_index.tolist() == [3, 6, 10, 14]
    assert lungs.slice_position_mm.tolist() == [k * SPACING for k in (4, 7, 11, 15)]
    assert (chest.plane == "axial").all() and chest.position.notna().all()
    for row in chest.itertuples():
        png = np.asarray(Image.open(shard["out"] / row.file_name))
        k = round(row.slice_position_mm / SPACING)
        if row.window == "lung":
            assert png[WATER] == lung(k)  # HU exact: no slice shifted by 1024
    assert len(chest) == 8 and chest.SOPInstanceUID.nunique() == 4


def test_every_odd_file_is_rejected_with_its_reason(shard):
    rej = shard["rejected"]
    paths = shard["files"]["chest"]
    chest = rej[rej.SeriesInstanceUID == shard["uid"]].set_index("file")
    assert dict(chest.category) == {
        paths[2].name: "rescale",
        paths[17].name: "no_geometry",
        "copy-of-5.dcm": "duplicate",
        "stray.dcm": "other_series",
        "huge.dcm": "frame_size",
        paths[8].name: "undecodable",
    }
    assert chest.loc[paths[2].name, "reason"] == (
        f"{paths[2].name}: RescaleIntercept 'NaN' is not a number"
    )
    assert chest.loc["stray.dcm", "reason"] == (
        f"stray.dcm: belongs to series 1.2.7.99, not {shard['uid']}"
    )
    assert chest.loc[paths[8].name, "slice_index"] == 7
    for reason in rej.reason:
        assert "np.float64" not in reason and "force=True" not in reason
        assert "Traceback" not in reason and "error:" not in reason


def test_rt_objects_are_not_image_series(shard):
    rej = shard["rejected"]
    series = rej[rej.file.isna()].set_index("SeriesInstanceUID")
    dose = rej[rej.file == "dose.dcm"].SeriesInstanceUID.iloc[0]
    assert series.loc[dose, "reason"] == (
        "not an image series (RT Dose Storage is not an image storage class the cohort selects)"
    )
    assert series.loc["1.2.7.3", "reason"] == (
        "not an image series (RT Image Storage is not an image storage class the cohort selects)"
    )
    assert not shard["records"].SeriesInstanceUID.isin([dose, "1.2.7.3"]).any()


def test_radiographs_per_file_photometric_and_physical_aspect(shard):
    rec = shard["records"]
    cr = rec[rec.SeriesInstanceUID == "1.2.7.5"].sort_values("slice_index")
    a, b = (np.asarray(Image.open(shard["out"] / f)).astype(int) for f in cr.file_name)
    # 16 rows of 1 mm x 32 columns of 0.25 mm = 16 x 8 mm: portrait, 32 x 16 px, padded
    for png in (a, b):
        assert (png[:, :8] == 0).all() and (png[:, 24:] == 0).all()
    assert (cr.resize == "fit").all()
    row_a, row_b = a[SIZE // 2, 8:24], b[SIZE // 2, 8:24]
    assert np.all(np.diff(row_a) >= 0) and row_a[-1] - row_a[0] > 200  # MONOCHROME2: dark->bright
    assert np.all(np.diff(row_b) <= 0) and row_b[0] - row_b[-1] > 200  # MONOCHROME1: inverted
    assert np.abs(row_a + row_b - 255).max() <= 1


def test_no_caption_is_empty(shard):
    assert len(shard["records"]) == 10
    assert (shard["records"].text.str.strip().str.len() > 0).all()


def _ct_shard(tmp_path, n=6):
    dicom = tmp_path / "dicom"
    uid, paths = write_volume(dicom / "1.2.6", ct_phantom(n, SIZE), series_uid="1.2.6")
    rows = pd.DataFrame([cohort_row(uid, "CT", "CHEST")])
    return rows, {"series": [ok(uid)]}, dicom, paths


def test_zero_pixel_spacing_with_field_of_view_is_rejected_not_blank(tmp_path):
    rows, report, dicom, paths = _ct_shard(tmp_path)
    replace_bytes(paths[3], b"0.7\\0.7", b"0\\0")
    settings = prepare_settings(
        resolution=SIZE, slices_per_series=6, slice_band=[0, 1], field_of_view_mm=44.8
    )
    records, rejected = prepare_shard(rows, report, dicom, tmp_path / "out", settings, 0)
    assert rejected.category.tolist() == ["pixel_spacing"]
    assert rejected.reason.iloc[0] == (
        f"{paths[3].name}: PixelSpacing '0\\0' is not two positive numbers "
        "(field_of_view_mm needs the pixel size)"
    )
    assert sorted(set(records.slice_position_mm)) == [k * SPACING for k in (0, 1, 2, 4, 5)]
    assert (records.resize == "field_of_view").all()
    for name in records.file_name:
        image = np.asarray(Image.open(tmp_path / "out" / name))
        assert not image[:8].any() and image[8:24, 8:24].std() > 10  # 16-px content, centred
    # without a field of view the slice is fitted like the others (square pixels assumed)
    fitted, none = prepare_shard(
        rows, report, dicom, tmp_path / "fit", {**settings, "field_of_view_mm": None}, 0
    )
    assert none.empty and len(fitted) == 12 and (fitted.resize == "fit").all()


def _empty_shard(rows, report, dicom, out, settings) -> pd.DataFrame:
    """prepare_shard on a shard that yields no image: it stops, writing only the rejections."""
    with pytest.raises(ValueError, match="shard 0: 0 images from the cohort's 1 series"):
        prepare_shard(rows, report, dicom, out, settings, 0)
    assert not (out / "records.parquet").exists()
    return pd.read_parquet(out / "rejected.parquet")


def test_empty_caption_is_rejected_never_written(tmp_path):
    rows, report, dicom, _ = _ct_shard(tmp_path, n=2)
    settings = prepare_settings(resolution=SIZE, slices_per_series=2, slice_band=[0, 1])
    settings["caption"] = {"separator": ", ", "parts": [["{view} view"]]}  # no CT has a view
    rejected = _empty_shard(rows, report, dicom, tmp_path / "out", settings)
    assert not list((tmp_path / "out" / "images").iterdir())
    assert rejected.category.tolist() == ["empty_caption"] * 4 + ["series"]
    assert "empty caption" in rejected.reason.iloc[0]


def test_replacement_slices_stay_in_their_sub_band():
    candidates = band_candidates(18, 4, (0.1, 0.9))
    assert sorted(candidates) == select_indices(18, 4, (0.1, 0.9)) == [3, 7, 10, 14]
    assert candidates == {3: [4, 2, 5], 7: [6, 8], 10: [11, 9], 14: [13, 15, 12]}
    assert band_candidates(3, 8) == {0: [], 1: [], 2: []}
    fractions = np.linspace(0, 1, 11)
    assert nearest_candidates(fractions, [0.0, 0.5]) == {0: [1, 2], 5: [4, 6, 3, 7, 8, 9, 10]}


def test_radiograph_windows_are_read_per_file(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 16).astype(np.uint16), (16, 1))
    folder = tmp_path / "dicom" / "1.2.8"
    for name, number, center, width in [("a.dcm", 1, 2048.0, 4096.0), ("b.dcm", 2, 1024.0, 2048.0)]:
        write_radiograph(
            folder / name,
            ramp,
            center=center,
            width=width,
            photometric="MONOCHROME2",
            instance_number=number,
            series_uid="1.2.8",
        )
    rows = pd.DataFrame([cohort_row("1.2.8", "DX", "CHEST")])
    settings = prepare_settings(resolution=16, slices_per_series=2)
    records, _ = prepare_shard(
        rows, {"series": [ok("1.2.8")]}, tmp_path / "dicom", tmp_path / "out", settings, 0
    )
    assert records.sort_values("slice_index").window_center.tolist() == [2048.0, 1024.0]
    a, b = (np.asarray(Image.open(tmp_path / "out" / f)) for f in records.file_name)
    assert b[8, 8] == 255 and a[8, 8] < 200  # stored 2048..4095 saturate b's narrower window


def test_frame_size_limit_is_configured_under_prepare(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    schema = yaml.safe_load((repo / "config" / "schema.yaml").read_text())
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    default = schema["properties"]["prepare"]["properties"]["max_frame_pixels"]["default"]
    assert default == config["prepare"]["max_frame_pixels"] == MAX_FRAME_PIXELS > 4096 * 4096
    rows, report, dicom, _ = _ct_shard(tmp_path, n=2)
    settings = prepare_settings(resolution=SIZE, max_frame_pixels=SIZE * SIZE - 1)
    rejected = _empty_shard(rows, report, dicom, tmp_path / "out", settings)
    assert rejected.category.tolist() == ["frame_size", "frame_size", "series"]


def test_merge_refuses_a_shard_with_an_empty_caption(tmp_path):
    rows, report, dicom, _ = _ct_shard(tmp_path, n=2)
    shard_dir = tmp_path / "shard-0"
    settings = prepare_settings(resolution=SIZE, slices_per_series=1)
    records, _ = prepare_shard(rows, report, dicom, shard_dir, settings, 0)
    build_imagefolder([shard_dir], tmp_path / "ok", [])  # a prepared shard merges
    records.assign(text="").to_parquet(shard_dir / "records.parquet", index=False)
    with pytest.raises(ValueError, match="has an empty caption; rerun prepare"):
        build_imagefolder([shard_dir], tmp_path / "merged", [])
