"""DAG build time of a 10,000-series, 64-shard run (`snakemake -n`), against 1 shard.

The cohort stage runs for real first (10,000 chest CT series from the bundled index), so
the dry run sees the cohort file a real run would have; the job count depends on shards.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def dry_run(workdir: Path, config: Path) -> float:
    """Seconds for `snakemake -n` (best of 3)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(
            [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
             "-n", "--configfile", str(config)],
            check=True, capture_output=True,
        )  # fmt: skip
        best = min(best, time.perf_counter() - start)
    return best


def run() -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["train"]["base_model"] = "tiny"  # the DAG alone: no hub request at start-up
    config["cohort"]["strata"] = [{**config["cohort"]["strata"][0], "max_series": 10_000}]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        timings = {}
        for shards in (1, 64):
            config["n_shards"] = shards
            path = work / f"config-{shards}.yaml"
            path.write_text(yaml.safe_dump(config))
            subprocess.run(
                [sys.executable, "-m", "idc_diffusion", "cohort", "--config", str(path),
                 "--out-dir", str(work / "results" / "cohort")],
                check=True, capture_output=True,
            )  # fmt: skip
            timings[shards] = dry_run(work, path)
    return {
        "title": "DAG of a 10,000-series run",
        "what": "`snakemake -n` on config.yaml's chest CT stratum capped at 10,000 series "
        "(cohort stage run for real first): 64 shards against the same cohort in 1 shard.",
        "baseline": {"label": "1 shard", "value": timings[1]},
        "candidate": {"label": "64 shards", "value": timings[64]},
        "unit": "s",
        "higher_is_better": False,
        "ratio": timings[1] / timings[64],
        "goal": "64 shards < 10 s",
        "goal_met": timings[64] < 10.0,
        "details": {"series": 10_000},
    }
