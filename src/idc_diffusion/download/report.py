"""The shard report: one entry per series, status counts, the failure summary, atomic JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from idc_diffusion.core.rows import cell
from idc_diffusion.download.expected import expected_count
from idc_diffusion.download.verify import STATUSES, SeriesCheck

MAX_LISTED_FAILURES = 10


def series_entry(row: Mapping[str, Any], check: SeriesCheck) -> dict[str, Any]:
    """One report line."""
    return {
        "SeriesInstanceUID": str(row["SeriesInstanceUID"]),
        "crdc_series_uuid": cell(row, "crdc_series_uuid"),
        "expected_instances": expected_count(row),
        "files": check.files,
        "bytes": check.bytes,
        "status": check.status,
        "reason": check.reason,
        # what prepare's rerun decision rests on: changes exactly when the series' bytes do
        "digest": check.digest,
    }


def build_report(
    shard: int, source: str, rows: list[Mapping[str, Any]], checks: dict[str, SeriesCheck]
) -> dict[str, Any]:
    """The shard report, series in cohort order."""
    series = [series_entry(row, checks[str(row["SeriesInstanceUID"])]) for row in rows]
    counts = dict.fromkeys(STATUSES, 0)
    for entry in series:
        counts[entry["status"]] += 1
    return {
        "shard": int(shard),
        "source": source,
        "pixel_source": source,
        "series": series,
        "counts": counts,
        "bytes": sum(entry["bytes"] for entry in series),
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def failure_summary(report: Mapping[str, Any], max_fraction: float) -> str | None:
    """Why the shard as a whole failed (too many series not ``ok``), or None."""
    series = report["series"]
    bad = [entry for entry in series if entry["status"] != "ok"]
    if not series or len(bad) / len(series) <= max_fraction:
        return None
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items() if k != "ok" and v)
    lines = [
        f"shard {report['shard']}: {len(bad)} of {len(series)} series not ok "
        f"({len(bad) / len(series):.1%} > download.max_failed_fraction {max_fraction:.1%}): "
        f"{counts}"
    ]
    lines += [
        f"  {e['SeriesInstanceUID']}: {e['status']}: {e['reason']}"
        for e in bad[:MAX_LISTED_FAILURES]
    ]
    if len(bad) > MAX_LISTED_FAILURES:
        lines.append(f"  ... and {len(bad) - MAX_LISTED_FAILURES} more")
    return "\n".join(lines)


def failed_report_path(report_path: Path) -> Path:
    """``shard-3.json`` -> ``shard-3.failed.json``: where a failed shard's report goes."""
    return report_path.with_name(report_path.stem + ".failed" + report_path.suffix)
