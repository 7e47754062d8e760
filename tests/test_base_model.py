"""The base model stage on its real download path: a loopback hub, the hub cache, digests.

`huggingface_hub` talks to tests/hub_server.py (the hub's HTTP API on 127.0.0.1); every
request is counted, so "fetched once" and "nothing fetched" are measured, not assumed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from hub_server import Repo, hub_server
from huggingface_hub import constants

from idc_diffusion.train.base_model import (
    ModelError,
    check_base_model,
    check_pipeline_folder,
    fetch_base_model,
    pin_snippet,
    pipeline_problems,
    select_pipeline_files,
)
from idc_diffusion.train.model_card import base_license
from idc_diffusion.train.models import build_tiny_pipeline, load_base_pipeline

REPO_ID = "lab/tiny-sd"
CARD = "---\nlicense: openrail++\ntags:\n- stable-diffusion\n---\n# tiny SD 2 stand-in\n"
# What the hub layout adds around the pipeline, none of which a training run needs.
EXTRAS = {
    "v2-1_512-ema-pruned.safetensors": b"single-file checkpoint" * 10,
    "unet/diffusion_pytorch_model.fp16.safetensors": b"fp16 variant" * 10,
    "text_encoder/model.fp16.safetensors": b"fp16 variant" * 10,
    "text_encoder/pytorch_model.bin": b"pickle duplicate" * 10,
    "safety_checker/config.json": b"{}",
    "safety_checker/model.safetensors": b"safety checker" * 10,
    "unet/diffusion_flax_model.msgpack": b"flax" * 10,
}
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    build_tiny_pipeline(seed=0, sample_size=32).save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").write_text(CARD)
    return folder


@pytest.fixture(scope="module")
def pipeline_files(pipeline_dir: Path) -> dict[str, bytes]:
    return {
        p.relative_to(pipeline_dir).as_posix(): p.read_bytes()
        for p in pipeline_dir.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def repo(pipeline_files: dict[str, bytes]) -> Repo:
    return Repo(files={**pipeline_files, **{k: v for k, v in EXTRAS.items()}})


@pytest.fixture
def hub(repo: Repo, monkeypatch: pytest.MonkeyPatch):
    """The loopback hub holding `repo` as REPO_ID; huggingface_hub pointed at it."""
    with hub_server({REPO_ID: repo}) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


def settings(tmp_path: Path, **overrides) -> dict:
    return {
        "base_model": REPO_ID,
        "revision": None,
        "tiny_seed": 0,
        "base_model_sha256": {},
        "hub_cache": str(tmp_path / "hub-cache"),
        **overrides,
    }


def listing_requests(hub) -> list[tuple[str, str]]:
    """The metadata requests for revision main: resolve it, then list the commit's files."""
    commit = hub.repos[REPO_ID].commit
    return [("GET", f"/api/models/{REPO_ID}"), ("GET", f"/api/models/{REPO_ID}/revision/{commit}")]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- listings


