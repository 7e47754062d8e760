"""Command line: one subcommand per workflow stage (`python -m idc_diffusion STAGE ...`).

Each Snakemake rule runs exactly one of these commands with its config section as JSON
(`--settings`), so a stage can be rerun by hand with the same arguments the rule used.
`--config FILE` instead reads a whole workflow config and validates it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from idc_diffusion.core.config import ConfigError, load_config
from idc_diffusion.core.owner import FolderBusy, owned
from idc_diffusion.core.rerun import merge

log = logging.getLogger("idc_diffusion")
BASE_DIR_HELP = "the base_model stage's folder (what rules pass); default: train.base_model"


@functools.cache
def _config_file(path: str) -> dict:
    """A --config file, parsed and validated once per process (YAML + schema take ~0.4 s)."""
    return load_config(path)


def _settings(args: argparse.Namespace, section: str) -> dict:
    """The stage's config section: from --settings JSON (rules) or --config YAML (by hand).

    Rules pass the settings that change the stage's outputs as --settings and the ones that
    only change how the job runs as --runtime (idc_diffusion.core.rerun); merged back here.
    """
    if args.config:
        return _config_file(args.config)[section]
    return merge(json.loads(args.settings), json.loads(getattr(args, "runtime", None) or "{}"))


def _top_level(args: argparse.Namespace, key: str) -> Any:
    """A top-level config value: the flag if given, else the --config file's value."""
    value = getattr(args, key)
    if value is not None:
        return value
    if args.config:
        return _config_file(args.config)[key]
    raise ConfigError(f"--{key.replace('_', '-')} is required with --settings")


def _shard_rows(cohort: Path, shard: int) -> pd.DataFrame:
    frame = pd.read_parquet(cohort)
    return frame[frame["shard"] == shard].reset_index(drop=True)


def _writer(out_dir: Path) -> contextlib.AbstractContextManager:
    """The output folder's owner lock (:mod:`idc_diffusion.core.owner`), held by the process that
    writes it: rank 0 under a DDP launch."""
    return owned(out_dir) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()


def cmd_cohort(args: argparse.Namespace) -> None:
    from idc_diffusion.cohort.selection import run_cohort

    run_cohort(
        _settings(args, "cohort"),
        _top_level(args, "seed"),
        _top_level(args, "n_shards"),
        Path(args.out_dir),
        explain=args.explain,
    )


