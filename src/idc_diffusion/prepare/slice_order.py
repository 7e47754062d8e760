"""The slices of a series that form one stack, in anatomical order: frames of a minority
matrix size or orientation, and frames without geometry among placed ones, are rejected; the
rest are sorted along the slice normal (else by InstanceNumber)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from idc_diffusion.prepare.geometry import slice_normal
from idc_diffusion.prepare.slice_header import Rejection, SliceHeader


def _majority(values: list, key) -> object:
    """Most common key among values (ties: first seen, i.e. by file name)."""
    return Counter(key(v) for v in values).most_common(1)[0][0]


def _reject_minority(
    headers: list[SliceHeader], key, what: str, show=str
) -> tuple[list[SliceHeader], list[Rejection]]:
    """Keep headers whose key equals the majority; reject the others naming `what`."""
    if not headers:
        return headers, []
    majority = _majority(headers, key)
    kept = [h for h in headers if key(h) == majority]
    rejected = [
        Rejection(
            h.name,
            f"{h.name}: {what} {show(key(h))} differs from the majority {show(majority)}",
            what.replace(" ", "_"),
        )
        for h in headers
        if key(h) != majority
    ]
    return kept, rejected


def _cosines(values: Sequence[float]) -> str:
    """Direction cosines as in a rejection reason: backslash-joined."""
    return "\\".join(f"{v:g}" for v in values)


def _size(shape: tuple[int, int]) -> str:
    """A matrix size as in a rejection reason: ``rows x cols``."""
    return f"{shape[0]} x {shape[1]}"


def _reject_without_geometry(
    headers: list[SliceHeader],
) -> tuple[list[SliceHeader], list[Rejection]]:
    """When most slices have orientation and position, reject those that lack either.

    A series where most slices lack them (projection images) keeps every slice.
    """
    placed = [h for h in headers if h.orientation is not None and h.position is not None]
    if len(placed) * 2 <= len(headers) or len(placed) == len(headers):
        return headers, []
    rejected = []
    for h in headers:
        if h.orientation is None or h.position is None:
            missing = "ImagePositionPatient" if h.position is None else "ImageOrientationPatient"
            reason = f"{h.name}: no {missing} (the series' other slices have one)"
            rejected.append(Rejection(h.name, reason, "no_geometry"))
    return placed, rejected


def sort_slices(headers: list[SliceHeader]) -> tuple[list[SliceHeader], np.ndarray]:
    """Order slices along the normal if all have geometry, else by InstanceNumber.

    Returns the sorted headers and their positions along the normal (NaN without geometry).
    """
    if headers and all(h.orientation and h.position for h in headers):
        normal = slice_normal(headers[0].orientation)  # type: ignore[arg-type]
        pos = np.array([float(np.dot(normal, h.position)) for h in headers])  # type: ignore[arg-type]
        order = sorted(
            range(len(headers)),
            key=lambda i: (pos[i], headers[i].instance_number, headers[i].frame or 0),
        )
        return [headers[i] for i in order], pos[order]
    order = sorted(
        range(len(headers)),
        key=lambda i: (headers[i].instance_number, headers[i].path.name, headers[i].frame or 0),
    )
    return [headers[i] for i in order], np.full(len(headers), np.nan)


def consistent_slices(
    headers: list[SliceHeader],
) -> tuple[list[SliceHeader], list[Rejection]]:
    """The headers that agree with the series' majority matrix size, have geometry when most
    do, and share the majority orientation; the others rejected, in that order."""
    headers, wrong_size = _reject_minority(
        headers, lambda h: (h.rows, h.cols), "matrix size", _size
    )
    headers, no_geometry = _reject_without_geometry(headers)
    wrong_orientation: list[Rejection] = []
    if headers and all(h.orientation is not None for h in headers):
        headers, wrong_orientation = _reject_minority(
            headers, lambda h: tuple(np.round(h.orientation, 3)), "orientation", _cosines
        )
    return headers, wrong_size + no_geometry + wrong_orientation
