"""Resume after an interrupt: bytes fetched twice when the download job is stopped (SIGTERM,
as a SLURM time limit sends) once half the shard has landed and then rerun.

Both runs serve the same shard from one ``moto_server`` child process and count object
GETs in its request log. Ours: the rerun keeps ``.partial/`` and fetches only the objects
still missing. Baseline: the same interrupt, then a rerun from an empty shard folder (what
the stage did before, when series were promoted only after the whole s5cmd run and each
run began by clearing ``.partial/``). Re-fetched bytes = all object GETs of both runs x the
object size - the shard's bytes; a GET cut short by the interrupt counts in full, so this
is an upper bound.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH)]

from bench_download import FILES_PER_SERIES, REPO, cohort, upload  # noqa: E402
from s3_server import moto_process  # noqa: E402

TOTAL_MB = int(os.environ.get("BENCH_RESUME_MB", "512"))
WORKERS = 16  # download.s5cmd_workers' default
OBJECT_BYTES = None  # set from the upload


def landed_bytes(shard_dir: Path) -> int:
    """Bytes of complete objects in the shard folder (promoted or in .partial)."""
    folders = [*shard_dir.glob("1.*"), *(shard_dir / ".partial").glob("1.*")]
    return sum(p.stat().st_size for f in folders for p in f.glob("*.dcm") if p.is_file())


def download_argv(url: str, cohort_path: Path, shard_dir: Path) -> list[str]:
    settings = {
        "source": "idc",
        "provider": "custom",
        "endpoint_url": url,
        "s5cmd_workers": WORKERS,
        "retries": 0,
        "max_failed_fraction": 0.0,
    }
    return [
        sys.executable, "-m", "idc_diffusion", "download", "--settings", json.dumps(settings),
        "--cohort", str(cohort_path), "--shard", "0", "--out-dir", str(shard_dir),
        "--report", str(shard_dir.parent / "shard-0.json"),
    ]  # fmt: skip


def interrupted_run(argv: list[str], shard_dir: Path, size: int) -> int:
    """Start the download CLI, SIGTERM it once half the shard has landed; its exit status."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    client = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while landed_bytes(shard_dir) < size / 2:
        if client.poll() is not None:
            raise RuntimeError(f"the download ended before half had landed ({client.returncode})")
        time.sleep(0.005)
    client.send_signal(signal.SIGTERM)
    return client.wait(60)


def refetched_fraction(s3, argv: list[str], shard_dir: Path, size: int, fresh: bool) -> dict:
    """Interrupt at 50%, rerun (from an empty folder when ``fresh``); bytes fetched twice."""
    start = sum(s3.object_gets().values())
    code = interrupted_run(argv, shard_dir, size)
    first = sum(s3.object_gets().values()) - start
    if fresh:
        shutil.rmtree(shard_dir)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    second = sum(s3.object_gets().values()) - start - first
    report = json.loads((shard_dir.parent / "shard-0.json").read_text())
    assert report["counts"]["ok"] == len(report["series"]), report["counts"]
    twice = (first + second) * OBJECT_BYTES - size
    return {"exit": code, "gets_first": first, "gets_rerun": second, "fraction": twice / size}


def run() -> dict:
    global OBJECT_BYTES
    rows = cohort(max(1, TOTAL_MB * 2 // FILES_PER_SERIES))
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        work = Path(tmp)
        with moto_process(log_path=work / "server.log") as s3:
            size = upload(s3, rows, work)
            OBJECT_BYTES = size // (len(rows) * FILES_PER_SERIES)
            cohort_path = work / "cohort.parquet"
            pd.DataFrame(rows).to_parquet(cohort_path)
            results = {}
            for name, fresh in (("ours", False), ("restart", True)):
                shard_dir = work / name / "shard-0"
                shard_dir.parent.mkdir()
                argv = download_argv(s3.url, cohort_path, shard_dir)
                results[name] = refetched_fraction(s3, argv, shard_dir, size, fresh)
    ours, base = results["ours"]["fraction"], results["restart"]["fraction"]
    return {
        "title": "Resume after an interrupt at 50%",
        "what": (
            f"bytes fetched twice when the download CLI gets SIGTERM once half of a "
            f"{size / 1e6:.0f} MB shard ({len(rows)} series x {FILES_PER_SERIES} objects of "
            f"512 KB, {WORKERS} s5cmd workers) has landed, then reruns; as a share of the "
            "shard, counted from the moto server's GET log (upper bound)."
        ),
        "baseline": {"label": "rerun from an empty shard folder", "value": 100 * base},
        "candidate": {"label": "rerun keeping .partial/", "value": 100 * ours},
        "unit": "% of the shard",
        "higher_is_better": False,
        "ratio": base / max(ours, 1e-9),
        "goal": "< 5% of the shard re-fetched",
        "goal_met": ours < 0.05,
        "details": {"bytes": size, "runs": results, "scale": f"{TOTAL_MB} MB (BENCH_RESUME_MB)"},
    }


if __name__ == "__main__":
    print(run())
