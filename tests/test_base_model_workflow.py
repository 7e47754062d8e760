"""The base model in the workflow: fail fast at start-up, fetch once, train offline.

Snakemake runs with ``HF_ENDPOINT`` pointing at the loopback hub (tests/hub_server.py), as
a user's run points at huggingface.co.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, snakemake
from hub_server import Repo, hub_server

from idc_diffusion.train.base_model import select_pipeline_files
from idc_diffusion.train.models import build_tiny_pipeline

pytestmark = pytest.mark.workflow

REPO_ID = "lab/tiny-sd"
# huggingface_hub's telemetry asks the hub for its agent-harness registry once a day: off,
# so that the requests counted are the workflow's own
QUIET = {"HF_HUB_DISABLE_TELEMETRY": "1"}
CARD = "---\nlicense: openrail++\n---\n# tiny SD 2 stand-in\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    folder = tmp_path_factory.mktemp("pipeline")
    build_tiny_pipeline(seed=0, sample_size=64).save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").write_text(CARD)
    return Repo.from_folder(folder)


def config(tmp_path: Path, base_model: str) -> Path:
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    raw["train"].update(base_model=base_model, hub_cache=str(tmp_path / "hub-cache"), max_steps=2)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_missing_hub_id_stops_the_run_at_start_up(repo: Repo, tmp_path: Path) -> None:
    with hub_server({REPO_ID: repo}) as hub:
        result = snakemake(
            tmp_path,
            "-c1",
            "--configfile",
            str(config(tmp_path, "lab/removed-sd")),
            env={"HF_ENDPOINT": hub.url, **QUIET},
            check=False,
        )
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "base model rejected before any job ran: 'lab/removed-sd' (revision main)" in out
    assert "is not on" in out and "Remedies" in out and "HF_HUB_OFFLINE=1" in out
    assert hub.requests == [("GET", "/api/models/lab/removed-sd")]
    assert not (tmp_path / "results").exists()


def test_fetched_once_then_trained_offline(repo: Repo, tmp_path: Path) -> None:
    configfile = str(config(tmp_path, REPO_ID))
    with hub_server({REPO_ID: repo}) as hub:
        env = {"HF_ENDPOINT": hub.url, **QUIET}
        base = "results/base_model/manifest.json"
        snakemake(tmp_path, base, "-c1", "--configfile", configfile, env=env)
        wanted = select_pipeline_files(repo.files)
        assert sorted(hub.downloads()) == sorted(
            f"/{REPO_ID}/resolve/{repo.commit}/{name}" for name in wanted
        )
        hub.requests.clear()
        targets = ["results/model/model_index.json", "results/model/model_card.md"]
        offline = {**env, "HF_HUB_OFFLINE": "1"}
        snakemake(tmp_path, *targets, "-c2", "--configfile", configfile, env=offline)
        assert hub.requests == []  # start-up check, latents, train, card: none asked the hub
        dry = snakemake(tmp_path, *targets, "-n", "--configfile", configfile, env=env)
        assert "Nothing to be done" in dry.stdout + dry.stderr
        assert hub.requests == []  # a matching snapshot needs no network, online either
    manifest = json.loads((tmp_path / "results" / "base_model" / "manifest.json").read_text())
    assert manifest["revision"] == repo.commit and sorted(manifest["files"]) == wanted
    log = (tmp_path / "logs" / "base_model" / "base_model.log").read_text()
    assert f"  revision: {repo.commit}\n" in log  # the lines that pin what was fetched
    card = (tmp_path / "results" / "model" / "model_card.md").read_text()
    assert "License of the base model**: CreativeML Open RAIL++-M" in card
    assert f"{len(wanted)} of {len(wanted)} matched the digests the hub declares" in card
    for name in wanted:
        assert f"| {name} | {len(repo.files[name])} | `{repo.sha256(name)}` |" in card


def test_local_rules_run_where_snakemake_runs(tmp_path: Path) -> None:
    """With the SLURM executor and no reachable cluster, only local rules can run at all."""
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    raw["local_rules"] = ["cohort"]
    # a pipeline folder: unlike `tiny` (whose VAE is fitted on the train split) it needs no data
    folder = tmp_path / "pipeline"
    build_tiny_pipeline(seed=0, sample_size=64).save_pretrained(folder, safe_serialization=True)
    raw["train"]["base_model"] = str(folder)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    targets = ["results/cohort/cohort.parquet", "results/base_model/manifest.json"]
    result = snakemake(tmp_path, *targets, "--executor", "slurm", "-j1", "--configfile", str(path))
    assert "2 of 2 steps (100%) done" in result.stdout + result.stderr
    assert all((tmp_path / target).is_file() for target in targets)