def test_selection_takes_default_safetensors_of_the_pipeline_parts_only() -> None:
    # the layout of stable-diffusion-2-1-base and its mirrors
    listing = [
        ".gitattributes", "README.md", "model_index.json",
        "v2-1_512-ema-pruned.ckpt", "v2-1_512-ema-pruned.safetensors",
        "v2-1_512-nonema-pruned.ckpt", "v2-1_512-nonema-pruned.safetensors",
        "feature_extractor/preprocessor_config.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
        "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
        "text_encoder/pytorch_model.fp16.bin",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
        "unet/config.json", "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_flax_model.msgpack",
        "vae/config.json", "vae/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]  # fmt: skip
    assert select_pipeline_files(listing) == [
        "README.md",
        "feature_extractor/preprocessor_config.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",  # no default-variant safetensors: the .bin
    ]


def test_sharded_weights_keep_their_index_and_skip_variant_shards() -> None:
    listing = [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
    ]
    assert select_pipeline_files(listing) == listing[:4][:1] + sorted(listing[1:4])


def test_a_listing_missing_a_part_is_named() -> None:
    assert pipeline_problems(["unet/config.json"]) == [
        "no model_index.json, so not a diffusers pipeline"
    ]
    listing = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"]
    problems = pipeline_problems(listing)
    assert problems[0] == "component folder 'vae' is missing"
    assert "component folder 'unet' is missing" not in problems


# --------------------------------------------------------------------------- the hub


def test_first_fetch_gets_the_pipeline_files_once_with_their_digests(
    hub, repo: Repo, tmp_path: Path
) -> None:
    out = tmp_path / "results" / "base_model"
    manifest = fetch_base_model(settings(tmp_path), out, 64)
    wanted = select_pipeline_files(repo.files)
    assert sorted(hub.downloads()) == sorted(
        f"/{REPO_ID}/resolve/{repo.commit}/{n}" for n in wanted
    )
    assert not any(name in EXTRAS for name in manifest["files"])
    assert manifest["revision"] == repo.commit and manifest["requested_revision"] is None
    assert manifest["source"] == REPO_ID and manifest["endpoint"] == hub.url
    assert manifest["license"] == "CreativeML Open RAIL++-M"
    assert manifest["files"] == {
        n: {"size": len(repo.files[n]), "sha256": sha256(repo.files[n])} for n in wanted
    }
    assert sorted(manifest["verified_against_hub"]) == wanted
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == {*wanted, "manifest.json"}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    loaded = load_base_pipeline(str(out))
    assert loaded.unet.config.cross_attention_dim == 32
    assert f"revision: {repo.commit}" in pin_snippet(manifest)
    assert f"{UNET_WEIGHTS}: {sha256(repo.files[UNET_WEIGHTS])}" in pin_snippet(manifest)


def test_second_fetch_downloads_nothing(hub, repo: Repo, tmp_path: Path) -> None:
    fetch_base_model(settings(tmp_path), tmp_path / "first", 64)
    hub.requests.clear()
    again = fetch_base_model(settings(tmp_path), tmp_path / "second", 64)
    assert hub.downloads() == []
    assert hub.requests == listing_requests(hub)  # what main is now, and its listing
    assert again["files"] == json.loads((tmp_path / "first" / "manifest.json").read_text())["files"]
    hub.requests.clear()
    assert "snapshot in" in check_base_model(settings(tmp_path), tmp_path / "second")
    assert hub.requests == []  # a matching snapshot is checked without the network


def test_pinned_revision_is_fetched_and_recorded(hub, repo: Repo, tmp_path: Path) -> None:
    manifest = fetch_base_model(settings(tmp_path, revision=repo.commit), tmp_path / "out", 64)
    assert manifest["revision"] == manifest["requested_revision"] == repo.commit
    assert ("GET", f"/api/models/{REPO_ID}/revision/{repo.commit}") in hub.requests


def test_missing_repo_and_revision_stop_at_start_up(hub, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"'lab/gone' \(revision main\) is not on .*Remedies"):
        check_base_model(settings(tmp_path, base_model="lab/gone"), tmp_path / "out")
    with pytest.raises(ModelError, match="has no revision 'v9'"):
        check_base_model(settings(tmp_path, revision="v9"), tmp_path / "out")
    with pytest.raises(ModelError, match="is not on"):
        fetch_base_model(settings(tmp_path, base_model="lab/gone"), tmp_path / "out", 64)
    assert not (tmp_path / "out").exists()
    assert hub.downloads() == []


def test_start_up_check_costs_two_small_requests(hub, tmp_path: Path) -> None:
    assert check_base_model(settings(tmp_path), tmp_path / "out").endswith(
        hub.repos[REPO_ID].commit
    )
    assert hub.requests == listing_requests(hub)
    hub.requests.clear()
    check_base_model(settings(tmp_path, revision=hub.repos[REPO_ID].commit), tmp_path / "out")
    assert hub.requests == listing_requests(hub)[1:]  # a commit needs no resolving


def test_gated_repo_is_explained(hub, repo: Repo, tmp_path: Path) -> None:
    repo.gated = True
    with pytest.raises(ModelError, match=r"is gated: accept its terms .* log in"):
        check_base_model(settings(tmp_path), tmp_path / "out")


def test_not_a_pipeline_is_named(hub, repo: Repo, tmp_path: Path) -> None:
    del repo.files["vae/config.json"]
    with pytest.raises(
        ModelError, match=r"not a diffusers pipeline: component 'vae' lacks config\.json"
    ):
        check_base_model(settings(tmp_path), tmp_path / "out")


def test_unreachable_hub_names_the_remedies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with hub_server({}) as gone:
        url = gone.url  # a port nothing listens on once the block ends
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelError, match=r"cannot reach http://127\.0\.0\.1.*HF_HUB_OFFLINE=1"):
        check_base_model(settings(tmp_path), tmp_path / "out")


