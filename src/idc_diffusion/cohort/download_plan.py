"""What the download stage will fetch, estimated from the index before any byte moves."""

from __future__ import annotations

from typing import Any

import pandas as pd

BYTES_PER_MB = 1_000_000  # series_size_MB is SUM(instance_size) / 1e6 in the IDC index
BYTES_PER_GB = 1_000_000_000


class DiskBudgetError(ValueError):
    """The cohort's estimated download is larger than cohort.disk_budget_GB."""


def download_plan(cohort: pd.DataFrame, n_shards: int) -> dict[str, Any]:
    """Series, files (instanceCount) and bytes (series_size_MB) per shard and in total.

    The budget is not part of the plan: it is a gate (:func:`check_budget`), so changing
    cohort.disk_budget_GB reruns nothing.
    """
    shards = []
    for shard in range(n_shards):
        part = cohort[cohort["shard"] == shard]
        shards.append(
            {
                "shard": shard,
                "series": len(part),
                "files": int(part["instanceCount"].sum()),
                "bytes": round(float(part["series_size_MB"].sum()) * BYTES_PER_MB),
            }
        )
    total_bytes = sum(s["bytes"] for s in shards)
    return {
        "n_shards": n_shards,
        "total": {
            "series": len(cohort),
            "files": sum(s["files"] for s in shards),
            "bytes": total_bytes,
            "GB": round(total_bytes / BYTES_PER_GB, 3),
        },
        "shards": shards,
    }


def check_budget(plan: dict[str, Any], budget_gb: float | None) -> None:
    """Raise DiskBudgetError with the estimate and the budget when the plan exceeds it."""
    if budget_gb is None or plan["total"]["bytes"] <= budget_gb * BYTES_PER_GB:
        return
    total = plan["total"]
    largest = max(plan["shards"], key=lambda s: s["bytes"])
    raise DiskBudgetError(
        f"the cohort's estimated download is {total['GB']:.3f} GB ({total['files']} files in "
        f"{total['series']} series; largest shard {largest['shard']}: "
        f"{largest['bytes'] / BYTES_PER_GB:.3f} GB), over cohort.disk_budget_GB = "
        f"{budget_gb} GB. Lower the strata's max_series / max_instances, or "
        "raise cohort.disk_budget_GB (null = no limit)."
    )
