"""The fast DICOM header reader agrees with pydicom, and verification stays as strict."""

from __future__ import annotations

import io
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_factory import make_dataset, save, write_enhanced
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR
from s3_server import moto_s3

from idc_diffusion.download import fetch, verify
from idc_diffusion.download import shard as download
from idc_diffusion.download.dicom_header import LONG_VRS, SHORT_VRS, Header, read_head, read_header
from idc_diffusion.download.synthetic import write_synthetic_series
from idc_diffusion.download.verify import check_file, fast_check, pydicom_check

SERIES = "1.2.826.0.1.3680043.8.498.55.1"
ROW = {
    "SeriesInstanceUID": SERIES,
    "StudyInstanceUID": SERIES + ".0",
    "PatientID": "H1",
    "Modality": "CT",
    "BodyPartExamined": "CHEST",
    "instanceCount": 1,
}
# pydicom test files the fast path must read (explicit and implicit VR, undefined-length
# sequences, trailing padding, multi-frame) and some it must leave to pydicom
FAST = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_padded.dcm",
    "liver_1frame.dcm",
    "examples_palette.dcm",
    "examples_rgb_color.dcm",
    "rtdose.dcm",
    "SC_rgb_small_odd.dcm",
]
SLOW = [
    "JPEG2000.dcm",  # encapsulated pixel data
    "JPEG-lossy.dcm",
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",  # deflated
    "no_meta.dcm",
    "meta_missing_tsyntax.dcm",
    "MR_truncated.dcm",
    "rtplan.dcm",  # no pixel data
    "badVR.dcm",
]


def pydicom_file(name: str) -> Path:
    return Path(get_testdata_file(name))


def all_testdata() -> list[Path]:
    return sorted(Path(f) for f in get_testdata_files() if Path(f).is_file())


def pydicom_view(path: Path) -> Header:
    """What the fast reader should find, as read by pydicom."""
    ds = pydicom.dcmread(path)
    pixels = ds["PixelData"]
    frames = ds.get("NumberOfFrames")
    return Header(
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        pixel_offset=pixels.file_tell,
        pixel_length=len(pixels.value),
        sop_uid=ds.get("SOPInstanceUID"),
        series_uid=ds.get("SeriesInstanceUID"),
        rows=ds.get("Rows"),
        columns=ds.get("Columns"),
        bits_allocated=ds.get("BitsAllocated"),
        samples_per_pixel=ds.get("SamplesPerPixel"),
        number_of_frames=None if frames is None else int(frames),
    )


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get("SeriesInstanceUID"))


def synthetic_file(tmp_path: Path, matrix: int = 32) -> Path:
    return write_synthetic_series(ROW, tmp_path / "synthetic", matrix=matrix)[0]


def with_sequences(tmp_path: Path, implicit: bool) -> Path:
    """A file with nested undefined- and defined-length sequences and items, public and
    private, in implicit or explicit VR."""
    ds = make_dataset(np.arange(64, dtype=np.uint16).reshape(8, 8), "CT", SERIES, "1.2.3")
    inner = Dataset()
    inner.CodeValue, inner.CodeMeaning = "T-D3000", "Chest"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    item.PurposeOfReferenceCodeSequence.is_undefined_length = True
    defined = Dataset()
    defined.ReferencedSOPInstanceUID = "1.2.3.5"
    ds.ReferencedImageSequence = Sequence([item, defined, Dataset()])
    ds["ReferencedImageSequence"].is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    defined.is_undefined_length_sequence_item = False
    ds.private_block(0x0011, "IDC TEST", create=True).add_new(0x10, "SQ", [Dataset()])
    ds[0x00111010].is_undefined_length = True
    ds[0x00111010].value[0].is_undefined_length_sequence_item = True
    ds.DerivationCodeSequence = Sequence([inner])  # defined length
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return save(ds, tmp_path / f"sequences-{implicit}.dcm")


def patched(path: Path, out: Path, offset: int, data: bytes) -> Path:
    body = bytearray(path.read_bytes())
    body[offset : offset + len(data)] = data
    out.write_bytes(bytes(body))
    return out


def test_vr_sets_are_pydicoms():
    assert {vr.encode() for vr in STANDARD_VR} == SHORT_VRS | LONG_VRS
    assert {vr.encode() for vr in EXPLICIT_VR_LENGTH_32} == LONG_VRS