def test_corrupt_transfer_is_caught_by_its_digest_and_refetched(
    hub, repo: Repo, tmp_path: Path
) -> None:
    good = repo.files[UNET_WEIGHTS]
    repo.served[UNET_WEIGHTS] = good[:-1] + bytes([good[-1] ^ 0xFF])  # same size, one bit off
    out = tmp_path / "out"
    with pytest.raises(ModelError, match=f"corrupt download .*{UNET_WEIGHTS}: sha256 "):
        fetch_base_model(settings(tmp_path), out, 64)
    assert not out.exists()
    del repo.served[UNET_WEIGHTS]
    hub.requests.clear()
    manifest = fetch_base_model(settings(tmp_path), out, 64)
    assert hub.downloads() == [f"/{REPO_ID}/resolve/{repo.commit}/{UNET_WEIGHTS}"]
    assert manifest["files"][UNET_WEIGHTS]["sha256"] == sha256(good)


def test_expected_digests_pin_the_weights(hub, repo: Repo, tmp_path: Path) -> None:
    digest = sha256(repo.files[UNET_WEIGHTS])
    pinned = settings(tmp_path, base_model_sha256={UNET_WEIGHTS: digest.upper()})
    manifest = fetch_base_model(pinned, tmp_path / "ok", 64)
    assert manifest["files"][UNET_WEIGHTS]["sha256"] == digest
    assert manifest["pinned_by_config"] == [UNET_WEIGHTS]
    wrong = settings(tmp_path, base_model_sha256={UNET_WEIGHTS: "0" * 64})
    with pytest.raises(
        ModelError, match=f"base_model_sha256: .*{UNET_WEIGHTS}: sha256 {digest}, expected 0+"
    ):
        fetch_base_model(wrong, tmp_path / "bad", 64)
    assert not (tmp_path / "bad").exists()
    # a snapshot whose manifest lacks the pinned digest is not accepted at start-up as is
    hub.requests.clear()
    check_base_model(wrong, tmp_path / "ok")
    assert hub.requests  # went to the hub: Snakemake reruns base_model, which then stops


def test_offline_uses_the_filled_cache_and_nothing_else(
    hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = fetch_base_model(settings(tmp_path), tmp_path / "online", 64)
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert check_base_model(settings(tmp_path), tmp_path / "offline").endswith(online["revision"])
    offline = fetch_base_model(settings(tmp_path), tmp_path / "offline", 64)
    assert hub.requests == []
    assert offline["files"] == online["files"] and offline["revision"] == online["revision"]
    with pytest.raises(ModelError, match=r"HF_HUB_OFFLINE=1 and the hub cache .* no complete"):
        check_base_model(settings(tmp_path, hub_cache=str(tmp_path / "empty")), tmp_path / "x")


# --------------------------------------------------------------------------- folders, tiny


def test_local_folder_is_copied_with_its_pipeline_files_only(
    pipeline_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "mine"
    shutil.copytree(pipeline_dir, source)
    (source / "notes.txt").write_text("lab notes")
    spec = {**settings(tmp_path), "base_model": str(source)}
    assert check_base_model(spec, tmp_path / "out") == f"folder {source}"
    manifest = fetch_base_model(spec, tmp_path / "out", 64)
    assert manifest["source"] == str(source) and manifest["revision"] is None
    assert "notes.txt" not in manifest["files"] and UNET_WEIGHTS in manifest["files"]
    assert manifest["license"] == manifest["card_license"] == "CreativeML Open RAIL++-M"
    assert base_license(manifest) == "CreativeML Open RAIL++-M"
    check_pipeline_folder(tmp_path / "out")
    (source / "README.md").unlink()  # save_pretrained() writes no card: the config names it
    named = fetch_base_model({**spec, "base_model_license": "Lab terms"}, tmp_path / "out", 64)
    assert named["license"] == "Lab terms" and named["card_license"] is None
    unnamed = fetch_base_model(spec, tmp_path / "out", 64)
    assert base_license(unnamed).startswith("unknown")
    both = {"license": "Lab terms", "card_license": "CreativeML Open RAIL++-M"}
    assert base_license(both) == "Lab terms (the source's card says CreativeML Open RAIL++-M)"
    shutil.rmtree(source / "vae")
    with pytest.raises(ModelError, match="component folder 'vae' is missing"):
        check_base_model(spec, tmp_path / "elsewhere")


def test_tiny_needs_the_dataset_its_vae_is_fitted_on(tmp_path: Path) -> None:
    # the build itself (seeded UNet, fitted VAE, manifest) is tested in test_tiny_base.py
    with pytest.raises(ModelError, match="needs --dataset-dir"):
        fetch_base_model({"base_model": "tiny", "tiny_seed": 3}, tmp_path / "out", 32)
    assert not (tmp_path / "out").exists()
    assert check_base_model({"base_model": "tiny"}, tmp_path / "nowhere") == "tiny (built locally)"
