"""Reading, validating and sorting series folders (generated and pydicom's bundled files)."""

import shutil

import numpy as np
import pytest
from dicom_factory import (
    AXIAL,
    CORONAL,
    SAGITTAL,
    ct_phantom,
    make_dataset,
    save,
    strip_pixels,
    truncate,
    write_radiograph,
    write_volume,
)
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from idc_diffusion.prepare.geometry import plane_name
from idc_diffusion.prepare.series import load_slices, read_series, scan_series

SIZE = 32
WATER = (SIZE // 2, SIZE // 4)  # inside the disc, outside the bone square: HU == slice number


def water(volume):
    return volume.volume[:, WATER[0], WATER[1]].tolist()


def test_sorted_by_position_not_file_name(tmp_path):
    order = [3, 0, 4, 1, 2]  # file IMG0000 holds slice 3, ...
    uid, _ = write_volume(tmp_path, ct_phantom(5, SIZE), file_order=order, spacing=2.5)
    vol = read_series(tmp_path)
    assert vol.volume.shape == (5, SIZE, SIZE)
    assert water(vol) == [0, 1, 2, 3, 4]
    assert np.allclose(np.diff(vol.positions_mm), 2.5)
    assert vol.files == [f"IMG{order.index(k):04d}.dcm" for k in range(5)]
    assert vol.plane == "axial" and vol.header["SeriesInstanceUID"] == uid
    assert vol.volume[0, SIZE // 2, SIZE // 2] == 700.0  # bone, modality LUT applied
    assert vol.volume[0, 0, 0] == -1000.0 and vol.volume.dtype == np.float32


def test_reversed_stack(tmp_path):
    # slice k at z = -2.5 k: ascending position along +z is k = 4, 3, ..., 0
    write_volume(tmp_path, ct_phantom(5, SIZE), spacing=-2.5)
    vol = read_series(tmp_path)
    assert water(vol) == [4, 3, 2, 1, 0]
    assert np.all(np.diff(vol.positions_mm) > 0)


@pytest.mark.parametrize(("degrees", "plane"), [(30, "axial"), (45, "oblique")])
def test_oblique_stack(tmp_path, degrees, plane):
    a = np.radians(degrees)
    orientation = (1.0, 0.0, 0.0, 0.0, np.cos(a), -np.sin(a))
    write_volume(
        tmp_path, ct_phantom(6, SIZE), orientation=orientation, file_order=[5, 2, 0, 4, 1, 3]
    )
    vol = read_series(tmp_path)
    assert water(vol) == [0, 1, 2, 3, 4, 5]
    assert np.allclose(np.diff(vol.positions_mm), 2.5)
    assert vol.plane == plane


def test_plane_names():
    assert plane_name(AXIAL) == "axial"
    assert plane_name(CORONAL) == "coronal"
    assert plane_name(SAGITTAL) == "sagittal"
    assert plane_name(None) is None


def test_slope_intercept(tmp_path):
    stored = np.full((2, 8, 8), 512, dtype=np.uint16)
    write_volume(tmp_path, stored, slope=2.0, intercept=-1024.0)
    assert np.all(read_series(tmp_path).volume == 0.0)


def test_bad_files_are_rejected_by_name_and_the_rest_kept(tmp_path):
    _, paths = write_volume(tmp_path, ct_phantom(6, SIZE))
    truncate(paths[1])
    strip_pixels(paths[2])
    (tmp_path / "notes.txt").write_text("not dicom")
    odd = make_dataset(np.zeros((16, 16), np.int16), "CT", "1.2.3", "1.2.4", slope=1, intercept=0)
    save(odd, tmp_path / "small.dcm")
    vol = read_series(tmp_path)
    assert water(vol) == [0, 3, 4, 5]
    reasons = {r.file: r.reason for r in vol.rejected}
    assert set(reasons) == {paths[1].name, paths[2].name, "notes.txt", "small.dcm"}
    assert "truncated" in reasons[paths[1].name] and paths[1].name in reasons[paths[1].name]
    assert "no PixelData" in reasons[paths[2].name]
    assert (
        reasons["small.dcm"] == "small.dcm: matrix size 16 x 16 differs from the majority 32 x 32"
    )
    assert reasons["notes.txt"] == (
        "notes.txt: not a DICOM file (no 128-byte preamble and 'DICM' prefix)"
    )


def test_undecodable_pixel_data_rejected_at_load(tmp_path):
    write_volume(tmp_path, ct_phantom(3, SIZE))
    ds = make_dataset(np.zeros((SIZE, SIZE), np.int16), "CT", "1.2.3", "1.2.4", slope=1)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\x00garbage" * 16])
    ds.ImageOrientationPatient = list(AXIAL)
    ds.ImagePositionPatient = [0.0, 0.0, 100.0]
    save(ds, tmp_path / "broken.dcm")
    scan = scan_series(tmp_path)
    assert len(scan.slices) == 4 and not scan.rejected  # header is fine
    vol = load_slices(scan)
    assert vol.slice_indices == [0, 1, 2]
    assert [r.file for r in vol.rejected] == ["broken.dcm"]
    assert "undecodable" in vol.rejected[0].reason


def test_radiographs_ordered_by_instance_number(tmp_path):
    for name, number, value in [("a.dcm", 3, 30), ("b.dcm", 1, 10), ("c.dcm", 2, 20)]:
        stored = np.full((8, 6), value, np.uint16)
        write_radiograph(tmp_path / name, stored, instance_number=number, series_uid="1.2.3")
    vol = read_series(tmp_path)
    assert vol.volume[:, 0, 0].tolist() == [10, 20, 30]
    assert vol.files == ["b.dcm", "c.dcm", "a.dcm"]
    assert vol.plane is None and np.all(np.isnan(vol.positions_mm))
    assert (vol.headers[0].window_center, vol.headers[0].window_width) == (2048.0, 4096.0)
    assert vol.headers[0].photometric == "MONOCHROME1" and vol.header["ViewPosition"] == "PA"


def test_empty_folder(tmp_path):
    vol = read_series(tmp_path)
    assert vol.volume.shape[0] == 0 and vol.rejected == []


BUNDLED = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "examples_overlay.dcm",
]


@pytest.mark.parametrize("name", BUNDLED)
def test_pydicom_bundled_images(tmp_path, name):
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available offline")
    shutil.copy(path, tmp_path / name)
    vol = read_series(tmp_path)
    assert vol.rejected == []
    assert vol.volume.ndim == 3 and vol.volume.shape[0] == 1
    assert vol.volume.shape[1] >= 64 and vol.volume.shape[2] >= 64
    assert np.all(np.isfinite(vol.volume)) and vol.volume.std() > 0
    assert vol.plane in {"axial", "coronal", "sagittal", "oblique"}
    if vol.header["Modality"] == "CT":
        rows, cols = vol.volume.shape[1:]
        centre = vol.volume[0, rows // 2 - 8 : rows // 2 + 8, cols // 2 - 8 : cols // 2 + 8]
        assert -1100 <= np.median(centre) <= 3000  # HU, not stored values
        assert vol.volume.min() >= -10000 and vol.volume.max() <= 30000


def test_pydicom_mr_variants_decode_identically(tmp_path):
    volumes = []
    for name in ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm"]:
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(get_testdata_file(name), folder / name)
        volumes.append(read_series(folder).volume)
    assert np.array_equal(volumes[0], volumes[1]) and np.array_equal(volumes[0], volumes[2])


def test_pydicom_truncated_mr_is_rejected(tmp_path):
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "MR_truncated.dcm")
    vol = read_series(tmp_path)
    assert vol.volume.shape[0] == 0
    assert [r.file for r in vol.rejected] == ["MR_truncated.dcm"]
    assert "truncated" in vol.rejected[0].reason
