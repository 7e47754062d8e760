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

The GPU benchmarks run on a GPU machine through `bench/gpu_session.sh`, which leaves its
raw output in a folder; `python bench/run.py --gpu-session FOLDER` records them here
(`gpu_train`, `gpu_sample`) with that machine, and re-renders the document.
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


def gpu_train_result(raw: dict) -> dict:
    """gpu_train_sd21.py's output as a benchmark result: ours on the latent cache vs
    diffusers' loop, gradient checkpointing off; every run (and MFU) in the details."""
    runs = raw["runs"]
    ours, reference = runs["ours, checkpointing off"], runs["reference, checkpointing off"]
    ratio = ours["images_per_s"] / reference["images_per_s"]
    return {
        "title": "Training throughput, SD 2.1-base on a GPU",
        "what": (
            f"images/s of fine_tune.train() ({raw['model']}, {raw['resolution']} px, batch "
            f"{raw['batch']}, {raw['precision']}) on the latent cache vs a loop mirroring "
            "diffusers' train_text_to_image.py (VAE encode every step), same weights, images "
            "and precision; median step after warm-up. Details: both without the cache and "
            "with gradient checkpointing, peak memory above the start, MFU against the GPU's "
            "dense peak."
        ),
        "baseline": {"label": "diffusers train_text_to_image.py loop",
                     "value": reference["images_per_s"]},
        "candidate": {"label": "train() with use_latent_cache", "value": ours["images_per_s"]},
        "unit": "images/s",
        "higher_is_better": True,
        "ratio": round(ratio, 3),
        "goal": ">= 1.25x",
        "goal_met": ratio >= 1.25,
        "table": [
            "| loop | gradient checkpointing | s/step | images/s | MFU | peak GiB |",
            "|---|---|---|---|---|---|",
            *(
                f"| {label.split(', ')[0]} | {label.split(' ')[-1]} | {run['s_per_step']} "
                f"| {run['images_per_s']} | {run['mfu']} | {run['peak_memory_GiB']} |"
                for label, run in runs.items()
            ),
        ],
        "details": raw,
    }  # fmt: skip


def gpu_machine(folder: Path) -> dict:
    """The GPU machine as gpu_session.sh wrote it (nvidia-smi's CSV line, then versions)."""
    lines = (folder / "machine.txt").read_text().splitlines()
    name, driver, memory = (x.strip() for x in lines[1].split(","))
    info = {"gpu": name, "driver": driver, "gpu_memory": memory}
    versions = lines[2].split()
    info.update(zip(versions[::2], versions[1::2], strict=True))
    return info


def record_gpu_session(folder: Path) -> list[dict]:
    """The results of one gpu_session.sh folder, with that machine and the folder's date."""
    machine_ = gpu_machine(folder)
    date = dt.date.fromtimestamp((folder / "machine.txt").stat().st_mtime).isoformat()
    results = []
    raw = {"gpu_train": folder / "gpu_train_sd21.json", "gpu_sample": folder / "gpu_sample.json"}
    for name, path in raw.items():
        if not path.is_file():
            print(f"{path}: missing (that step failed; see its .log)", file=sys.stderr)
            continue
        result = json.loads(path.read_text())
        if name == "gpu_train":
            result = gpu_train_result(result)
        results.append({**result, "name": name, "machine": machine_, "date": date})
    return results


def save(result: dict) -> None:
    (RESULTS / f"{result['name']}.json").write_text(
        json.dumps(result, indent=2, sort_keys=True) + "\n"
    )
    print(json.dumps({k: result[k] for k in ("candidate", "baseline", "ratio", "goal_met")}))


def main(names: list[str]) -> int:
    RESULTS.mkdir(exist_ok=True)
    if names[:1] == ["--gpu-session"]:
        for result in record_gpu_session(Path(names[1])):
            save(result)
    else:
        for name in names or available():
            print(f"== {name}", flush=True)
            result = load(name).run()
            save(
                {**result, "name": name, "machine": machine(), "date": dt.date.today().isoformat()}
            )
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    DOC.write_text(render(results))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
