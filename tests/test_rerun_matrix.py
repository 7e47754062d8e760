"""The rerun matrix: for every config key, the exact set of rules a change of it reruns.

Every key of config/schema.yaml (walked recursively, so a key added later is covered) has an
expectation in EXPECTED; a key without one fails. Each change is made in a config written
next to a hard-linked copy of the finished demo (the suite's demo run) and dry-run
(`snakemake -n`): the rules planned must be exactly the expected ones. Settings that change
no output (idc_diffusion.core.rerun.RUNTIME_ONLY) must plan nothing; they are checked together in
one dry run, and one by one only when that fails.

A dry run plans every job downstream of one that reruns; a real run can stop earlier when
a rewritten output is byte-identical (Snakemake compares checksums of small inputs).
"""

from __future__ import annotations

import copy
import json
import os
import queue
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import idc_index_data
import pytest
import yaml
from conftest import BIN, REPO

from idc_diffusion.core.config import load_config
from idc_diffusion.core.rerun import RUNTIME_ONLY, TOP_LEVEL_RUNTIME

pytestmark = pytest.mark.workflow

# What reruns, by the first stage a change reaches (the demo: tiny base, no latents rule).
EVALUATE = frozenset({"evaluate"})
SAMPLE = frozenset({"sample", "sample_manifest", "sample_base", "sample_base_manifest"}) | EVALUATE
TRAIN = frozenset({"train", "model_card", "sample", "sample_manifest"}) | EVALUATE
BASE = frozenset({"base_model"}) | TRAIN | SAMPLE  # the tiny base is fitted on the dataset
PREPARE = frozenset({"prepare", "dataset"}) | BASE
DOWNLOAD = frozenset({"download"}) | PREPARE
COHORT = frozenset({"cohort"}) | DOWNLOAD
# the rules that name the run: the card, the sample DICOM export (in the manifests), the report
NAMES = frozenset({"model_card", "sample_manifest", "sample_base_manifest"}) | EVALUATE
DICOM = frozenset({"sample_manifest", "sample_base_manifest"}) | EVALUATE
NOTHING: frozenset[str] = frozenset()
WORKERS = min(4, os.cpu_count() or 1)

Change = Callable[[dict], None]


def setting(key: str, value: Any) -> Change:
    def change(config: dict) -> None:
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value

    return change


def both(*changes: Change) -> Change:
    def change(config: dict) -> None:
        for one in changes:
            one(config)

    return change


def first_stratum(config: dict) -> None:
    config["cohort"]["strata"][0]["max_series"] -= 1


def lung_center(config: dict) -> None:
    config["prepare"]["window_presets"]["lung"]["center"] = -550


def fewer_parts(config: dict) -> None:
    config["prepare"]["caption"]["parts"] = config["prepare"]["caption"]["parts"][:-1]


def split(**fractions: float) -> Change:
    def change(config: dict) -> None:
        config["cohort"]["split"].update(fractions)

    return change


