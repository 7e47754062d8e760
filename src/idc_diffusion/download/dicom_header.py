"""A fast, conservative reader of the few DICOM header fields that verification needs.

:func:`parse_header` walks the Part-10 preamble, the file meta group and the top-level data
set of a native (uncompressed) little-endian file with ``struct.unpack_from``, skipping
values, until the PixelData element. It collects SOPInstanceUID, SeriesInstanceUID and the
image size fields and locates PixelData without touching the pixel bytes. It only succeeds when it
understands the whole structure the way pydicom would read it; anything else (big endian,
deflated or encapsulated syntaxes, undefined-length values other than sequences, odd
lengths, unknown VRs, tags out of order, values pydicom would choke on, bytes after PixelData
that are not whole elements, a file cut short) raises :class:`Unsupported`, and callers fall
back to pydicom.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR

PREAMBLE = 128
PREFIX = b"DICM"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
ITEM_TAG_BYTES = b"\xfe\xff\x00\xe0"
PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = 0x7FE00008  # it, DoubleFloat or any tag past PixelData: give up
META_GROUP_LENGTH, TRANSFER_SYNTAX = 0x00020000, 0x00020010
CHARSET = 0x00080005  # SpecificCharacterSet: pydicom decodes it in every data set it reads
LAST_META_TAG = 0x0002FFFF  # data set tags must come after the file meta group
FIRST_CHUNK = 8192  # bytes read first: the whole header of most files
MAX_TRAILER = 1 << 16  # more bytes than this after PixelData: leave the file to pydicom

# explicit VR: 2-byte length after the VR, or 2 reserved bytes and a 4-byte length
SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())

US, UI, IS = b"US", b"UI", b"IS"
WANTED = {  # tag -> (field of Header, VR)
    0x00080018: ("sop_uid", UI),
    0x0020000E: ("series_uid", UI),
    0x00280002: ("samples_per_pixel", US),
    0x00280008: ("number_of_frames", IS),
    0x00280010: ("rows", US),
    0x00280011: ("columns", US),
    0x00280100: ("bits_allocated", US),
}
INTEGER_STRING = re.compile(rb" *[0-9]{1,12} *")

ELEMENT = struct.Struct("<HH2sH")  # group, element, VR (explicit) , 2-byte length
TAG_LENGTH = struct.Struct("<HHL")  # group, element, 4-byte length (implicit VR, items)
LONG_LENGTH = struct.Struct("<L")
UINT16 = struct.Struct("<H")


class Unsupported(Exception):
    """The file is outside what the fast reader fully understands (or is damaged)."""


class NeedMore(Exception):
    """The buffer ends before the reader is done; ``needed`` bytes from the start would do."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


@dataclass(frozen=True)
class Header:
    """Fields of one DICOM file as pydicom would read them, and where PixelData lies."""

    transfer_syntax: str
    pixel_offset: int  # of the PixelData value
    pixel_length: int
    sop_uid: str | None = None
    series_uid: str | None = None
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    samples_per_pixel: int | None = None
    number_of_frames: int | None = None


def need(buf: bytes, end: int) -> None:
    """Raise NeedMore unless ``buf`` holds bytes up to offset ``end``."""
    if end > len(buf):
        raise NeedMore(end)


def read_element(buf: bytes, pos: int, implicit: bool) -> tuple[int, bytes, int, int]:
    """(tag, VR or b"", value length, value offset) of the element whose header is at ``pos``.

    Item and delimiter tags (group FFFE) have no VR in either encoding.
    """
    need(buf, pos + 8)
    if implicit or buf[pos : pos + 2] == b"\xfe\xff":
        group, element, length = TAG_LENGTH.unpack_from(buf, pos)
        return group << 16 | element, b"", length, pos + 8
    group, element, vr, length = ELEMENT.unpack_from(buf, pos)
    if vr in SHORT_VRS:
        return group << 16 | element, vr, length, pos + 8
    if vr in LONG_VRS:
        need(buf, pos + 12)
        return group << 16 | element, vr, LONG_LENGTH.unpack_from(buf, pos + 8)[0], pos + 12
    raise Unsupported(f"unknown VR {vr!r} at {pos}")


def looks_implicit(buf: bytes, pos: int) -> bool:
    """pydicom's test of a data set's first element: its VR bytes are not two capitals."""
    need(buf, pos + 6)
    return not (0x40 < buf[pos + 4] < 0x5B and 0x40 < buf[pos + 5] < 0x5B)


