"""Deterministic, order-independent assignment of patients to splits and series to shards.

Both use a SHA-256 of stable identifiers, so a patient keeps its split and a series keeps
its shard when the cohort grows, shrinks or is reordered. Shards use jump consistent hashing,
so growing ``n_shards`` from n to m moves only the (m - n) / m of the series that must move.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd

from idc_diffusion.core.hashing import key_digest

SPLITS = ("train", "val", "test")


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) determined only by `parts`."""
    return int.from_bytes(key_digest(*parts)[:8], "big") / 2**64


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash of a 64-bit ``key`` into ``buckets`` (Lamping & Veach 2014):
    uniform, and going from n to n + 1 buckets moves a key only into the new bucket, with
    probability 1 / (n + 1)."""
    bucket, jump = -1, 0
    while jump < buckets:
        bucket = jump
        key = (key * 2862933555777941757 + 1) % 2**64
        jump = int((bucket + 1) * (2**31 / ((key >> 33) + 1)))
    return bucket


def shard_of(series_uid: str, n_shards: int) -> int:
    """Shard of a series: the jump consistent hash of a stable hash of its UID."""
    return jump_hash(int.from_bytes(key_digest(series_uid)[:8], "big"), n_shards)


def split_of(u: float, fractions: Mapping[str, float]) -> str:
    """The split whose cumulative-fraction interval contains `u`."""
    edge = 0.0
    for name in SPLITS:
        edge += fractions.get(name, 0.0)
        if u < edge:
            return name
    return next(n for n in reversed(SPLITS) if fractions.get(n, 0.0) > 0)


def patient_keys(frame: pd.DataFrame) -> pd.Series:
    """Patient identity: PatientID is only unique within a collection."""
    return frame["collection_id"].astype(str) + "/" + frame["PatientID"].astype(str)


def assign_splits(patients: Iterable[str], fractions: Mapping[str, float], seed: int) -> dict:
    """Map each patient key to a split.

    Each patient's split depends only on (seed, patient), so it is stable as the cohort grows.
    Small cohorts get one fix-up: a split with a non-zero fraction that came out empty takes
    the patient of the largest split whose hash lies nearest to that split's interval, as long
    as there are at least as many patients as wanted splits.
    """
    units = {p: unit_hash(seed, p) for p in sorted(set(patients))}
    result = {p: split_of(u, fractions) for p, u in units.items()}
    wanted = [s for s in SPLITS if fractions.get(s, 0.0) > 0]
    if len(units) < len(wanted):
        return result
    for split in wanted:
        if split in result.values():
            continue
        counts = pd.Series(result).value_counts()
        donor = counts.index[0]
        target = _interval_centre(split, fractions)
        candidates = [p for p, s in result.items() if s == donor]
        result[min(candidates, key=lambda p: (abs(units[p] - target), p))] = split
    return result


def _interval_centre(split: str, fractions: Mapping[str, float]) -> float:
    start = 0.0
    for name in SPLITS:
        if name == split:
            return start + fractions.get(name, 0.0) / 2
        start += fractions.get(name, 0.0)
    raise KeyError(split)
