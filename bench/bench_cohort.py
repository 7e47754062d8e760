"""Cohort selection on the full bundled IDC index: our CLI vs idc-index's IDCClient.sql_query.

Both sides run as fresh subprocesses, start-up included, on the 3-stratum spec of
config/config.yaml (chest CT, brain MR, chest radiographs; ~1M series). The candidate is
`python -m idc_diffusion cohort --config config/config.yaml` (selection plus cohort.parquet,
CITATIONS.md, summary.json and download_plan.json). The baseline constructs
`idc_index.IDCClient()` and runs the same SQL per stratum (license counts and the seeded
selection, from cohort_spec) against its `index` table; it writes nothing. Both must select
the same series. Peak RSS comes from os.wait4 on each child.

The same run also times two floors that bound any cohort stage on this machine: a process
that only imports the cohort stage's modules (start-up included), and one DuckDB pass that
only decodes the columns the filters read from the index parquet (timed inside its
process, after the import). Their sum is the least time an
implementation that imports what ours imports can take; `ratio_ceiling` is the baseline over
that sum.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config" / "config.yaml"
REPEATS = 3

BASELINE = r"""
import json, sys
from idc_index import IDCClient
queries = json.load(open(sys.argv[1]))
client = IDCClient()
out = {}
for name, (licenses, selection) in queries.items():
    client.sql_query(licenses)
    out[name] = list(client.sql_query(selection)["SeriesInstanceUID"])
json.dump(out, open(sys.argv[2], "w"))
"""


FILTER_COLUMNS = (
    "SeriesInstanceUID", "PatientID", "collection_id", "Modality", "SOPClassUID",
    "analysis_result_id", "BodyPartExamined", "instanceCount", "SeriesDescription",
    "license_short_name",
)  # fmt: skip

DECODE = r"""
import sys, time, duckdb
columns = sys.argv[2].split(",")
lengths = ", ".join(f"max(length(CAST({c} AS VARCHAR)))" for c in columns)
start = time.perf_counter()
duckdb.connect().execute(f"SELECT {lengths} FROM read_parquet(?)", [sys.argv[1]]).fetchall()
print(time.perf_counter() - start)
"""


def _timed(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MiB) and CPU seconds of one child; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def _baseline_queries() -> dict[str, list[str]]:
    """The SQL our DuckDB backend runs per stratum, over idc-index's `index` table."""
    from idc_diffusion.cohort.filter_sql import DUCKDB, license_counts_sql, stratum_steps
    from idc_diffusion.cohort.idc_index import DuckDBIndex, bundled_index, human_collections
    from idc_diffusion.cohort.selection import select_strata
    from idc_diffusion.core.config import load_config

    cfg = load_config(CONFIG)
    files = bundled_index()
    ours = DuckDBIndex(files)
    results = select_strata(files, cfg["cohort"], cfg["seed"], ours)
    ours.close()
    humans, taken, queries = human_collections(files), [], {}
    source = DuckDBIndex(files).source_sql()
    for stratum, result in zip(cfg["cohort"]["strata"], results, strict=True):
        steps = stratum_steps(stratum, cfg["cohort"], humans, taken, DUCKDB)
        queries[stratum["name"]] = [
            license_counts_sql("SELECT * FROM index", steps),
            result.sql.replace(source, "SELECT * FROM index"),
        ]
        taken += list(result.selected["SeriesInstanceUID"])
    return queries


def run() -> dict:
    import pandas as pd

    queries = _baseline_queries()
    with tempfile.TemporaryDirectory() as tmp:
        qfile, bfile = Path(tmp) / "queries.json", Path(tmp) / "baseline.json"
        qfile.write_text(json.dumps(queries))
        out = Path(tmp) / "cohort"
        candidate_cmd = [sys.executable, "-m", "idc_diffusion", "cohort", "--config"]
        candidate_cmd += [str(CONFIG), "--out-dir", str(out)]
        baseline_cmd = [sys.executable, "-c", BASELINE, str(qfile), str(bfile)]
        from idc_diffusion.cohort.idc_index import bundled_index

        import_cmd = [
            sys.executable,
            "-c",
            "import idc_diffusion.cli, idc_diffusion.cohort.selection",
        ]
        decode_cmd = [sys.executable, "-c", DECODE, str(bundled_index().series)]
        decode_cmd.append(",".join(FILTER_COLUMNS))
        cand, base, imports, decode = [], [], [], []
        for _ in range(REPEATS):  # interleaved, so load from other jobs hits both
            cand.append(_timed(candidate_cmd))
            base.append(_timed(baseline_cmd))
            imports.append(_timed(import_cmd)[0])
            decode.append(float(subprocess.check_output(decode_cmd, cwd=REPO)))
        cohort = pd.read_parquet(out / "cohort.parquet")
        picked = json.loads(bfile.read_text())
    same = all(
        list(cohort.loc[cohort["stratum"] == name, "SeriesInstanceUID"].sort_values())
        == sorted(uids)
        for name, uids in picked.items()
    )
    c_wall, b_wall = min(w for w, _, _ in cand), min(w for w, _, _ in base)
    c_rss, b_rss = max(r for _, r, _ in cand), max(r for _, r, _ in base)
    ratio = b_wall / c_wall
    floor = min(imports) + min(decode)
    return {
        "title": "Cohort selection, full IDC index, 3 strata (end to end)",
        "what": "CLI cohort stage (subprocess, start-up included) vs IDCClient().sql_query "
        "with the same SQL",
        "baseline": {"label": "idc-index IDCClient + sql_query", "value": round(b_wall, 3)},
        "candidate": {"label": "python -m idc_diffusion cohort", "value": round(c_wall, 3)},
        "unit": "s (best of 3)",
        "higher_is_better": False,
        "ratio": round(ratio, 2),
        "goal": ">= 10x faster and < 1 GiB peak RSS, same series",
        "goal_met": bool(ratio >= 10 and c_rss < 1024 and same),
        "details": {
            "series_selected": len(cohort),
            "same_series_as_baseline": same,
            "candidate_peak_rss_MiB": round(c_rss, 1),
            "baseline_peak_rss_MiB": round(b_rss, 1),
            "candidate_walls_s": [round(w, 3) for w, _, _ in cand],
            "baseline_walls_s": [round(w, 3) for w, _, _ in base],
            "candidate_cpu_s": [round(c, 3) for _, _, c in cand],
            "baseline_cpu_s": [round(c, 3) for _, _, c in base],
            "cpu_ratio": round(min(c for *_, c in base) / min(c for *_, c in cand), 2),
            "floor_import_s": round(min(imports), 3),
            "floor_decode_filter_columns_s": round(min(decode), 3),
            "ratio_ceiling": round(b_wall / floor, 2),
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
