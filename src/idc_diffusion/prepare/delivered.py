"""Which of a shard's series the download delivered: a rejection for each series its report
does not mark ``ok``, and a check that those it does are still on disk."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from idc_diffusion.download.verify import series_files
from idc_diffusion.prepare.table_rows import rejection_row


def download_rejections(rows: pd.DataFrame, report: Mapping[str, Any]) -> dict[str, dict]:
    """Series the download stage did not deliver intact, keyed by UID."""
    entries = {str(s["SeriesInstanceUID"]): s for s in report.get("series", [])}
    out = {}
    for uid in rows["SeriesInstanceUID"].astype(str):
        entry = entries.get(uid, {"status": "missing", "reason": "not in the download report"})
        if entry.get("status") != "ok":
            reason = f"download {entry.get('status')}: {entry.get('reason') or ''}".strip()
            out[uid] = rejection_row(uid, reason, "download", category="download")
    return out


def check_dicom_present(rows: pd.DataFrame, report: Mapping[str, Any], dicom_dir: Path) -> None:
    """ValueError when a series the download report marks ``ok`` has no folder of files
    under ``dicom_dir`` (removed or archived after download): preparing now would silently
    drop it, and an emptied shard would empty the dataset."""
    ok = {str(s["SeriesInstanceUID"]) for s in report.get("series", []) if s["status"] == "ok"}
    gone = [
        uid
        for uid in sorted(ok & set(rows["SeriesInstanceUID"].astype(str)))
        if not series_files(dicom_dir / uid)
    ]
    if gone:
        more = f" and {len(gone) - 1} more" if len(gone) > 1 else ""
        raise ValueError(
            f"{dicom_dir / gone[0]}{more}: DICOM marked ok in the download report is gone "
            f"(removed or archived); restore it, or fetch it again with snakemake --forcerun "
            f"{dicom_dir}.json (nothing was overwritten)"
        )
