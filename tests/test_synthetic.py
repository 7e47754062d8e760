"""Synthetic phantom series: counts, metadata, plausible values, determinism, file order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from idc_diffusion.download.phantom import region_of
from idc_diffusion.download.synthetic import SYNTHETIC_LABEL, write_synthetic_series


def make_row(**overrides) -> dict:
    row = {
        "collection_id": "nlst",
        "PatientID": "100002",
        "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1",
        "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.1.1",
        "Modality": "CT",
        "BodyPartExamined": "CHEST",
        "SeriesDescription": "0,OPA,GE,HSQX,STANDARD,310,2.5,120,40,0.1,1.5",
        "PatientAge": "065Y",
        "PatientSex": "F",
        "StudyDate": "19990102",
        "instanceCount": 12,
    }
    row.update(overrides)
    return row


def read(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]


def hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def patch(image: np.ndarray, ds: pydicom.Dataset, x_mm: float, y_mm: float, r: int = 2):
    """Pixels around patient coordinates (x, y) in mm, using the slice's geometry."""
    x0, y0, _ = (float(v) for v in ds.ImagePositionPatient)
    dy, dx = (float(v) for v in ds.PixelSpacing)
    col, row = round((x_mm - x0) / dx), round((y_mm - y0) / dy)
    return image[max(row - r, 0) : row + r + 1, max(col - r, 0) : col + r + 1]


def middle_slice(datasets: list[pydicom.Dataset]) -> pydicom.Dataset:
    ordered = sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    return ordered[len(ordered) // 2]


@pytest.fixture(scope="module")
def chest_ct(tmp_path_factory) -> list[Path]:
    return write_synthetic_series(make_row(), tmp_path_factory.mktemp("ct"), matrix=96, seed=0)


def test_file_count_and_metadata(chest_ct):
    row = make_row()
    assert len(chest_ct) == row["instanceCount"]
    assert len({p.name for p in chest_ct}) == row["instanceCount"]
    for ds in read(chest_ct):
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for key in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                    "BodyPartExamined", "SeriesDescription", "PatientAge", "PatientSex",
                    "StudyDate"):  # fmt: skip
            assert str(ds[key].value) == row[key], key
        assert ds.ImageComments == SYNTHETIC_LABEL
        assert ds.DerivationDescription == SYNTHETIC_LABEL
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.RescaleSlope == 1 and ds.RescaleIntercept == -1024
        assert list(ds.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
    assert len({ds.SOPInstanceUID for ds in read(chest_ct)}) == len(chest_ct)


def test_chest_ct_hounsfield_units(chest_ct):
    ds = middle_slice(read(chest_ct))
    image = hu(ds)
    assert ds.pixel_array.dtype == np.int16
    assert np.median(patch(image, ds, -170, -170)) < -950  # air in the corner
    assert -950 < np.median(patch(image, ds, -70, -10, r=3)) < -700  # right lung
    assert -950 < np.median(patch(image, ds, 70, -10, r=3)) < -700  # left lung
    assert 650 < image.max() < 1200  # cortical bone (spine, ribs)
    body = image > -500
    assert -60 < np.median(image[body]) < 120  # mostly soft tissue


def test_head_ct_skull_and_brain(tmp_path):
    row = make_row(BodyPartExamined="HEAD", SeriesDescription="HEAD STD", instanceCount=8)
    ds = middle_slice(read(write_synthetic_series(row, tmp_path, matrix=96)))
    image = hu(ds)
    assert float(ds.PixelSpacing[0]) * 96 == pytest.approx(230)
    assert 800 < image.max() < 1200  # skull
    assert 0 < np.median(patch(image, ds, 0, 50, r=2)) < 70  # brain parenchyma


def test_mr_is_unsigned_without_rescale(tmp_path):
    row = make_row(Modality="MR", BodyPartExamined="BRAIN", instanceCount=6)
    ds = middle_slice(read(write_synthetic_series(row, tmp_path, matrix=64)))
    assert ds.PixelRepresentation == 0 and ds.BitsStored == 12
    assert "RescaleIntercept" not in ds
    image = ds.pixel_array.astype(float)
    assert image.max() < 4096
    white = np.median(patch(image, ds, 0, 50, r=1))
    assert white > 3 * np.median(patch(image, ds, -110, -110))  # tissue brighter than air


def test_cr_radiograph_monochrome1(tmp_path):
    row = make_row(Modality="CR", instanceCount=2, SeriesDescription="CHEST PA")
    datasets = read(write_synthetic_series(row, tmp_path, matrix=64))
    assert len(datasets) == 2
    for ds in datasets:
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        assert ds.ViewPosition == "PA"
        assert "WindowCenter" in ds and "WindowWidth" in ds
        assert ds.Rows == ds.Columns == 128 and ds.BitsStored == 12
        image = ds.pixel_array.astype(float)
        assert image.max() <= 4095
        lung = np.median(image[50:70, 30:45])  # right lung field (image left)
        mediastinum = np.median(image[50:70, 60:68])
        assert lung > mediastinum + 300  # MONOCHROME1: less attenuation -> higher value


def test_dx_radiograph_monochrome2(tmp_path):
    row = make_row(Modality="DX", instanceCount=1)
    (ds,) = read(write_synthetic_series(row, tmp_path, matrix=32))
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"


def test_deterministic_given_seed(tmp_path):
    row = make_row(instanceCount=4)
    first = write_synthetic_series(row, tmp_path / "a", matrix=32, seed=7)
    again = write_synthetic_series(row, tmp_path / "b", matrix=32, seed=7)
    other = write_synthetic_series(row, tmp_path / "c", matrix=32, seed=8)
    assert [p.name for p in first] == [p.name for p in again]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    pixels = [ds.PixelData for ds in read(first)]
    assert pixels != [ds.PixelData for ds in read(other)]


def test_file_names_not_in_slice_order(chest_ct):
    by_name = [ds.InstanceNumber for ds in read(sorted(chest_ct))]
    assert by_name != sorted(by_name)
    by_position = sorted(read(chest_ct), key=lambda d: float(d.ImagePositionPatient[2]))
    assert [ds.InstanceNumber for ds in by_position] == list(range(1, len(chest_ct) + 1))


def test_missing_metadata_is_tolerated(tmp_path):
    row = make_row(PatientAge=None, PatientSex=float("nan"), BodyPartExamined=None,
                   StudyDate=None, instanceCount=2)  # fmt: skip
    (ds, _) = read(write_synthetic_series(row, tmp_path, matrix=32))
    assert "PatientAge" not in ds and "BodyPartExamined" not in ds


def test_region_mapping():
    assert region_of("CHEST") == "chest"
    assert region_of(None, "MR BRAIN T1") == "head"
    assert region_of("ABDOMEN") == "abdomen"
    assert region_of("KNEE") == "generic"
