"""The hub side of the base model stage: resolve a hub id's revision, select its pipeline
files, confirm access (gated repositories, the offline cache), snapshot them into the hub
cache and verify each file against the digests the hub declares. Every hub failure becomes
one ModelError naming the remedies.

Imports only the standard library at import time; ``huggingface_hub`` when a hub id is
checked or fetched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from idc_diffusion.train.base_model import (
    DEFAULT_BASE_MODEL,
    ModelError,
    file_records,
    pipeline_problems,
    select_pipeline_files,
)

METADATA_TIMEOUT_S = 15.0


def remedies(spec: str) -> str:
    """What to do when hub id `spec` cannot be used."""
    other = f" (e.g. {DEFAULT_BASE_MODEL})" if spec != DEFAULT_BASE_MODEL else ""
    return (
        f"Remedies: set train.base_model to another hub id serving the same weights{other}, "
        "or to a local diffusers pipeline folder (README 'Model weights'); or fill the hub "
        "cache on a machine with internet (hf download ID --revision REV) and run with "
        "HF_HUB_OFFLINE=1 (HF_HUB_CACHE or train.hub_cache naming that cache)."
    )


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file's bytes (what the hub declares for non-LFS files)."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def declared_mismatches(
    folder: Path, records: Mapping[str, Mapping[str, Any]], declared: Mapping[str, Any]
) -> dict[str, str]:
    """{file: why} for files whose bytes differ from what the hub declares for them.

    `declared` maps paths to the hub's siblings: size, and the LFS sha256 or (small files
    kept in git) the git blob id.
    """
    bad = {}
    for name, sibling in declared.items():
        record = records[name]
        if sibling.size is not None and sibling.size != record["size"]:
            bad[name] = f"{record['size']} bytes, the hub declares {sibling.size}"
        elif sibling.lfs is not None and sibling.lfs.sha256 != record["sha256"]:
            bad[name] = f"sha256 {record['sha256']}, the hub declares {sibling.lfs.sha256}"
        elif sibling.lfs is None and sibling.blob_id:
            blob = git_blob_sha1(folder / name)
            if blob != sibling.blob_id:
                bad[name] = f"git blob id {blob}, the hub declares {sibling.blob_id}"
    return bad


def _hub_error(exc: Exception, spec: str, revision: str | None, cache: str) -> ModelError:
    """The hub failure `exc` as one message naming the problem and the remedies."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{spec!r} (revision {revision or 'main'})"
    if isinstance(exc, GatedRepoError):
        problem = (
            f"{where} is gated: accept its terms at {constants.ENDPOINT}/{spec} and log in "
            "(hf auth login, or HF_TOKEN)"
        )
    elif isinstance(exc, RepositoryNotFoundError):
        problem = (
            f"{where} is not on {constants.ENDPOINT} (removed, misspelt, or private: log in "
            "if it is yours); Stability AI removed its SD 2.x repositories in November 2025"
        )
    elif isinstance(exc, RevisionNotFoundError):
        problem = f"{spec!r} has no revision {revision!r}"
    elif isinstance(exc, HFValidationError):
        problem = f"{spec!r} is neither an existing folder nor a valid hub id ({exc})"
    elif constants.is_offline_mode():
        problem = (
            f"HF_HUB_OFFLINE=1 and the hub cache {cache} holds no complete snapshot of "
            f"{where} ({type(exc).__name__})"
        )
    else:
        problem = (
            f"cannot reach {constants.ENDPOINT} for {where}: {type(exc).__name__}: {exc}".strip()
        )
    return ModelError(f"{problem.rstrip('.')}. {remedies(spec)}")


def _cache_dir(settings: Mapping[str, Any]) -> str:
    from huggingface_hub import constants

    return str(Path(settings.get("hub_cache") or constants.HF_HUB_CACHE).expanduser())


