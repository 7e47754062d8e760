"""Demo quality: `make demo`'s fine-tuned model against its base, with the FID Inception net.

Runs the whole demo workflow (config/demo.yaml, 2 cores) in a fresh folder and reads its
``results/eval/metrics.json``: KID and FID of the fine-tuned and the base model's samples
(same prompts and seeds) against the real test images, the real-vs-real floor (test vs train
images), and prompt adherence per caption field against the real-image ceiling. The wall
time is the workflow's on this machine; the CPU time (all jobs, user + system) is reported
beside it because other processes may share the cores.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WHAT = (
    "`make demo` (config/demo.yaml, 2 cores) in a fresh folder: KID/FID (FID Inception) of the "
    "fine-tuned and the base model's samples against the real test images, the real-vs-real "
    "floor (test vs train images), prompt adherence per caption field against the real-image "
    "ceiling, and the workflow's wall and CPU time (all jobs, user + system)."
)
GOAL = "fine-tuned KID <= 0.5x base; modality adherence >= 0.9, window >= 0.8; demo < 5 min"


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_demo(workdir: Path) -> tuple[float, float]:
    """Run the demo workflow in `workdir`; (wall seconds, CPU seconds of every job)."""
    snakemake = Path(sys.executable).parent / "snakemake"
    cpu, began = children_cpu_s(), time.perf_counter()
    subprocess.run(
        [str(snakemake), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--profile", str(REPO / "profiles" / "local"),
         "--configfile", str(REPO / "config" / "demo.yaml"), "-c2", "--quiet"],
        check=True,
    )  # fmt: skip
    return time.perf_counter() - began, children_cpu_s() - cpu


def _kid(fid: dict[str, Any]) -> str:
    low, high = fid["kid_ci"]
    return f"{fid['kid']:.4f} [{low:.4f}, {high:.4f}]"


def summarize(metrics: dict[str, Any], wall_s: float, cpu_s: float) -> dict[str, Any]:
    """The benchmark record of one demo run's metrics.json."""
    tuned, base = metrics["fid_kid"], metrics["base_model"]["fid_kid"]
    floor = metrics["real_floor"]
    by_field = metrics["adherence"]["by_field"]
    adherence = {
        field: {
            key: (r.get(key) or {}).get("accuracy") for key in ("fine_tuned", "base", "real_test")
        }
        for field, r in by_field.items()
    }
    ratio = base["kid"] / tuned["kid"] if tuned["kid"] > 0 else float("inf")
    met = (
        ratio >= 2
        and (adherence.get("modality", {}).get("fine_tuned") or 0) >= 0.9
        and (adherence.get("window", {}).get("fine_tuned") or 0) >= 0.8
        and wall_s < 300
    )
    n_fake, n_real = tuned["n_generated"], tuned["n_real"]
    table = [
        "| metric | base model | fine-tuned | real vs real (floor / ceiling) | n |",
        "|---|---|---|---|---|",
        f"| KID ↓ (unbiased, 95 % interval) | {_kid(base)} | {_kid(tuned)} | {_kid(floor)} "
        f"| {n_fake} generated per model vs {n_real} real test; "
        f"floor {floor['n_real']} test vs {floor['n_generated']} train |",
        f"| FID ↓ (biased at this n) | {base['fid']:.1f} | {tuned['fid']:.1f} "
        f"| {floor['fid']:.1f} | as KID |",
    ]
    for field, scores in adherence.items():
        cells = [f"{v:.2f}" if v is not None else "—" for v in
                 (scores["base"], scores["fine_tuned"], scores["real_test"])]  # fmt: skip
        n = by_field[field]
        table.append(
            f"| adherence: {field} ↑ | {' | '.join(cells)} | {n['fine_tuned']['n']} samples, "
            f"{n['real_test']['n']} real test |"
        )
    table.append(f"| workflow time, 2 cores | | {wall_s:.0f} s wall, {cpu_s:.0f} s CPU | | |")
    return {
        "table": table,
        "title": "Demo quality: fine-tuned vs base (KID, FID Inception)",
        "what": WHAT,
        "candidate": {"label": "fine-tuned model, KID", "value": tuned["kid"]},
        "baseline": {"label": "base model, same prompts and seeds, KID", "value": base["kid"]},
        "unit": "KID",
        "higher_is_better": False,
        "ratio": ratio,
        "goal": GOAL,
        "goal_met": bool(met),
        "details": {
            "n_generated_per_model": tuned["n_generated"],
            "n_real_test": tuned["n_real"],
            "fid_fine_tuned": tuned["fid"],
            "fid_base": base["fid"],
            "kid_ci_fine_tuned": tuned["kid_ci"],
            "kid_ci_base": base["kid_ci"],
            "floor_real_test_vs_train": {
                "kid": floor["kid"], "kid_ci": floor["kid_ci"], "fid": floor["fid"],
                "n_test": floor["n_real"], "n_train": floor["n_generated"],
            },
            "adherence_accuracy": adherence,
            "adherence_n": {f: r["fine_tuned"]["n"] for f, r in by_field.items()},
            "demo_wall_s": round(wall_s, 1),
            "demo_cpu_s": round(cpu_s, 1),
        },
    }  # fmt: skip


def run() -> dict[str, Any]:
    import json

    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = run_demo(Path(tmp))
        metrics = json.loads((Path(tmp) / "results" / "eval" / "metrics.json").read_text())
    return summarize(metrics, wall, cpu)
