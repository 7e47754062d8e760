"""DICOM Secondary Capture export: required modules, synthetic markings, UIDs, dciodvfy."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from idc_diffusion.sample.dicom_export import (
    RunInfo,
    read_generation_parameters,
    secondary_capture,
    to_grayscale,
    write_secondary_capture,
)

PROMPT = "CT of the chest, axial slice, lung window, female, 60-69 years, with a long tail"

# Attributes of the SC IOD's mandatory modules (PS3.3 A.8.1): type 1 need a value, type 2
# must be present (may be empty).
REQUIRED = {
    "Patient": {1: [], 2: ["PatientName", "PatientID", "PatientBirthDate", "PatientSex"]},
    "General Study": {
        1: ["StudyInstanceUID"],
        2: ["StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"],
    },
    "General Series": {1: ["Modality", "SeriesInstanceUID"], 2: ["SeriesNumber"]},
    "SC Equipment": {1: ["ConversionType"], 2: []},
    "General Image": {1: [], 2: ["InstanceNumber", "PatientOrientation"]},
    "Image Pixel": {
        1: [
            "SamplesPerPixel",
            "PhotometricInterpretation",
            "Rows",
            "Columns",
            "BitsAllocated",
            "BitsStored",
            "HighBit",
            "PixelRepresentation",
            "PixelData",
        ],
        2: [],
    },
    "SOP Common": {1: ["SOPClassUID", "SOPInstanceUID"], 2: []},
}


def run_info(**overrides: object) -> RunInfo:
    base = {
        "run_name": "unit-test",
        "model_id": "results/model",
        "model_sha256": "ab" * 32,
        "scheduler": "dpmsolver++",
        "num_inference_steps": 12,
        "guidance_scale": 4.0,
        "negative_prompt": "blurry",
        "created": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    }
    return RunInfo(**{**base, **overrides})


def rgb_image(seed: int = 0, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture()
def written(tmp_path: Path) -> tuple[Path, np.ndarray]:
    image = rgb_image()
    ds = secondary_capture(
        image, run_info(), prompt=PROMPT, prompt_index=2, seed=987654321012, instance_number=3
    )
    return write_secondary_capture(ds, tmp_path / "dicom" / "p0002" / "x.dcm"), image


def test_required_modules_and_synthetic_markings(written: tuple[Path, np.ndarray]) -> None:
    path, image = written
    ds = pydicom.dcmread(path)
    assert ds.preamble is not None and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    for module, types in REQUIRED.items():
        for name in types[1]:
            assert name in ds and ds[name].value not in (None, ""), (module, name)
        for name in types[2]:
            assert name in ds, (module, name)
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert str(ds.PatientName) == "SYNTHETIC^unit-test"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.BurnedInAnnotation == "NO" and ds.ConversionType == "SYN"
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
    assert (ds.SeriesNumber, ds.InstanceNumber) == (3, 3)
    assert ds.SeriesDescription == PROMPT[:64].rstrip()
    assert "SYNTHETIC" in ds.ImageComments and f"prompt={PROMPT};" in ds.ImageComments
    np.testing.assert_array_equal(ds.pixel_array, to_grayscale(image))


def test_generation_parameters_round_trip(written: tuple[Path, np.ndarray]) -> None:
    params = read_generation_parameters(pydicom.dcmread(written[0]))
    assert params == {
        "prompt": PROMPT,
        "negative_prompt": "blurry",
        "seed": "987654321012",
        "scheduler": "dpmsolver++",
        "num_inference_steps": "12",
        "guidance_scale": "4",
        "model_id": "results/model",
        "model_sha256": "ab" * 32,
    }


def test_uids_group_by_prompt_and_follow_settings() -> None:
    def uids(run: RunInfo, prompt: str, seed: int) -> tuple[str, str, str]:
        ds = secondary_capture(
            rgb_image(), run, prompt=prompt, prompt_index=0, seed=seed, instance_number=1
        )
        return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID

    run = run_info()
    a, b, c = uids(run, "a", 1), uids(run, "a", 2), uids(run, "b", 1)
    assert a[0] == b[0] == c[0]  # one study per run
    assert a[1] == b[1] != c[1]  # one series per prompt
    assert len({a[2], b[2], c[2]}) == 3
    assert uids(run, "a", 1) == a  # regenerating the same image gives the same UIDs
    other = uids(run_info(guidance_scale=2.5), "a", 1)
    assert not set(other) & set(a)  # any settings change gives new UIDs
    assert all(len(u) <= 64 and u.replace(".", "").isdigit() for u in a)


def test_grayscale_is_the_channel_mean() -> None:
    image = np.array([[[0, 0, 3], [255, 255, 255], [10, 20, 31]]], dtype=np.uint8)
    np.testing.assert_array_equal(to_grayscale(image), [[1, 255, 20]])
    assert to_grayscale(image[..., 0]).dtype == np.uint8


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_dciodvfy_finds_no_errors(written: tuple[Path, np.ndarray]) -> None:
    result = subprocess.run(
        ["dciodvfy", str(written[0])], capture_output=True, text=True, check=False
    )
    report = result.stdout + result.stderr
    assert "SCImage" in report  # it recognised the IOD
    assert result.returncode == 0
    assert not [line for line in report.splitlines() if line.startswith("Error")], report
