"""Enhanced multi-frame series, rejection reasons and pydicom's whole bundled test set."""

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from dicom_factory import (
    AXIAL,
    ct_phantom,
    make_dataset,
    save,
    write_enhanced,
    write_volume,
)
from pydicom.dataset import Dataset

from idc_diffusion.prepare.frames import open_dataset, read_frames
from idc_diffusion.prepare.series import decode_frame, load_slices, read_series, scan_series
from idc_diffusion.prepare.slice_header import SliceError

SIZE = 16
BUNDLED_DIR = Path(pydicom.data.__file__).parent / "test_files"  # offline, no downloads


def test_enhanced_ct_frames_sorted_by_per_frame_position_with_per_frame_rescale(tmp_path):
    stored = ct_phantom(4, SIZE)  # water of frame k = k HU with slope 1
    z = [30.0, 10.0, 40.0, 20.0]  # frame order disagrees with anatomy
    write_enhanced(tmp_path / "enh.dcm", stored, z, slopes=[1, 1, 1, 1])
    scan = scan_series(tmp_path)
    assert [s.frame for s in scan.slices] == [1, 3, 0, 2]
    assert scan.positions_mm.tolist() == [10.0, 20.0, 30.0, 40.0]
    assert scan.plane == "axial" and scan.slices[0].pixel_spacing == (0.5, 0.5)
    vol = load_slices(scan)
    assert vol.volume[:, SIZE // 2, 1].tolist() == [-1000.0] * 4  # air corner
    assert vol.volume[:, SIZE // 2, SIZE // 4].tolist() == [1.0, 3.0, 0.0, 2.0]
    assert vol.files == ["enh.dcm:frame2", "enh.dcm:frame4", "enh.dcm:frame1", "enh.dcm:frame3"]


def test_enhanced_per_frame_slope_and_localizer_frames(tmp_path):
    stored = np.full((3, SIZE, SIZE), 1100, np.int16)
    write_enhanced(
        tmp_path / "enh.dcm",
        stored,
        [0.0, 5.0, 10.0],
        slopes=[1.0, 2.0, 1.0],
        frame_types=["AXIAL", "AXIAL", "LOCALIZER"],
    )
    scan = scan_series(tmp_path)
    assert [r.category for r in scan.rejected] == ["localizer"]
    assert "enh.dcm:frame3" in scan.rejected[0].reason
    vol = load_slices(scan)
    assert vol.volume[:, 0, 0].tolist() == [1100 - 1024, 2 * 1100 - 1024]


def test_localizer_files_skipped(tmp_path):
    write_volume(
        tmp_path, ct_phantom(3, SIZE), extra={"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}
    )
    scout = make_dataset(np.zeros((SIZE, SIZE), np.int16), "CT", "1.2", "1.3", slope=1)
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    save(scout, tmp_path / "scout.dcm")
    scan = scan_series(tmp_path)
    assert len(scan.slices) == 3
    assert [(r.file, r.category) for r in scan.rejected] == [("scout.dcm", "localizer")]


@pytest.mark.parametrize(
    ("slope", "intercept", "category", "text"),
    [
        (0.0, -1024.0, "rescale", "RescaleSlope is 0"),
        (None, None, "rescale", "HU unknown"),
    ],
)
def test_bad_rescale_rejected(tmp_path, slope, intercept, category, text):
    ds = make_dataset(np.zeros((SIZE, SIZE), np.int16), "CT", "1.2", "1.3", slope=slope)
    if slope is None and intercept is not None:
        ds.RescaleIntercept = intercept
    save(ds, tmp_path / "bad.dcm")
    with pytest.raises(SliceError, match=text) as info:
        read_frames(tmp_path / "bad.dcm")
    assert info.value.category == category


def test_intercept_without_slope_rejected(tmp_path):
    ds = make_dataset(np.zeros((SIZE, SIZE), np.int16), "MR", "1.2", "1.3")
    ds.RescaleIntercept = -5
    save(ds, tmp_path / "bad.dcm")
    with pytest.raises(SliceError, match="RescaleIntercept without RescaleSlope"):
        read_frames(tmp_path / "bad.dcm")


def test_rgb_is_rejected_as_unsupported_photometric(tmp_path):
    ds = make_dataset(np.zeros((SIZE, SIZE), np.uint16), "MR", "1.2", "1.3")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    save(ds, tmp_path / "pal.dcm")
    vol = read_series(tmp_path)
    assert vol.volume.shape[0] == 0
    assert vol.rejected[0].category == "photometric"
    assert "PALETTE COLOR" in vol.rejected[0].reason


def test_modality_lut_sequence_replaces_rescale(tmp_path):
    ds = make_dataset(np.array([[0, 1], [2, 9]], np.uint16), "MR", "1.2", "1.3")
    item = Dataset()
    item.LUTDescriptor = [3, 0, 16]
    item.LUTData = np.array([100, 200, 300], "<u2").tobytes()  # OW, as files store it
    ds.ModalityLUTSequence = [item]
    save(ds, tmp_path / "lut.dcm")
    vol = read_series(tmp_path)
    assert vol.volume[0].tolist() == [[100.0, 200.0], [300.0, 300.0]]


def test_12_bit_signed_data(tmp_path):
    stored = np.array([[-2048, -1], [0, 2047]], np.int16)
    ds = make_dataset(stored, "CT", "1.2", "1.3", slope=1, intercept=0)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = (stored.astype("<i2").view("<u2") & 0x0FFF).astype("<u2").tobytes()
    ds.ImageOrientationPatient, ds.ImagePositionPatient = list(AXIAL), [0, 0, 0]
    save(ds, tmp_path / "b12.dcm")
    assert read_series(tmp_path).volume[0].tolist() == [[-2048, -1], [0, 2047]]


# pydicom's bundled files that cannot be decoded, and why (they are broken on purpose or
# need a decoder the JPEG plugins lack): each must be rejected with a reason, never crash.
BROKEN = {
    "JPEG-lossy.dcm": "undecodable",  # misplaced marker segment (libjpeg error -1038)
    "JPEG2000-embedded-sequence-delimiter.dcm": "frame_size",  # SIZ says 3722445056 columns
    "MR_truncated.dcm": "truncated",
    "badVR.dcm": "invalid_header",  # NumberOfFrames '1A'
    "meta_missing_tsyntax.dcm": "invalid_header",
    "nested_priv_SQ.dcm": "invalid_header",
}


def _image_files() -> list[Path]:
    out = []
    for name in sorted(p for p in BUNDLED_DIR.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(name, defer_size="1 KB")
        except Exception:  # not a DICOM file (json, dumps, icc, ...)
            continue
        if "PixelData" in ds:
            out.append(Path(name))
    return out


def test_every_bundled_image_decodes_or_is_rejected_with_a_reason():
    files = _image_files()
    assert len(files) >= 60
    outcome = {}
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = open_dataset(path)
                try:
                    headers, _, _ = read_frames(path)
                except SliceError as exc:
                    if exc.category != "photometric":
                        raise
                    # colour: decodes, but is not used; check the decoder anyway
                    pixels = pydicom.pixels.pixel_array(ds, index=0)
                    outcome[path.name] = ("colour", pixels.shape)
                    continue
                for header in headers[:2]:
                    frame = decode_frame(ds, header)
                    assert frame.shape == (header.rows, header.cols)
                outcome[path.name] = ("ok", len(headers))
            except SliceError as exc:
                assert path.name in str(exc)
                outcome[path.name] = (exc.category, str(exc))
    failed = {
        name: result[0]
        for name, result in outcome.items()
        if result[0] not in {"ok", "colour", "localizer"}
    }
    assert failed == BROKEN
    assert outcome["rtdose_rle.dcm"] == ("ok", 15)  # multi-frame RLE
    assert outcome["JPGExtended.dcm"] == ("ok", 1)  # JPEG extended (12-bit)
    assert outcome["SC_rgb_rle.dcm"][0] == "colour"
    assert outcome["image_dfl.dcm"] == ("ok", 1)  # deflated
    assert outcome["MR_small_bigendian.dcm"] == ("ok", 1)
    assert sum(result[0] == "localizer" for result in outcome.values()) == 2  # dicomdir CT scouts