def value_end(start: int, length: int) -> int:
    """End offset of a defined-length value; odd lengths are unsupported."""
    if length & 1:
        raise Unsupported(f"odd length {length} at {start}")
    return start + length


def check_charset(buf: bytes, vr: bytes, length: int, start: int) -> None:
    """Raise Unsupported unless pydicom takes this SpecificCharacterSet without complaint: a
    single term it knows, or none (pydicom converts it while reading, and can fail)."""
    end = value_end(start, length)
    need(buf, end)
    if vr not in (b"", b"CS") or text(buf[start:end]) not in python_encoding:
        raise Unsupported("unusual SpecificCharacterSet")


def is_sequence(buf: bytes, tag: int, vr: bytes, start: int) -> bool:
    """Whether pydicom reads an undefined-length element as a sequence of items."""
    if vr:
        return vr == b"SQ"  # explicit UN would be read as an implicit-VR sequence: give up
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:  # private tag: a sequence when an item follows
        need(buf, start + 4)
        return buf[start : start + 4] == ITEM_TAG_BYTES


def skip_item_dataset(buf: bytes, pos: int, end: int | None, implicit: bool) -> int:
    """Offset after the data set of one sequence item: ``end`` for a defined-length item,
    else just past its item delimiter."""
    first = True
    while end is None or pos < end:
        tag, vr, length, start = read_element(buf, pos, implicit)
        if tag == ITEM_END and end is None and length == 0:
            return start
        if tag >> 16 == 0xFFFE:
            raise Unsupported(f"unexpected item tag {tag:08X} at {pos}")
        if first and not implicit and looks_implicit(buf, pos):
            raise Unsupported(f"implicit VR item in an explicit VR file at {pos}")
        if tag == CHARSET:
            check_charset(buf, vr, length, start)
        first = False
        pos = skip_value(buf, tag, vr, length, start, implicit)
    if pos != end:
        raise Unsupported(f"item overruns its length at {pos}")
    return pos


def skip_sequence(buf: bytes, pos: int, implicit: bool) -> int:
    """Offset just past the delimiter of the undefined-length sequence whose items start at
    ``pos``."""
    while True:
        need(buf, pos + 8)
        group, element, length = TAG_LENGTH.unpack_from(buf, pos)
        tag, pos = group << 16 | element, pos + 8
        if tag == SEQUENCE_END and length == 0:
            return pos
        if tag != ITEM:
            raise Unsupported(f"expected an item, found {tag:08X} at {pos - 8}")
        end = None if length == UNDEFINED else value_end(pos, length)
        pos = skip_item_dataset(buf, pos, end, implicit)


def skip_value(buf: bytes, tag: int, vr: bytes, length: int, start: int, implicit: bool) -> int:
    """Offset after the value of an element (undefined-length sequences are walked)."""
    if length != UNDEFINED:
        return value_end(start, length)
    if not is_sequence(buf, tag, vr, start):
        raise Unsupported(f"undefined-length value of {tag:08X} at {start}")
    return skip_sequence(buf, start, implicit)


def text(value: bytes) -> str:
    """A single-valued UI or CS string as pydicom decodes it (trailing NULs and spaces off)."""
    decoded = value.decode("latin-1").rstrip("\0 ")
    if "\\" in decoded:
        raise Unsupported("multi-valued string")
    return decoded


def convert(vr: bytes, value: bytes) -> int | str:
    """The value of a wanted element with VR ``vr``."""
    if vr == US:
        if len(value) != 2:
            raise Unsupported(f"US value of {len(value)} bytes")
        return UINT16.unpack(value)[0]
    if vr == IS:
        if not INTEGER_STRING.fullmatch(value):
            raise Unsupported(f"IS value {value!r}")
        return int(value)
    return text(value)


def parse_meta(buf: bytes) -> tuple[str, int]:
    """(TransferSyntaxUID, offset of the data set) from the preamble and file meta group."""
    need(buf, PREAMBLE + len(PREFIX))
    if buf[PREAMBLE : PREAMBLE + len(PREFIX)] != PREFIX:
        raise Unsupported("no DICM prefix")
    pos, syntax = PREAMBLE + len(PREFIX), None
    if read_element(buf, pos, implicit=False)[:3] != (META_GROUP_LENGTH, b"UL", 4):
        raise Unsupported("file meta does not start with its group length")  # pydicom reads it
    while True:
        need(buf, pos + 2)
        if UINT16.unpack_from(buf, pos)[0] != 0x0002:
            break
        tag, vr, length, start = read_element(buf, pos, implicit=False)
        if length == UNDEFINED:
            raise Unsupported("undefined length in the file meta group")
        pos = value_end(start, length)
        if tag == TRANSFER_SYNTAX:
            need(buf, pos)
            syntax = text(buf[start:pos]) if vr == UI else None
    if syntax is None:
        raise Unsupported("no usable TransferSyntaxUID")
    return syntax, pos


