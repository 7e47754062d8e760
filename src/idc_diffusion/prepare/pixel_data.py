"""Pixel data checked before anything is decoded: present, greyscale, decodable transfer
syntax, frame size within bounds and as the codestream declares, not truncated."""

from __future__ import annotations

import os
import struct
from functools import cache
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from idc_diffusion.prepare.slice_header import MAX_FRAME_PIXELS, SliceError

PIXEL_DATA_TAG = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: an encapsulated fragment
CODESTREAM_HEAD = 8192  # bytes of the first fragment read to find its declared size


def check_pixel_data(ds: Dataset, path: Path, max_frame_pixels: int = MAX_FRAME_PIXELS) -> int:
    """The number of frames; SliceError for pixel data that cannot or should not be decoded.

    Missing, truncated or non-greyscale pixel data, a transfer syntax without a decoder, and
    frames over `max_frame_pixels` or whose codestream declares another size than Rows x
    Columns are refused here, from the header and a few bytes, before any decoder allocates.
    """
    elem = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    if elem is None:
        raise SliceError(f"{path.name}: no PixelData", "no_pixel_data")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if keyword not in ds:
            raise SliceError(f"{path.name}: no {keyword}", "invalid_header")
    samples = ds.get("SamplesPerPixel", 1)
    if int(samples) != 1:
        raise SliceError(
            f"{path.name}: SamplesPerPixel {samples} is not supported (only greyscale images "
            "are used)",
            "photometric",
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in GREYSCALE:
        raise SliceError(
            f"{path.name}: PhotometricInterpretation {photometric} is not supported (only "
            "greyscale MONOCHROME1/MONOCHROME2 images are used)",
            "photometric",
        )
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        raise SliceError(f"{path.name}: no TransferSyntaxUID in the file meta", "invalid_header")
    syntax = ds.file_meta.TransferSyntaxUID
    problem = _decoder_problem(str(syntax))
    if problem:
        raise SliceError(f"{path.name}: TransferSyntaxUID {syntax} {problem}", "transfer_syntax")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows < 1 or cols < 1 or rows * cols > max_frame_pixels:
        raise SliceError(
            f"{path.name}: Rows x Columns {rows} x {cols} is outside 1..prepare.max_frame_pixels "
            f"({max_frame_pixels} pixels)",
            "frame_size",
        )
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise SliceError(f"{path.name}: invalid NumberOfFrames ({exc})", "invalid_header") from exc
    if frames < 1:
        raise SliceError(f"{path.name}: NumberOfFrames {frames}", "invalid_header")
    length = getattr(elem, "length", None)
    tell = getattr(elem, "value_tell", None)
    if syntax.is_encapsulated:
        if tell is not None:  # each frame needs an item of at least its 8-byte header
            present = os.path.getsize(path) - tell
            if 8 * (frames + 1) > present:
                raise SliceError(
                    f"{path.name}: NumberOfFrames {frames} needs at least {8 * (frames + 1)} "
                    f"bytes of encapsulated PixelData, the file has {present}",
                    "truncated",
                )
            _check_codestream(path, tell, rows, cols)
        return frames
    if length is None or length == UNDEFINED_LENGTH:
        return frames
    if tell is not None and not syntax.is_deflated:  # deflated: offsets in inflated bytes
        size = os.path.getsize(path)
        if tell + length > size:
            raise SliceError(
                f"{path.name}: truncated file ({size} bytes, PixelData needs {tell + length})",
                "truncated",
            )
    expected = (rows * cols * frames * int(ds.BitsAllocated) + 7) // 8
    if length < expected:
        raise SliceError(
            f"{path.name}: PixelData has {length} bytes, expected {expected}", "truncated"
        )
    return frames


@cache
def _decoder_problem(syntax: str) -> str | None:
    """Why pixel data of a transfer syntax cannot be decoded here, or None."""
    if not UID(syntax).is_transfer_syntax:
        return "is not a transfer syntax pydicom knows (private or newer than pydicom)"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"({UID(syntax).name}) has no pixel data decoder in pydicom"
    if not decoder.is_available:
        return f"({UID(syntax).name}) has no installed decoder plugin"
    return None


def codestream_size(head: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 codestream declares, None if not found.

    Reads the SOF/SOF55 segment of JPEG and JPEG-LS, the SIZ segment of JPEG 2000 (ISO
    10918-1 B.2.2, ISO 14495-1 C.2.2, ISO 15444-1 A.5.1); RLE carries no size.
    """
    siz = head.find(b"\xff\x4f\xff\x51")
    if siz >= 0 and len(head) >= siz + 24:
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", head[siz + 8 : siz + 24])
        return ysiz - yosiz, xsiz - xosiz
    if not head.startswith(b"\xff\xd8"):
        return None
    offset = 2
    while offset + 4 <= len(head):
        if head[offset] != 0xFF:
            return None
        marker = head[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        (length,) = struct.unpack(">H", head[offset + 2 : offset + 4])
        is_sof = marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xF7) or (
            0xC9 <= marker <= 0xCF and marker != 0xCC
        )
        if is_sof and offset + 9 <= len(head):
            rows, cols = struct.unpack(">HH", head[offset + 5 : offset + 9])
            return (rows, cols) if rows else None  # 0 rows: height given later (DNL)
        if marker == 0xDA:  # start of scan before any frame header
            return None
        offset += 2 + length
    return None


def _check_codestream(path: Path, tell: int, rows: int, cols: int) -> None:
    """SliceError when the first fragment's codestream declares another size than the header."""
    with open(path, "rb") as handle:
        handle.seek(tell)
        offsets = handle.read(8)  # the Basic Offset Table item
        if len(offsets) < 8 or offsets[:4] != ITEM_TAG:
            raise SliceError(f"{path.name}: encapsulated PixelData has no items", "truncated")
        handle.seek(struct.unpack("<I", offsets[4:])[0], os.SEEK_CUR)
        item = handle.read(8)
        if len(item) < 8 or item[:4] != ITEM_TAG:
            raise SliceError(f"{path.name}: encapsulated PixelData has no fragment", "truncated")
        head = handle.read(min(struct.unpack("<I", item[4:])[0], CODESTREAM_HEAD))
    size = codestream_size(head)
    if size is not None and size != (rows, cols):
        raise SliceError(
            f"{path.name}: the encoded image is {size[0]} x {size[1]} but Rows x Columns say "
            f"{rows} x {cols}",
            "frame_size",
        )