def _hub_listing(spec: str, revision: str | None, cache: str) -> tuple[str, dict, bool]:
    """(commit, {path: sibling}, gated): the revision resolved (and recorded in the cache's
    refs) and the listing with the hub's digests, in one request for a commit, two for a
    branch or tag. Offline both come from the cache (the listing without digests).
    """
    from huggingface_hub import HfApi, constants, get_cached_repo_tree

    api, offline = HfApi(), constants.is_offline_mode()
    commit = api.resolve_revision(
        spec, revision=revision, cache_dir=cache, local_files_only=offline
    ).resolved
    if offline:
        tree = get_cached_repo_tree(spec, revision=commit, cache_dir=cache)
        return commit, {entry.path: None for entry in tree}, False
    info = api.model_info(spec, revision=commit, files_metadata=True, timeout=METADATA_TIMEOUT_S)
    return commit, {s.rfilename: s for s in info.siblings or []}, bool(info.gated)


def _require_pipeline(spec: str, files: list[str]) -> None:
    """ModelError unless the files selected from hub repo `spec` make a pipeline."""
    problems = pipeline_problems(files)
    if problems:
        raise ModelError(f"{spec!r} is not a diffusers pipeline: {problems[0]}. {remedies(spec)}")


def check_hub(spec: str, settings: Mapping[str, Any]) -> str:
    """Raise ModelError unless the hub (or, offline, its cache) serves the pipeline.

    One or two metadata requests online (one more for a gated repo: access is confirmed on
    ``model_index.json``); offline, only the cache is read. Returns the resolved commit.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, snapshot_download

    revision, cache = settings.get("revision"), _cache_dir(settings)
    try:
        commit, listing, gated = _hub_listing(spec, revision, cache)
        files = select_pipeline_files(listing)
        if constants.is_offline_mode():  # the cached snapshot must hold every file
            snapshot_download(
                spec, revision=commit, cache_dir=cache, allow_patterns=files,
                local_files_only=True,
            )  # fmt: skip
        elif gated:
            get_hf_file_metadata(
                hf_hub_url(spec, "model_index.json", revision=commit), timeout=METADATA_TIMEOUT_S
            )
    except Exception as exc:  # every hub failure becomes one message with the remedies
        raise _hub_error(exc, spec, revision, cache) from exc
    _require_pipeline(spec, files)
    return commit


def fetch_hub(spec: str, settings: Mapping[str, Any]) -> tuple[Path, list[str], dict]:
    """Snapshot the pipeline's files into the hub cache; (folder, files, provenance).

    Each file is checked against the digests the hub declares (online); a file that fails
    is removed from the cache, so that a rerun fetches it again.
    """
    from huggingface_hub import __version__, constants, snapshot_download

    revision, cache = settings.get("revision"), _cache_dir(settings)
    try:
        commit, listing, _ = _hub_listing(spec, revision, cache)
        files = select_pipeline_files(listing)
        _require_pipeline(spec, files)
        folder = Path(
            snapshot_download(
                spec, revision=commit, cache_dir=cache, allow_patterns=files,
                local_files_only=constants.is_offline_mode(),
            )
        )  # fmt: skip
    except ModelError:
        raise
    except Exception as exc:  # every hub failure becomes one message with the remedies
        raise _hub_error(exc, spec, revision, cache) from exc
    records = file_records(folder, files)
    declared = {name: listing[name] for name in files if listing[name] is not None}
    bad = declared_mismatches(folder, records, declared)
    if bad:
        for name in bad:
            (folder / name).resolve().unlink(missing_ok=True)
        raise ModelError(
            f"{spec} at {commit}: corrupt download (the cached copies were removed, so a rerun "
            "fetches them again): " + "; ".join(f"{k}: {v}" for k, v in bad.items())
        )
    provenance = {
        "kind": "hub",
        "endpoint": constants.ENDPOINT,
        "revision": commit,
        "verified_against_hub": sorted(declared),
        "huggingface_hub": __version__,
        "hub_cache": cache,
    }
    return folder, files, provenance