def parse_header(buf: bytes, size: int) -> Header:
    """The header of a file of ``size`` bytes whose first bytes are ``buf``.

    Raises NeedMore when ``buf`` is too short, Unsupported when the fast path cannot vouch
    for the file: it then says nothing about whether the file is fine.
    """
    syntax, pos = parse_meta(buf)
    if syntax not in (IMPLICIT_LE, EXPLICIT_LE):
        raise Unsupported(f"transfer syntax {syntax}")
    implicit = syntax == IMPLICIT_LE
    if looks_implicit(buf, pos) != implicit:
        raise Unsupported("data set encoding differs from the transfer syntax")
    fields: dict[str, Any] = {}
    last = LAST_META_TAG
    while True:
        tag, vr, length, start = read_element(buf, pos, implicit)
        if tag <= last:
            raise Unsupported(f"tag {tag:08X} out of order at {pos}")
        last = tag
        if tag == PIXEL_DATA:
            break
        if tag >= FLOAT_PIXEL_DATA:
            raise Unsupported(f"no native PixelData (found {tag:08X})")
        if tag == CHARSET:
            check_charset(buf, vr, length, start)
        pos = skip_value(buf, tag, vr, length, start, implicit)
        if tag in WANTED:
            name, wanted_vr = WANTED[tag]
            if vr not in (b"", wanted_vr):
                raise Unsupported(f"{name} has VR {vr!r}")
            need(buf, pos)
            fields[name] = convert(wanted_vr, buf[start:pos])
    if vr not in (b"", b"OB", b"OW") or length == UNDEFINED:
        raise Unsupported("PixelData is not native")
    if value_end(start, length) > size:
        raise Unsupported("PixelData runs past the end of the file")
    return Header(syntax, start, length, **fields)


def parse_trailer(tail: bytes, implicit: bool) -> None:
    """Check that ``tail``, the bytes after PixelData, is whole top-level elements (such as
    trailing padding) in tag order."""
    pos, last = 0, PIXEL_DATA
    while pos < len(tail):
        tag, vr, length, start = read_element(tail, pos, implicit)
        if tag <= last or tag >> 16 == 0xFFFE:
            raise Unsupported(f"tag {tag:08X} after PixelData")
        last = tag
        pos = skip_value(tail, tag, vr, length, start, implicit)
    if pos != len(tail):
        raise Unsupported("element after PixelData runs past the end of the file")


def read_head(f: BinaryIO, size: int, first_chunk: int) -> Header:
    """:func:`parse_header` of the open file ``f`` of ``size`` bytes, reading from its start
    only as far as needed."""
    buf = f.read(min(first_chunk, size))
    while True:
        try:
            return parse_header(buf, size)
        except NeedMore as more:
            if more.needed > size:
                raise Unsupported("the file ends inside its header") from None
            more_bytes = f.read(min(max(more.needed, 2 * len(buf)), size) - len(buf))
            if not more_bytes:
                raise Unsupported("the file shrank while being read") from None
            buf += more_bytes


def read_trailer(f: BinaryIO, header: Header, size: int) -> None:
    """:func:`parse_trailer` of what follows PixelData in the open file ``f``, if anything."""
    end = header.pixel_offset + header.pixel_length
    if end == size:
        return
    if size - end > MAX_TRAILER:
        raise Unsupported(f"{size - end} bytes after PixelData")
    f.seek(end)
    try:
        parse_trailer(f.read(size - end), header.transfer_syntax == IMPLICIT_LE)
    except NeedMore:
        raise Unsupported("element after PixelData cut short") from None


def read_header(path: str | Path, first_chunk: int = FIRST_CHUNK) -> Header | None:
    """The fast-path header of the file at ``path``, without reading its pixel bytes, or
    None when the fast path cannot vouch for the file (unsupported, damaged or cut short)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            header = read_head(f, size, first_chunk)
            read_trailer(f, header, size)
        except Unsupported:
            return None
    return header