@pytest.mark.parametrize("name", FAST)
def test_fast_path_reads_pydicom_testdata(name):
    path = pydicom_file(name)
    assert read_header(path) == pydicom_view(path)
    assert fast_check(path, uid_of(path)) and pydicom_check(path, uid_of(path)).problem is None


@pytest.mark.parametrize("name", SLOW)
def test_fast_path_leaves_unusual_files_to_pydicom(name):
    assert read_header(pydicom_file(name)) is None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_testdata_file_agrees_with_pydicom():
    read = 0
    for path in all_testdata():
        header = read_header(path)
        if header is None:
            continue
        read += 1
        assert header == pydicom_view(path), path.name
        uid = uid_of(path)
        assert (fast_check(path, uid) is not None) is (pydicom_check(path, uid).problem is None), (
            path.name
        )
    assert read >= len(FAST)


@pytest.mark.parametrize("implicit", [False, True])
def test_sequences_are_walked(tmp_path, implicit):
    path = with_sequences(tmp_path, implicit)
    private_sq = b"\x11\x00\x10\x10" + (b"" if implicit else b"SQ\x00\x00") + b"\xff" * 4
    assert private_sq in path.read_bytes()  # undefined length, told apart by lookahead
    assert read_header(path) == pydicom_view(path)
    assert read_header(path).transfer_syntax.endswith(".2" if implicit else ".2.1")
    assert fast_check(path, SERIES) and check_file(path, SERIES).problem is None


def test_synthetic_and_multiframe_files(tmp_path):
    synthetic = synthetic_file(tmp_path, matrix=512)
    frames = np.zeros((3, 8, 8), dtype=np.int16)
    enhanced = write_enhanced(tmp_path / "enhanced.dcm", frames, [0.0, 1.0, 2.0])
    for path in (synthetic, enhanced):
        assert read_header(path) == pydicom_view(path)
        assert fast_check(path, uid_of(path)) and check_file(path, uid_of(path)).problem is None
    assert read_header(enhanced).number_of_frames == 3


def test_header_is_read_without_pixel_bytes(tmp_path):
    path = synthetic_file(tmp_path, matrix=512)
    body = path.read_bytes()
    header = read_header(path)
    assert header.pixel_offset + header.pixel_length == len(body) > 100 * header.pixel_offset
    for first_chunk in (1, 16, 200):  # reads more, never past twice the header
        f = io.BytesIO(body)
        assert read_head(f, len(body), first_chunk) == header
        assert f.tell() <= 2 * header.pixel_offset


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_cut_is_a_problem(tmp_path):
    path = synthetic_file(tmp_path)
    body = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    for keep in range(len(body)):
        cut.write_bytes(body[:keep])
        assert not fast_check(cut, SERIES), keep
        assert check_file(cut, SERIES).problem is not None, keep
    assert check_file(path, SERIES).problem is None


def test_problems_keep_pydicoms_messages(tmp_path):
    path = synthetic_file(tmp_path)
    assert (
        check_file(path, "1.2.4").problem
        == f"{path.name}: SeriesInstanceUID {SERIES} != expected 1.2.4"
    )
    html = tmp_path / "denied.dcm"
    html.write_text("<html>Access Denied</html>")
    assert check_file(html, SERIES).problem.startswith("denied.dcm: not a DICOM file (")
    header = read_header(path)
    short = tmp_path / "short.dcm"
    short.write_bytes(path.read_bytes()[: header.pixel_offset + 100])
    assert check_file(short, SERIES).problem == (
        f"short.dcm: PixelData has 100 bytes, expected {header.pixel_length} (truncated)"
    )
    gone = tmp_path / "gone.dcm"
    assert check_file(gone, SERIES) == pydicom_check(gone, SERIES)
    assert check_file(gone, SERIES).problem.startswith("gone.dcm: unreadable (FileNotFoundError")