# Key -> (rules a change reruns, the change; None: one derived from the schema).
# A folder or file some changes name: a copy of the demo's base model (see `finished`).
BASE_COPY = "base-copy"
EXPECTED: dict[str, tuple[frozenset[str], Change | None]] = {
    "run_name": (NAMES, setting("run_name", "demo-renamed")),
    "seed": (COHORT, None),
    "n_shards": (COHORT, None),
    "local_rules": (NOTHING, setting("local_rules", ["cohort", "download"])),
    "gpu": (NOTHING, None),  # 0 -> 1: one training process either way
    "train_nodes": (NOTHING, None),
    "train_cpu_processes": (TRAIN, None),  # the demo trains on the CPU: 1 -> 2 processes
    # cohort
    "cohort.backend": (COHORT, None),
    "cohort.bigquery.project": (NOTHING, setting("cohort.bigquery.project", "billing-project")),
    "cohort.bigquery.dataset": (
        COHORT,
        setting("cohort.bigquery.dataset", "bigquery-public-data.idc_v25"),
    ),
    "cohort.disk_budget_GB": (NOTHING, None),
    "cohort.index_parquet": (
        COHORT,
        setting("cohort.index_parquet", str(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)),
    ),
    "cohort.license_allow": (COHORT, setting("cohort.license_allow", ["CC BY 4.0"])),
    "cohort.human_only": (COHORT, None),
    "cohort.exclude_derived": (COHORT, None),
    "cohort.exclude_description_regex": (
        COHORT,
        setting("cohort.exclude_description_regex", "(?i)localizer"),
    ),
    "cohort.split.train": (COHORT, split(train=0.6, val=0.15, test=0.25)),
    "cohort.split.val": (COHORT, split(train=0.5, val=0.2, test=0.3)),
    "cohort.split.test": (COHORT, split(train=0.55, val=0.25, test=0.2)),
    "cohort.strata": (COHORT, first_stratum),
    # download: only what changes the bytes or the report reruns it
    "download.source": (DOWNLOAD, setting("download.source", "idc")),
    "download.provider": (NOTHING, setting("download.provider", "gcs")),
    "download.endpoint_url": (
        NOTHING,
        both(
            setting("download.provider", "custom"),
            setting("download.endpoint_url", "http://127.0.0.1:9000"),
        ),
    ),
    "download.s5cmd_workers": (NOTHING, None),
    "download.s5cmd_retry_count": (NOTHING, None),
    "download.retries": (NOTHING, None),
    "download.retry_backoff_s": (NOTHING, None),
    "download.stall_timeout_s": (NOTHING, None),
    "download.max_failed_fraction": (NOTHING, None),
    "download.local_root": (DOWNLOAD, setting("download.local_root", "/srv/dicom")),
    "download.progress_interval_s": (NOTHING, None),
    "download.synthetic.matrix": (DOWNLOAD, None),
    "download.synthetic.seed": (DOWNLOAD, None),
    # prepare
    "prepare.resolution": (PREPARE, None),
    "prepare.slices_per_series": (PREPARE, None),
    "prepare.slice_band": (PREPARE, setting("prepare.slice_band", [0.2, 0.8])),
    "prepare.min_body_fraction": (PREPARE, None),
    "prepare.window_presets": (PREPARE, lung_center),
    "prepare.ct_windows": (
        PREPARE,
        setting("prepare.ct_windows", {"CHEST": ["lung"], "default": ["abdomen"]}),
    ),
    "prepare.mr_percentiles": (PREPARE, setting("prepare.mr_percentiles", [2.0, 98.0])),
    "prepare.slice_selection": (PREPARE, None),
    "prepare.slice_positions": (PREPARE, setting("prepare.slice_positions", [0.5])),
    "prepare.min_slice_std": (PREPARE, None),
    "prepare.field_of_view_mm": (PREPARE, None),
    "prepare.center_crop": (PREPARE, None),
    "prepare.ct_composite": (
        PREPARE,
        setting("prepare.ct_composite", ["lung", "mediastinum", "bone"]),
    ),
    "prepare.voi_index": (PREPARE, None),
    "prepare.max_frame_pixels": (PREPARE, None),
    # the latents rule joins the DAG, and train reads its cache
    "prepare.latent_cache": (frozenset({"latents"}) | TRAIN, None),
    "prepare.caption.separator": (PREPARE, setting("prepare.caption.separator", "; ")),
    "prepare.caption.modality_parts": (
        PREPARE,
        setting("prepare.caption.modality_parts", {"CT": [["{modality}"]]}),
    ),
    "prepare.caption.choice": (PREPARE, None),
    "prepare.caption.dropout": (PREPARE, None),
    "prepare.caption.seed": (PREPARE, None),
    "prepare.caption.max_tokens": (PREPARE, None),
    "prepare.caption.parts": (PREPARE, fewer_parts),
    # train: the base model's keys refit or refetch it
    "train.base_model": (BASE, setting("train.base_model", BASE_COPY)),
    "train.revision": (BASE, setting("train.revision", "main")),
    "train.base_model_sha256": (
        BASE,
        setting("train.base_model_sha256", {"unet/diffusion_pytorch_model.safetensors": "0" * 64}),
    ),
    "train.base_model_license": (BASE, setting("train.base_model_license", "Lab terms")),
    "train.hub_cache": (NOTHING, setting("train.hub_cache", "/srv/hub-cache")),
    "train.tiny_seed": (BASE, None),
    "train.threads": (NOTHING, None),
    "train.tiny_vae.steps": (BASE, None),
    "train.tiny_vae.batch_size": (BASE, None),
    "train.tiny_vae.learning_rate": (BASE, None),
    "train.tiny_vae.kl_weight": (BASE, None),
    "train.seed": (TRAIN, None),
    "train.max_steps": (TRAIN, None),
    "train.train_batch_size": (TRAIN, None),
    "train.gradient_accumulation_steps": (TRAIN, None),
    "train.learning_rate": (TRAIN, None),
    "train.lr_scheduler": (TRAIN, None),
    "train.lr_warmup_steps": (TRAIN, None),
    "train.adam_beta1": (TRAIN, None),
    "train.adam_beta2": (TRAIN, None),
    "train.adam_weight_decay": (TRAIN, None),
    "train.adam_epsilon": (TRAIN, None),
    "train.max_grad_norm": (TRAIN, None),
    "train.mixed_precision": (TRAIN, None),
    # how the job runs: the checkpoint fingerprint leaves these out, and so do reruns
    "train.checkpointing_steps": (NOTHING, None),
    "train.checkpoints_total_limit": (NOTHING, None),
    "train.resume": (NOTHING, None),
    "train.stop_margin_seconds": (NOTHING, None),
    "train.heldout_split": (TRAIN, None),
    "train.heldout_max_images": (TRAIN, None),
    "train.dataloader_workers": (NOTHING, None),
    "train.mode": (TRAIN, None),
    "train.lora_rank": (TRAIN, None),
    "train.lora_alpha": (TRAIN, None),
    "train.train_text_encoder": (TRAIN, None),
    "train.text_encoder_learning_rate": (TRAIN, None),
    "train.min_snr_gamma": (TRAIN, None),
    "train.noise_offset": (TRAIN, None),
    "train.caption_dropout": (TRAIN, None),
    "train.random_flip": (TRAIN, None),
    "train.ema_decay": (TRAIN, None),
    "train.gradient_checkpointing": (TRAIN, None),
    "train.attention": (TRAIN, None),
    "train.optimizer": (TRAIN, None),
    "train.use_latent_cache": (TRAIN, None),
    # the validation pass writes held-out losses into train_log.jsonl and the grids
    "train.validation_steps": (TRAIN, None),
    "train.validation_prompts": (TRAIN, setting("train.validation_prompts", ["CT of the chest"])),
    "train.validation_images_per_prompt": (TRAIN, None),
    "train.validation_inference_steps": (TRAIN, None),
    "train.validation_guidance_scale": (TRAIN, None),
    # sample
    "sample.prompts": (SAMPLE, setting("sample.prompts", "grid")),
    "sample.grid.split": (SAMPLE, None),
    "sample.grid.fields": (SAMPLE, setting("sample.grid.fields", ["modality", "window"])),
    "sample.max_prompts": (SAMPLE, None),
    "sample.per_prompt": (SAMPLE, None),
    "sample.negative_prompt": (SAMPLE, setting("sample.negative_prompt", "blurry")),
    "sample.batch_size": (SAMPLE, None),
    "sample.scheduler": (SAMPLE, None),
    "sample.num_inference_steps": (SAMPLE, None),
    "sample.guidance_scale": (SAMPLE, None),
    "sample.seed": (SAMPLE, None),
    "sample.n_shards": (SAMPLE, None),
    # another model or LoRA for the fine-tuned samples; the base model's samples stay
    "sample.model": (
        frozenset({"sample", "sample_manifest"}) | EVALUATE,
        setting("sample.model", BASE_COPY),
    ),
    "sample.lora_weights": (
        frozenset({"sample", "sample_manifest"}) | EVALUATE,
        setting("sample.lora_weights", f"{BASE_COPY}/model_index.json"),
    ),
    "sample.device": (SAMPLE, None),
    "sample.dtype": (SAMPLE, None),
    "sample.compile": (SAMPLE, None),
    "sample.dicom_export": (DICOM, None),
    # evaluate
    "evaluate.feature_extractor.kind": (EVALUATE, None),
    "evaluate.feature_extractor.allow_random": (EVALUATE, None),
    "evaluate.feature_extractor.seed": (EVALUATE, None),
    "evaluate.feature_extractor.path": (
        EVALUATE,
        setting("evaluate.feature_extractor.path", "/srv/extractor.pt"),
    ),
    "evaluate.feature_extractor.input_size": (EVALUATE, None),
    "evaluate.feature_extractor.input_range": (
        EVALUATE,
        setting("evaluate.feature_extractor.input_range", [-1, 1]),
    ),
    "evaluate.feature_extractor.module": (
        EVALUATE,
        setting("evaluate.feature_extractor.module", "pkg.mod:factory"),
    ),
    "evaluate.kid_subset_size": (EVALUATE, None),
    "evaluate.bootstrap": (EVALUATE, None),
    "evaluate.seed": (EVALUATE, None),
    "evaluate.prdc_k": (EVALUATE, None),
    "evaluate.min_group_size": (EVALUATE, None),
    "evaluate.max_real_images": (EVALUATE, None),
    "evaluate.memorization_quantile": (EVALUATE, None),
    "evaluate.memorization_max_shift": (EVALUATE, None),
    "evaluate.top_pairs": (EVALUATE, None),
    "evaluate.adherence_blur": (EVALUATE, setting("evaluate.adherence_blur", [1.5])),
    "evaluate.report_samples_per_prompt": (EVALUATE, None),
    "evaluate.report_max_prompts": (EVALUATE, None),
}


