"""Run benchmarks and write docs/BENCHMARKS.md.

Each `bench/bench_<name>.py` defines `run() -> dict` that times a candidate against a named
baseline *in the same run* and returns::

    {"title": str, "what": str,                       # one line each
     "baseline": {"label": str, "value": float}, "candidate": {"label": str, "value": float},
     "unit": str, "higher_is_better": bool,
     "ratio": float,                                  # candidate vs baseline, > 1 = better
     "goal": str, "goal_met": bool, "details": dict}

Usage: `python bench/run.py [name ...]` (all by default). Results land in
`bench/results/<name>.json` with the machine and date; docs/BENCHMARKS.md is rendered from
every results file, so running one benchmark keeps the others' latest numbers.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
DOC = BENCH.parent / "docs" / "BENCHMARKS.md"


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_GiB"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def load(name: str):
    path = BENCH / f"bench_{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in BENCH.glob("bench_*.py"))


def render(results: list[dict]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python bench/run.py`); each benchmark times our code against a",
        "named baseline in the same run on the same machine. Ratio > 1 means ours is better.",
        "",
        "| benchmark | ours | baseline | ratio | goal | met | machine | date |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["machine"]
        where = m.get("gpu") or f"{m['cores']}-core {m['cpu']}"
        lines.append(
            f"| [{r['title']}](#{r['name']}) | {r['candidate']['value']:.4g} {r['unit']} "
            f"| {r['baseline']['value']:.4g} {r['unit']} | {r['ratio']:.2f}× | {r['goal']} "
            f"| {'yes' if r['goal_met'] else 'no'} | {where} | {r['date']} |"
        )
    for r in results:
        lines += [
            "",
            f"## {r['name']}",
            "",
            r["what"],
            "",
            f"- ours: {r['candidate']['label']} — {r['candidate']['value']:.4g} {r['unit']}",
            f"- baseline: {r['baseline']['label']} — {r['baseline']['value']:.4g} {r['unit']}",
            f"- ratio: {r['ratio']:.2f}× (goal {r['goal']}: "
            f"{'met' if r['goal_met'] else 'not met'})",
            f"- machine: {json.dumps(r['machine'])}",
            f"- date: {r['date']}",
        ]
        if r.get("table"):  # a benchmark's own readable table (markdown lines)
            lines += ["", *r["table"], ""]
        if r.get("details"):
            lines.append(f"- details: `{json.dumps(r['details'], sort_keys=True)}`")
    return "\n".join(lines) + "\n"


def main(names: list[str]) -> int:
    RESULTS.mkdir(exist_ok=True)
    for name in names or available():
        print(f"== {name}", flush=True)
        result = load(name).run()
        result.update(name=name, machine=machine(), date=dt.date.today().isoformat())
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(json.dumps({k: result[k] for k in ("candidate", "baseline", "ratio", "goal_met")}))
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    DOC.write_text(render(results))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