def test_pixel_data_shorter_than_the_image_is_truncated(tmp_path):
    """A whole file whose PixelData (length field included) is too short for Rows x Columns."""
    path = synthetic_file(tmp_path)
    header = read_header(path)
    short = tmp_path / "short-pixels.dcm"
    body = path.read_bytes()[: header.pixel_offset + header.pixel_length - 2]
    short.write_bytes(body)
    patched(short, short, header.pixel_offset - 4, struct.pack("<L", header.pixel_length - 2))
    assert read_header(short) == pydicom_view(short)  # structurally whole ...
    assert not fast_check(short, SERIES)  # ... but too short
    assert "truncated" in check_file(short, SERIES).problem


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_odd_data_is_left_to_pydicom(tmp_path):
    path = synthetic_file(tmp_path)
    header = read_header(path)
    body = path.read_bytes()
    odd_length = patched(
        path,
        tmp_path / "odd.dcm",
        header.pixel_offset - 4,
        struct.pack("<L", header.pixel_length - 1),
    )
    float_tag = b"\xe0\x7f\x08\x00"
    float_pixels = patched(path, tmp_path / "float.dcm", header.pixel_offset - 12, float_tag)
    undefined = patched(path, tmp_path / "undefined.dcm", header.pixel_offset - 4, b"\xff" * 4)
    stray = tmp_path / "stray.dcm"
    stray.write_bytes(body + b"\x00\x00")  # bytes after PixelData that are no element
    for weird in (odd_length, float_pixels, undefined, stray):
        assert read_header(weird) is None, weird.name
        assert check_file(weird, SERIES)._replace(content=None) == pydicom_check(weird, SERIES)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_random_header_damage_never_passes_what_pydicom_rejects(tmp_path):
    """Random bytes anywhere before the pixel values: whenever the fast path still vouches
    for a file, pydicom finds it fine and reads the same header."""
    sources = [
        synthetic_file(tmp_path),
        with_sequences(tmp_path, implicit=False),
        with_sequences(tmp_path, implicit=True),
        shutil.copy(pydicom_file("liver_1frame.dcm"), tmp_path / "liver.dcm"),
        shutil.copy(pydicom_file("MR_small_padded.dcm"), tmp_path / "padded.dcm"),
    ]
    rng = random.Random(5)
    mutant = tmp_path / "mutant.dcm"
    verdicts = {True: 0, False: 0}
    for source in map(Path, sources):
        uid, end = uid_of(source), read_header(source).pixel_offset
        for _ in range(300):
            offset = rng.randrange(end)
            damage = bytes(rng.randrange(256) for _ in range(rng.choice((1, 1, 2, 4))))
            patched(source, mutant, offset, damage)
            fine = fast_check(mutant, uid) is not None
            verdicts[fine] += 1
            if fine:
                assert pydicom_check(mutant, uid).problem is None, (source.name, offset)
                assert read_header(mutant) == pydicom_view(mutant), (source.name, offset)
    assert verdicts[True] > 100 and verdicts[False] > 100, verdicts


def test_download_checks_each_landed_file_once(tmp_path, monkeypatch):
    """More files than a verification batch: every file is checked once while it lands, and
    the series check reuses all those results."""
    count = fetch.CHECK_BATCH + 5
    row = dict(ROW, instanceCount=count, aws_bucket="idc-open-data")
    row["crdc_series_uuid"] = "00000000-0000-4000-8000-000000000055"
    paths = write_synthetic_series(row, tmp_path / "source", matrix=8)
    landed, rechecked = [], []
    monkeypatch.setattr(
        fetch, "check_file", lambda p, uid, listed: landed.append(p) or check_file(p, uid)
    )
    monkeypatch.setattr(verify, "check_file", lambda p, uid, listed: rechecked.append(p))
    settings = {"source": "idc", "provider": "custom", "retries": 0, "s5cmd_workers": 4}
    with moto_s3() as s3:
        s3.client.create_bucket(Bucket=row["aws_bucket"])
        s3.upload_series(row["aws_bucket"], row["crdc_series_uuid"], paths)
        shard = tmp_path / "shard-0"
        report = download.download_shard(
            pd.DataFrame([row]), 0, shard, tmp_path / "r.json", dict(settings, endpoint_url=s3.url)
        )
    assert report["counts"]["ok"] == 1 and report["series"][0]["files"] == count
    assert sorted(Path(p).name for p in landed) == sorted(
        p.name for p in (shard / SERIES).iterdir()
    )
    assert len(landed) == count
    assert rechecked == []