def schema_keys(node: dict, prefix: str = "") -> dict[str, dict]:
    """Dotted key -> schema of every leaf setting (objects with properties are walked)."""
    keys = {}
    for name, sub in node.get("properties", {}).items():
        dotted = f"{prefix}{name}"
        if "properties" in sub:
            keys.update(schema_keys(sub, dotted + "."))
        else:
            keys[dotted] = sub
    return keys


SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
KEYS = schema_keys(SCHEMA)


def get(config: dict, dotted: str) -> Any:
    for name in dotted.split("."):
        config = config[name]
    return config


def derived_change(key: str, schema: dict, current: Any) -> Change:
    """A valid other value from the key's schema: enum, boolean, integer or number."""
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if "enum" in schema:
        return setting(key, next(v for v in schema["enum"] if v != current))
    if "boolean" in types:
        return setting(key, not current)
    low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))

    def valid(value: float) -> bool:
        return (
            value != current
            and value >= schema.get("minimum", value)
            and value > schema.get("exclusiveMinimum", value - 1)
            and value <= schema.get("maximum", value)
            and value < schema.get("exclusiveMaximum", value + 1)
        )

    start = low if current is None else current
    if "integer" in types:
        return setting(key, next(v for v in (start + 1, start - 1) if valid(v)))
    if "number" in types:
        middle = (low + high) / 2 if high is not None else low + 1.0
        return setting(key, next(v for v in (start + 1.0, middle, start / 2) if valid(v)))
    raise AssertionError(f"{key}: no value can be derived from its schema; declare one")