def cmd_download(args: argparse.Namespace) -> None:
    from idc_diffusion.download.shard import (
        DownloadFailed,
        DownloadInterrupted,
        download_shard,
        signals_interrupt,
    )

    rows = _shard_rows(Path(args.cohort), args.shard)
    settings = _settings(args, "download")
    try:
        with _writer(Path(args.out_dir)), signals_interrupt():
            download_shard(rows, args.shard, Path(args.out_dir), Path(args.report), settings)
    except DownloadFailed as exc:  # the report is written (shard-K.failed.json); stop here
        log.error("download failed:\n%s", exc)
        print(f"idc-diffusion download: error: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
    except DownloadInterrupted as stop:  # verified series are kept; a rerun resumes
        print(f"idc-diffusion download: {stop}; rerun to resume", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except FileNotFoundError:
        raise  # a setup problem (no s5cmd, no cohort): main() words it
    except OSError as exc:  # disk full, read-only folder: one line, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"idc-diffusion download: error: {exc.strerror or exc}{where}", file=sys.stderr)
        raise SystemExit(4) from None


def cmd_prepare(args: argparse.Namespace) -> None:
    from idc_diffusion.prepare.shard import prepare_shard

    rows = _shard_rows(Path(args.cohort), args.shard)
    report = json.loads(Path(args.report).read_text())
    prepare_shard(
        rows,
        report,
        Path(args.dicom_dir),
        Path(args.out_dir),
        _settings(args, "prepare"),
        args.shard,
        workers=args.workers,
    )


def cmd_dataset(args: argparse.Namespace) -> None:
    from idc_diffusion.prepare.dataset import build_imagefolder

    build_imagefolder(
        [Path(p) for p in args.shards], Path(args.out_dir), [Path(p) for p in args.reports]
    )


def cmd_base_model(args: argparse.Namespace) -> None:
    from idc_diffusion.train.base_model import base_settings, fetch_base_model, pin_snippet

    settings = base_settings(_settings(args, "train"))
    resolution = args.resolution
    if resolution is None:  # the tiny model's size: the prepared images'
        resolution = _config_file(args.config)["prepare"]["resolution"] if args.config else 64
    dataset_dir = Path(args.dataset_dir) if args.dataset_dir else None
    manifest = fetch_base_model(settings, Path(args.out_dir), resolution, dataset_dir)
    log.info(
        "base model %s (revision %s, %d files) in %s; to pin exactly these weights:\n%s",
        manifest["source"], manifest["revision"], len(manifest["files"]), args.out_dir,
        pin_snippet(manifest),
    )  # fmt: skip


def cmd_latents(args: argparse.Namespace) -> None:
    require_cuda(args.gpus)
    from idc_diffusion.train.encode_latents import encode_latents

    encode_latents(
        _settings(args, "train"),
        Path(args.dataset_dir),
        Path(args.out_dir),
        base_dir=Path(args.base_dir) if args.base_dir else None,
        batch_size=args.batch_size,
    )


def cmd_train(args: argparse.Namespace) -> None:
    require_cuda(args.gpus)
    from idc_diffusion.train.fine_tune import TrainingInterrupted, train

    base_dir = Path(args.base_dir) if args.base_dir else None
    latent_dir = Path(args.latent_dir) if args.latent_dir else None
    try:
        with _writer(Path(args.out_dir)):
            train(  # no card: the model-card stage writes it (a new run name never retrains)
                _settings(args, "train"),
                Path(args.dataset_dir),
                Path(args.out_dir),
                None,
                latent_dir=latent_dir,
                base_dir=base_dir,
            )
    except TrainingInterrupted as stop:  # checkpoint written: exit like the signal would
        print(f"train: {stop}; rerun to resume", file=sys.stderr)
        sys.exit(128 + stop.signum)


def cmd_model_card(args: argparse.Namespace) -> None:
    from idc_diffusion.train.model_card import card_provenance, write_model_card

    provenance = card_provenance(
        _top_level(args, "run_name"),
        Path(args.cohort_dir),
        Path(args.base_dir) if args.base_dir else None,
    )
    out = Path(args.out) if args.out else None
    path = write_model_card(Path(args.model_dir), _settings(args, "train"), provenance, out)
    log.info("model card: %s", path)


def cmd_sample(args: argparse.Namespace) -> None:
    require_cuda(args.gpus)
    from idc_diffusion.sample.generate import sample_shard

    settings = _settings(args, "sample")
    whole = _config_file(args.config) if args.config else None
    try:
        caption = json.loads(args.caption) if args.caption else None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--caption: not JSON ({exc}); pass prepare.caption as JSON") from exc
    if caption is None and whole is not None:
        caption = whole["prepare"]["caption"]
    sample_shard(
        settings,
        Path(args.model_dir),
        Path(args.dataset_dir),
        Path(args.out_dir),
        args.shard,
        caption=caption,
    )


def cmd_sample_manifest(args: argparse.Namespace) -> None:
    from idc_diffusion.sample.generate import merge_manifests

    whole = _config_file(args.config) if args.config else None
    export = args.dicom_export
    if export is None:
        export = bool(whole["sample"]["dicom_export"]) if whole else False
    run_name = args.run_name or (whole["run_name"] if whole else "idc-diffusion")
    merge_manifests(
        [Path(p) for p in args.shards],
        Path(args.out),
        dicom_dir=(Path(args.dicom_dir or Path(args.out).parent / "dicom") if export else None),
        run_name=run_name,
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from idc_diffusion.evaluate.evaluation import evaluate

    run_config = _config_file(args.config) if args.config else json.loads(args.run_config)
    evaluate(
        _settings(args, "evaluate"),
        samples_dir=Path(args.samples_dir),
        dataset_dir=Path(args.dataset_dir),
        model_dir=Path(args.model_dir),
        cohort_dir=Path(args.cohort_dir),
        out_dir=Path(args.out_dir),
        config=run_config,
        base_samples_dir=Path(args.base_samples_dir) if args.base_samples_dir else None,
    )


def require_cuda(gpus: int) -> None:
    """launch.require_cuda, imported only by the GPU stages (it needs torch)."""
    from idc_diffusion.train.launch import require_cuda as check

    check(gpus)


def _add_gpus(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus",
        type=int,
        default=0,
        help="GPUs the job was given (the rule's gpu resource); > 0 without CUDA is an error",
    )


def _add_settings(parser: argparse.ArgumentParser, runtime: bool = False) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--settings", help="the stage's config section as JSON (what rules pass; see --runtime)"
    )
    group.add_argument(
        "--config", help="a whole workflow config YAML, validated against the schema"
    )
    if runtime:
        parser.add_argument(
            "--runtime",
            help="with --settings: the section's settings that change no output (workers, "
            "retries, intervals), as JSON merged into it; rules pass them apart so that a "
            "change reruns nothing",
        )


def _add_cohort_commands(sub: argparse._SubParsersAction) -> None:
    """Add the cohort stage's command."""
    p = sub.add_parser("cohort", help="select series from the IDC index; split and shard them")
    _add_settings(p, runtime=True)
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("--n-shards", type=int, help="overrides the config's n_shards")
    p.add_argument("--out-dir", default="results/cohort")
    p.add_argument(
        "--explain",
        action="store_true",
        help="print each stratum's SQL and the series count after each filter; write nothing",
    )
    p.set_defaults(func=cmd_cohort)


def _add_download_commands(sub: argparse._SubParsersAction) -> None:
    """Add the download stage's command."""
    p = sub.add_parser("download", help="fetch, link or synthesise one shard's series; verify them")
    _add_settings(p, runtime=True)
    p.add_argument("--cohort", default="results/cohort/cohort.parquet")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--out-dir", required=True, help="results/dicom/shard-K")
    p.add_argument("--report", required=True, help="results/dicom/shard-K.json")
    p.set_defaults(func=cmd_download)


def _add_prepare_commands(sub: argparse._SubParsersAction) -> None:
    """Add the prepare stage's commands: one shard, then the merged dataset."""
    p = sub.add_parser("prepare", help="window, select slices and caption one shard")
    _add_settings(p)
    p.add_argument("--cohort", default="results/cohort/cohort.parquet")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--dicom-dir", required=True, help="results/dicom/shard-K")
    p.add_argument("--report", required=True, help="results/dicom/shard-K.json")
    p.add_argument("--out-dir", required=True, help="results/dataset/shard-K")
    p.add_argument("--workers", type=int, default=1, help="series prepared in parallel")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("dataset", help="merge prepared shards into the imagefolder view")
    p.add_argument("--shards", nargs="*", default=[], help="results/dataset/shard-K folders")
    p.add_argument("--reports", nargs="*", default=[], help="results/dicom/shard-K.json files")
    p.add_argument("--out-dir", default="results/dataset")
    p.set_defaults(func=cmd_dataset)


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    """Add the train stage's commands: base model, latent cache, fine-tuning, model card."""
    p = sub.add_parser(
        "base-model", help="fetch (hub id), copy (folder) or build (tiny) the base pipeline"
    )
    _add_settings(p, runtime=True)
    p.add_argument("--out-dir", default="results/base_model")
    p.add_argument(
        "--resolution",
        type=int,
        help="tiny model: image side (default: --config's prepare.resolution, else 64)",
    )
    p.add_argument("--dataset-dir", help="tiny model: the dataset whose train split fits its VAE")
    p.set_defaults(func=cmd_base_model)

    p = sub.add_parser(
        "latents", help="encode the train and held-out splits once with the base VAE"
    )
    _add_settings(p)
    p.add_argument("--base-dir", help=BASE_DIR_HELP)
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward pass")
    p.add_argument("--dataset-dir", default="results/dataset")
    p.add_argument("--out-dir", default="results/latents")
    _add_gpus(p)
    p.set_defaults(func=cmd_latents)

    p = sub.add_parser("train", help="fine-tune the UNet of a Stable Diffusion 2.x pipeline")
    _add_settings(p, runtime=True)
    p.add_argument("--base-dir", help=BASE_DIR_HELP)
    p.add_argument("--dataset-dir", default="results/dataset")
    for old in ("--run-name", "--cohort-dir"):  # the card's inputs, now model-card's
        p.add_argument(old, help="ignored (kept for older command lines): see model-card")
    p.add_argument("--out-dir", default="results/model")
    p.add_argument(
        "--latent-dir",
        default="results/latents",
        help="shared latent cache tried first when train.use_latent_cache is on",
    )
    _add_gpus(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "model-card", help="model_card.md of a trained model: run name, data, base, training"
    )
    _add_settings(p)
    p.add_argument("--run-name", help="overrides the config's run_name")
    p.add_argument("--model-dir", default="results/model", help="holds train_summary.json")
    p.add_argument("--cohort-dir", default="results/cohort")
    p.add_argument("--base-dir", help="the base_model stage's folder (its manifest.json)")
    p.add_argument("--out", help="default: MODEL_DIR/model_card.md")
    p.set_defaults(func=cmd_model_card)


def _add_sample_commands(sub: argparse._SubParsersAction) -> None:
    """Add the sample stage's commands: one shard, then the merged manifest."""
    p = sub.add_parser("sample", help="generate one sample shard's images")
    _add_settings(p)
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--model-dir", default="results/model")
    p.add_argument("--dataset-dir", default="results/dataset")
    p.add_argument("--out-dir", required=True, help="results/samples/shard-K")
    p.add_argument("--caption", help="prepare.caption as JSON (for prompts: grid)")
    _add_gpus(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "sample-manifest",
        help="merge sample shards into manifest.parquet; write the DICOM export",
    )
    p.add_argument("--shards", nargs="+", required=True, help="results/samples/shard-K folders")
    p.add_argument("--out", default="results/samples/manifest.parquet")
    p.add_argument("--config", help="a whole workflow config YAML (sample.dicom_export, run_name)")
    p.add_argument(
        "--dicom-export",
        type=lambda text: json.loads(text.lower()),
        help="true/false: write each image as DICOM Secondary Capture (default: --config's "
        "sample.dicom_export, else false)",
    )
    p.add_argument("--dicom-dir", help="default: dicom/ beside --out")
    p.add_argument("--run-name", help="names the synthetic DICOM patient (default: config's)")
    p.set_defaults(func=cmd_sample_manifest)


def _add_evaluate_commands(sub: argparse._SubParsersAction) -> None:
    """Add the evaluate stage's command."""
    p = sub.add_parser("evaluate", help="metrics.json and report.html")
    _add_settings(p)
    p.add_argument("--run-config", default="{}", help="the whole config as JSON (provenance)")
    p.add_argument("--samples-dir", default="results/samples")
    p.add_argument(
        "--base-samples-dir",
        help="the base model's samples of the same prompts (results/samples_base); compared",
    )
    p.add_argument("--dataset-dir", default="results/dataset")
    p.add_argument("--model-dir", default="results/model")
    p.add_argument("--cohort-dir", default="results/cohort")
    p.add_argument("--out-dir", default="results/eval")
    p.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idc-diffusion", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True)
    _add_cohort_commands(sub)
    _add_download_commands(sub)
    _add_prepare_commands(sub)
    _add_train_commands(sub)
    _add_sample_commands(sub)
    _add_evaluate_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (ConfigError, ValueError, FileNotFoundError, FolderBusy) as exc:
        log.error("%s failed: %s", args.stage, exc)
        print(f"idc-diffusion {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    return 0
