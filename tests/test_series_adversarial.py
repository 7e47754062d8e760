"""Adversarial files as scanners and archives produce them: each is rejected with a plain
reason before anything is decoded, and the rest of the series keeps its geometry and HU."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import (
    AXIAL,
    ct_phantom,
    make_dataset,
    replace_bytes,
    rewrite,
    save,
    write_j2k,
    write_radiograph,
    write_volume,
)
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless

from idc_diffusion.prepare.frames import read_frames
from idc_diffusion.prepare.pixel_data import codestream_size
from idc_diffusion.prepare.series import load_slices, read_series, scan_series
from idc_diffusion.prepare.shard import ALL_IMAGE_SOP_CLASSES
from idc_diffusion.prepare.slice_header import ScanRules, SliceError

SIZE = 32
WATER = (SIZE // 2, SIZE // 4)  # water disc outside the bone square: HU == slice number
IMAGES = ScanRules(sop_classes=ALL_IMAGE_SOP_CLASSES)


def water(volume):
    return volume.volume[:, WATER[0], WATER[1]].tolist()


def reasons(rejected):
    return {r.file: (r.category, r.reason) for r in rejected}


@pytest.mark.parametrize("value", [b"abc", b"NaN", b""])
def test_intercept_that_is_not_a_number_rejects_the_file_not_a_1024_hu_shift(tmp_path, value):
    _, paths = write_volume(tmp_path, ct_phantom(4, SIZE))  # RescaleIntercept "-1024.0"
    replace_bytes(paths[2], b"-1024.0", value)
    vol = read_series(tmp_path)
    assert water(vol) == [0, 1, 3]  # HU, no slice shifted by 1024
    shown = value.decode()
    assert reasons(vol.rejected) == {
        paths[2].name: ("rescale", f"{paths[2].name}: RescaleIntercept '{shown}' is not a number")
    }


def test_slope_that_is_not_a_number_is_named_plainly(tmp_path):
    _, paths = write_volume(tmp_path, ct_phantom(2, SIZE), slope=1.5)  # RescaleSlope "1.5"
    replace_bytes(paths[0], b"1.5", b"x")
    vol = read_series(tmp_path)
    assert vol.rejected[0].reason == f"{paths[0].name}: RescaleSlope 'x' is not a number"


def test_file_without_position_is_rejected_and_the_series_keeps_its_geometry(tmp_path):
    _, paths = write_volume(tmp_path, ct_phantom(6, SIZE), file_order=[3, 0, 5, 1, 4, 2])
    rewrite(paths[4], remove=["ImagePositionPatient"])
    scan = scan_series(tmp_path)
    assert scan.plane == "axial" and scan.positions_mm.tolist() == [0, 2.5, 5, 7.5, 12.5]
    assert water(load_slices(scan)) == [0, 1, 2, 3, 5]  # by position, not InstanceNumber
    assert reasons(scan.rejected) == {
        paths[4].name: (
            "no_geometry",
            f"{paths[4].name}: no ImagePositionPatient (the series' other slices have one)",
        )
    }


def test_position_that_is_not_three_numbers_is_rejected(tmp_path):
    _, paths = write_volume(tmp_path, ct_phantom(3, SIZE), origin=(0.0, 0.0, 7.0))
    rewrite(paths[1], ImagePositionPatient=[0.0, 0.0])
    vol = read_series(tmp_path)
    assert water(vol) == [0, 2] and vol.plane == "axial"
    assert reasons(vol.rejected)[paths[1].name] == (
        "position",
        f"{paths[1].name}: ImagePositionPatient '0.0\\0.0' is not 3 numbers",
    )


def test_all_zero_orientation_is_a_specific_rejection_not_a_traceback(tmp_path):
    _, paths = write_volume(tmp_path, ct_phantom(4, SIZE))
    rewrite(paths[0], ImageOrientationPatient=[0.0] * 6)
    rewrite(paths[3], ImageOrientationPatient=[1.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # parallel
    vol = read_series(tmp_path)
    assert water(vol) == [1, 2] and vol.plane == "axial"
    got = reasons(vol.rejected)
    assert got[paths[0].name] == (
        "orientation",
        f"{paths[0].name}: ImageOrientationPatient '0.0\\0.0\\0.0\\0.0\\0.0\\0.0' is not two "
        "valid direction cosines (zero, parallel or not 6 numbers)",
    )
    assert got[paths[3].name][0] == "orientation"


def test_series_with_only_zero_orientations_is_rejected_file_by_file(tmp_path):
    write_volume(tmp_path, ct_phantom(3, SIZE), extra={"ImageOrientationPatient": [0.0] * 6})
    vol = read_series(tmp_path)
    assert vol.volume.shape[0] == 0
    assert [r.category for r in vol.rejected] == ["orientation"] * 3


def test_orientation_minority_reason_is_plain(tmp_path):
    _, paths = write_volume(tmp_path, ct_phantom(3, SIZE))
    rewrite(paths[1], ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    reason = read_series(tmp_path).rejected[0].reason
    assert reason == (
        f"{paths[1].name}: orientation 1\\0\\0\\0\\0\\-1 differs from the majority 1\\0\\0\\0\\1\\0"
    )
    assert "np." not in reason


def test_duplicate_sop_instance_uid_keeps_one_file(tmp_path):
    _, paths = write_volume(tmp_path, ct_phantom(4, SIZE))
    (tmp_path / "sub").mkdir()
    shutil.copy(paths[1], tmp_path / "sub" / "copy.dcm")  # the same instance by another route
    vol = read_series(tmp_path)
    assert water(vol) == [0, 1, 2, 3] and len(set(vol.sop_uids)) == 4
    assert reasons(vol.rejected) == {
        "copy.dcm": ("duplicate", f"copy.dcm: duplicate SOPInstanceUID of {paths[1].name}")
    }


def test_file_of_another_series_is_not_stacked_in(tmp_path):
    uid, _ = write_volume(tmp_path / "mine", ct_phantom(4, SIZE))
    other, other_paths = write_volume(tmp_path / "other", ct_phantom(6, SIZE), origin=(0, 0, 1))
    shutil.copy(other_paths[5], tmp_path / "mine" / "stray.dcm")
    scan = scan_series(tmp_path / "mine", uid)
    assert water(load_slices(scan)) == [0, 1, 2, 3]
    assert reasons(scan.rejected) == {
        "stray.dcm": ("other_series", f"stray.dcm: belongs to series {other}, not {uid}")
    }


def test_non_image_storage_classes_are_not_an_image_series(tmp_path):
    rtdose = get_testdata_file("rtdose.dcm")
    shutil.copy(rtdose, tmp_path / "dose.dcm")
    rt_image = make_dataset(np.zeros((SIZE, SIZE), np.uint16), "CR", "1.2.5", "1.2.6")
    rt_image.SOPClassUID = rt_image.file_meta.MediaStorageSOPClassUID = (
        "1.2.840.10008.5.1.4.1.1.481.1"
    )
    rt_image.Modality = "RTIMAGE"
    save(rt_image, tmp_path / "portal.dcm")
    scan = scan_series(tmp_path, rules=IMAGES)
    assert scan.slices == []
    assert reasons(scan.rejected) == {
        "dose.dcm": (
            "not_image",
            "dose.dcm: not an image series (RT Dose Storage is not an image storage class "
            "the cohort selects)",
        ),
        "portal.dcm": (
            "not_image",
            "portal.dcm: not an image series (RT Image Storage is not an image storage class "
            "the cohort selects)",
        ),
    }
    assert len(scan_series(tmp_path).slices) == 15  # without rules: RT Dose frames are read


def test_colour_reason_is_plain():
    with pytest.raises(SliceError) as info:
        read_frames(Path(get_testdata_file("SC_rgb_rle.dcm")))
    assert str(info.value) == (
        "SC_rgb_rle.dcm: SamplesPerPixel 3 is not supported (only greyscale images are used)"
    )


def test_unreadable_reason_has_no_pydicom_advice(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"\x00" * 10)
    vol = read_series(tmp_path)
    assert "force" not in vol.rejected[0].reason and vol.rejected[0].category == "unreadable"


def test_huge_declared_frame_is_rejected_before_decoding(tmp_path):
    write_volume(tmp_path, ct_phantom(2, SIZE))
    write_j2k(tmp_path / "huge.dcm", ct_phantom(1, SIZE)[0], Rows=60000, Columns=60000)
    scan = scan_series(tmp_path)
    assert len(scan.slices) == 2
    assert reasons(scan.rejected) == {
        "huge.dcm": (
            "frame_size",
            "huge.dcm: Rows x Columns 60000 x 60000 is outside 1..prepare.max_frame_pixels "
            "(67108864 pixels)",
        )
    }
    small = scan_series(tmp_path, rules=ScanRules(max_frame_pixels=SIZE * SIZE - 1))
    assert small.slices == [] and {r.category for r in small.rejected} == {"frame_size"}


def test_header_size_that_disagrees_with_the_codestream_is_rejected(tmp_path):
    write_j2k(tmp_path / "liar.dcm", ct_phantom(1, SIZE)[0], Rows=4000, Columns=4000)
    write_j2k(tmp_path / "honest.dcm", ct_phantom(2, SIZE)[1])
    vol = read_series(tmp_path)
    assert vol.files == ["honest.dcm"] and water(vol) == [1]  # lossless, HU exact
    assert reasons(vol.rejected) == {
        "liar.dcm": (
            "frame_size",
            "liar.dcm: the encoded image is 32 x 32 but Rows x Columns say 4000 x 4000",
        )
    }


def test_codestream_size_of_jpeg_family():
    for name, size in [
        ("MR_small_jp2klossless.dcm", (64, 64)),
        ("MR_small_jpeg_ls_lossless.dcm", (64, 64)),
        ("JPGExtended.dcm", (1024, 256)),
        ("SC_rgb_jpeg_dcmtk.dcm", (100, 100)),
    ]:
        ds = dcmread(get_testdata_file(name))
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        assert codestream_size(frame) == size, name
    assert codestream_size(b"\x00garbage") is None


@pytest.mark.parametrize(
    ("syntax", "problem"),
    [
        ("1.2.840.113619.5.2", "is not a transfer syntax pydicom knows"),  # GE private
        ("1.2.840.10008.1.2.4.110", "private or newer than pydicom"),  # JPEG XL lossless
        ("1.2.840.10008.1.2.4.100", "(MPEG2 Main Profile / Main Level) has no pixel data"),
    ],
)
def test_transfer_syntax_without_decoder_is_rejected_with_its_reason(tmp_path, syntax, problem):
    _, paths = write_volume(tmp_path, ct_phantom(3, SIZE))
    rewrite(paths[1], meta={"TransferSyntaxUID": syntax}, PixelData=encapsulate([b"\0" * 64]))
    vol = read_series(tmp_path)
    assert water(vol) == [0, 2]
    ((file, (category, reason)),) = reasons(vol.rejected).items()
    assert file == paths[1].name and category == "transfer_syntax"
    assert reason.startswith(f"{file}: TransferSyntaxUID {syntax} ") and problem in reason


def test_failed_decode_is_replaced_by_a_fallback(tmp_path):
    _, paths = write_volume(tmp_path, ct_phantom(5, SIZE))
    rewrite(
        paths[2],
        meta={"TransferSyntaxUID": JPEG2000Lossless},
        PixelData=encapsulate([b"\x00garbage" * 16]),
    )
    scan = scan_series(tmp_path)
    assert len(scan.slices) == 5  # the header is fine
    vol = load_slices(scan, [2, 4], {2: [3, 1], 4: [3]})
    assert vol.slice_indices == [3, 4] and water(vol) == [3, 4]
    assert [(r.file, r.category) for r in vol.rejected] == [(paths[2].name, "undecodable")]


def test_photometric_is_read_per_file(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 16).astype(np.uint16), (8, 1))
    write_radiograph(tmp_path / "a.dcm", ramp, photometric="MONOCHROME2", instance_number=1)
    write_radiograph(tmp_path / "b.dcm", ramp, photometric="MONOCHROME1", instance_number=2)
    vol = read_series(tmp_path)
    assert [h.photometric for h in vol.headers] == ["MONOCHROME2", "MONOCHROME1"]


def test_rules_default_reads_any_geometry_series(tmp_path):
    write_volume(tmp_path, ct_phantom(2, SIZE), orientation=AXIAL)
    assert len(scan_series(tmp_path, rules=IMAGES).slices) == 2


@pytest.mark.parametrize("value", [b"0\\0", b"-.7\\.7", b"NaN\\.7", b"0.7"])
def test_pixel_spacing_that_is_not_two_positive_numbers(tmp_path, value):
    _, paths = write_volume(tmp_path, ct_phantom(3, SIZE))  # PixelSpacing "0.7\0.7"
    replace_bytes(paths[1], b"0.7\\0.7", value)
    fov = scan_series(tmp_path, rules=ScanRules(need_pixel_spacing=True))
    assert len(fov.slices) == 2
    assert reasons(fov.rejected) == {
        paths[1].name: (
            "pixel_spacing",
            f"{paths[1].name}: PixelSpacing '{value.decode()}' is not two positive numbers "
            "(field_of_view_mm needs the pixel size)",
        )
    }
    fit = scan_series(tmp_path)  # no field of view: used, its pixels taken as square
    assert [s.pixel_spacing for s in fit.slices] == [(0.7, 0.7), None, (0.7, 0.7)]


def test_frame_count_beyond_the_bytes_present_is_rejected_before_reading_frames(tmp_path):
    write_j2k(tmp_path / "many.dcm", ct_phantom(1, SIZE)[0], NumberOfFrames=10**9)
    vol = read_series(tmp_path)
    assert vol.rejected[0].category == "truncated"
    assert "NumberOfFrames 1000000000 needs at least 8000000008 bytes" in vol.rejected[0].reason