def change_of(key: str, config: dict) -> Change:
    declared = EXPECTED[key][1]
    return declared or derived_change(key, KEYS[key], get(config, key))


# A process that imports Snakemake once and forks for each dry run: a dry run of the demo
# takes ~0.4 s instead of ~1.3 s as a fresh `snakemake` (mostly imports), which keeps the
# ~130 dry runs of the matrix near half a minute. One request (JSON) per line on stdin:
# the command line and a log file; one exit status per line on stdout.
FORK_SERVER = """
import json, os, sys
import snakemake.cli
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        try:
            snakemake.cli.main(request["argv"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class DryRuns:
    """Fork servers, one per worker thread; `planned` dry-runs a config on the demo."""

    def __init__(self, workdir: Path, workers: int) -> None:
        self.workdir = workdir
        env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(workdir)}
        self.servers: queue.Queue = queue.Queue()
        for _ in range(workers):
            server = subprocess.Popen(
                [str(BIN / "python"), "-c", FORK_SERVER],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            self.servers.put(server)
        self.workers = workers

    def close(self) -> None:
        for _ in range(self.workers):
            server = self.servers.get()
            server.stdin.close()
            server.wait(timeout=60)

    def planned(self, configfile: Path) -> frozenset[str]:
        """The rules a dry run plans (without the target rule `all`)."""
        argv = ["-s", str(REPO / "Snakefile"), "--directory", str(self.workdir)]
        argv += ["-n", "--nolock", "--configfile", str(configfile)]
        log = configfile.with_suffix(".log")
        server = self.servers.get()
        try:
            server.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
            server.stdin.flush()
            code = int(server.stdout.readline())
        finally:
            self.servers.put(server)
        out = log.read_text()
        if code != 0:
            raise AssertionError(f"dry run with {configfile.name} failed:\n{out[-3000:]}")
        if "Nothing to be done" in out:
            return NOTHING
        table = out.split("Job stats:")[1].split("total")[0]
        return frozenset(m[1] for m in re.finditer(r"^(\w+)\s+\d+$", table, re.M)) - {"all"}


@pytest.fixture(scope="module")
def finished(
    demo_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DryRuns, dict]]:
    """Dry runs on a hard-linked copy of the finished demo (mtimes kept; only dry runs touch
    it) with a copy of its base model inside, and the demo config with its defaults."""
    workdir = tmp_path_factory.mktemp("rerun-matrix") / "run"
    shutil.copytree(demo_run, workdir, copy_function=os.link, symlinks=True)
    shutil.copytree(workdir / "results" / "base_model", workdir / BASE_COPY, copy_function=os.link)
    runs = DryRuns(workdir, WORKERS)
    yield runs, load_config(REPO / "config" / "demo.yaml")
    runs.close()


def write(runs: DryRuns, name: str, config: dict) -> Path:
    path = runs.workdir.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_every_config_key_has_an_expectation() -> None:
    missing = sorted(set(KEYS) - set(EXPECTED))
    assert not missing, f"declare what a change of these keys reruns in EXPECTED: {missing}"
    stale = sorted(set(EXPECTED) - set(KEYS))
    assert not stale, f"EXPECTED names keys the schema does not have: {stale}"


def test_runtime_only_settings_are_the_ones_expected_to_rerun_nothing() -> None:
    """idc_diffusion.core.rerun's list and this test's expectations agree (the dry runs below
    check that Snakemake does what both say)."""
    runtime = {f"{section}.{key}" for section, keys in RUNTIME_ONLY.items() for key in keys}
    expected_nothing = {key for key, (rules, _) in EXPECTED.items() if not rules}
    assert expected_nothing == runtime | set(TOP_LEVEL_RUNTIME)


def test_the_unchanged_config_reruns_nothing(finished: tuple[DryRuns, dict]) -> None:
    runs, config = finished
    assert runs.planned(write(runs, "unchanged", config)) == NOTHING


# Runtime keys no change of which is valid on the demo alone (its gpu 0 cannot spread over
# 2 nodes): test_spreading_the_gpus_over_nodes_reruns_nothing_more checks them.
NOT_ALONE = ("train_nodes",)


def test_spreading_the_gpus_over_nodes_reruns_nothing_more(finished: tuple[DryRuns, dict]) -> None:
    runs, base = finished
    gpus = copy.deepcopy(base)
    gpus["gpu"] = 2  # two training processes: train onward reruns
    nodes = copy.deepcopy(gpus)
    nodes["train_nodes"] = 2
    planned = runs.planned(write(runs, "gpus", gpus))
    assert "train" in planned
    assert runs.planned(write(runs, "nodes", nodes)) == planned


def test_settings_that_change_no_output_rerun_nothing(finished: tuple[DryRuns, dict]) -> None:
    runs, base = finished
    keys = sorted(k for k, (rules, _) in EXPECTED.items() if not rules and k not in NOT_ALONE)
    config = copy.deepcopy(base)
    for key in keys:
        change_of(key, base)(config)
    if runs.planned(write(runs, "runtime-only", config)) == NOTHING:
        return
    rerun = {}
    for key in keys:  # name the culprits
        one = copy.deepcopy(base)
        change_of(key, base)(one)
        rerun[key] = sorted(runs.planned(write(runs, key, one)))
    culprits = {k: v for k, v in rerun.items() if v}
    assert not culprits, f"settings that change no output rerun rules: {culprits}"


def test_each_setting_reruns_exactly_its_rules(finished: tuple[DryRuns, dict]) -> None:
    runs, base = finished
    keys = sorted(key for key, (rules, _) in EXPECTED.items() if rules)

    def check(key: str) -> tuple[str, frozenset[str], frozenset[str]]:
        config = copy.deepcopy(base)
        change_of(key, base)(config)
        assert config != base, f"{key}: the change changes nothing"
        return key, EXPECTED[key][0], runs.planned(write(runs, key, config))

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = list(pool.map(check, keys))
    wrong = {
        key: {"missing": sorted(expected - actual), "extra": sorted(actual - expected)}
        for key, expected, actual in results
        if expected != actual
    }
    assert not wrong, "reruns differ from EXPECTED:\n" + "\n".join(
        f"{key}: {diff}" for key, diff in sorted(wrong.items())
    )
