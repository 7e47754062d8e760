"""What one frame's header gives the prepare stage, and why a file or frame is not used:
:class:`SliceHeader`, :class:`Rejection` and :class:`SliceError`, with the :class:`ScanRules`
a file must satisfy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from idc_diffusion.prepare.windowing import Lut

MAX_FRAME_PIXELS = 8192 * 8192  # default of prepare.max_frame_pixels


@dataclass(frozen=True)
class ScanRules:
    """What a file must satisfy beyond being a readable greyscale image.

    `sop_classes`: the SOPClassUIDs accepted (None: any); `max_frame_pixels`: the largest
    Rows x Columns decoded; `need_pixel_spacing`: reject frames whose PixelSpacing is present
    but not two positive numbers (a field of view in mm needs it).
    """

    sop_classes: frozenset[str] | None = None
    max_frame_pixels: int = MAX_FRAME_PIXELS
    need_pixel_spacing: bool = False


DEFAULT_RULES = ScanRules()  # any SOP class, the default frame size, spacing optional


@dataclass(frozen=True)
class Rejection:
    """A file (or frame) that was not used, why (the reason names it), and a category."""

    file: str
    reason: str
    category: str = "unusable"


@dataclass(frozen=True, eq=False)
class SliceHeader:
    """What is needed from one frame's header to sort, decode and caption it."""

    path: Path
    rows: int
    cols: int
    sop_uid: str
    instance_number: float
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    slope: float
    intercept: float
    photometric: str
    window_center: float | None
    window_width: float | None
    frame: int | None = None  # 0-based frame of a multi-frame file; None: single frame
    pixel_spacing: tuple[float, ...] | None = None  # (row spacing, column spacing) in mm
    windows: tuple[tuple[float, float], ...] = ()  # every WindowCenter/Width pair
    voi_luts: tuple[Lut, ...] = ()  # VOI LUT Sequence items
    modality_lut: Lut | None = None  # Modality LUT Sequence (replaces slope/intercept)

    @property
    def name(self) -> str:
        """The file name, with the 1-based frame number for multi-frame files."""
        return self.path.name if self.frame is None else f"{self.path.name}:frame{self.frame + 1}"


class SliceError(Exception):
    """A file cannot be used; the message is the reason, `category` its kind."""

    def __init__(self, message: str, category: str = "unusable") -> None:
        super().__init__(message)
        self.category = category
