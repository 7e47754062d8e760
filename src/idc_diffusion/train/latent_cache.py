"""A cache of VAE latent moments, so training does not re-encode every image every step.

Format (a folder, e.g. ``results/latents/``)::

    index.parquet               one row per image: file_name, text, split, shard, row
    shard-<shard>.safetensors   tensors "mean" and "std", each [N, C, h, w], row = index row

``mean``/``std`` are the VAE posterior's moments (before the VAE scaling factor); a training
latent is ``(mean + std * eps) * scaling_factor`` with fresh ``eps`` each step, exactly what
encoding the image would give. Each shard's safetensors metadata records ``format``, the
fingerprint it was written under (:func:`cache_fingerprint`: the VAE and the encoding
dtype) and ``resolution``; a cache made with another VAE or dtype, or for other files or
captions, is rejected (:func:`cache_problem`). ``file_name`` is as in the split's
``metadata.jsonl`` (relative to the split folder).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from idc_diffusion.train.train_data import Split, load_images

FORMAT = "idc-diffusion-latents/1"
INDEX = "index.parquet"
COLUMNS = ["file_name", "text", "split", "shard", "row"]


def shard_path(root: Path, shard: int) -> Path:
    return Path(root) / f"shard-{shard}.safetensors"


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """Hash of the VAE's config and weights (float32 bytes).

    Private config keys are left out: diffusers' `_use_default_values` is a list made from a
    set, in a different order in every process.
    """
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_fingerprint(vae: torch.nn.Module, dtype: torch.dtype) -> str:
    """What a cache is written and checked under: the VAE (:func:`vae_fingerprint` of its
    float32 weights, taken before any cast) and the dtype it encodes in.

    Training encodes in its mixed-precision dtype, so a cache written under bf16 is
    accepted by a bf16 run (and its resumes) and rejected by an fp32 one.
    """
    return f"{vae_fingerprint(vae)}-{str(dtype).removeprefix('torch.')}"


@torch.no_grad()
def encode_moments(
    vae: torch.nn.Module, images: torch.Tensor, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (float32, on CPU) of `images` ([N, 3, H, W] in [-1, 1])."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device, dtype, non_blocking=True)
        dist = vae.encode(batch).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def plan_shards(splits: Sequence[Split], shard_size: int) -> list[tuple[Split, int]]:
    """(split, first image) of each cache shard, in shard order: a shard never spans splits."""
    return [(s, start) for s in splits for start in range(0, len(s), shard_size)]


def _no_wait() -> None:
    """The barrier of a single process."""


def write_latent_cache(
    root: Path,
    vae: torch.nn.Module,
    splits: Sequence[Split],
    print_: str | None = None,
    shard_size: int = 1024,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
    process_index: int = 0,
    num_processes: int = 1,
    wait: Callable[[], None] = _no_wait,
) -> Path:
    """Encode every image of `splits` and write the cache folder; returns the index path.

    `print_` is the fingerprint recorded (default: :func:`cache_fingerprint` of `vae` in
    its own dtype; pass the one taken before casting it). Several processes share the work:
    process i encodes shards i, i + n, ..., `wait` being their barrier; process 0 writes the
    index. Written into a temporary sibling folder and renamed into place, so a crash never
    leaves a half cache that looks complete.
    """
    root = Path(root)
    partial = root.with_name(root.name + ".partial")
    if process_index == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    wait()
    print_ = print_ or cache_fingerprint(vae, next(vae.parameters()).dtype)
    rows: list[dict] = []
    for shard, (split, start) in enumerate(plan_shards(splits, shard_size)):
        paths = split.paths[start : start + shard_size]
        captions = split.captions[start : start + shard_size]
        rows += [
            {"file_name": path.name, "text": text, "split": split.name, "shard": shard, "row": row}
            for row, (path, text) in enumerate(zip(paths, captions, strict=True))
        ]
        if shard % num_processes != process_index:
            continue
        means, stds = [], []
        for i in range(0, len(paths), batch_size):  # a batch at a time: 1024 images are GBs
            images = load_images(paths[i : i + batch_size])
            mean, std = encode_moments(vae, images, batch_size)
            means.append(mean)
            stds.append(std)
        mean, std = torch.cat(means), torch.cat(stds)
        meta = {"format": FORMAT, "vae": print_, "resolution": str(images.shape[-1])}
        tensors = {"mean": mean.to(dtype).contiguous(), "std": std.to(dtype).contiguous()}
        save_file(tensors, str(shard_path(partial, shard)), metadata=meta)
    wait()
    if process_index == 0:
        pd.DataFrame(rows, columns=COLUMNS).to_parquet(partial / INDEX, index=False)
        shutil.rmtree(root, ignore_errors=True)
        partial.rename(root)
    wait()
    return root / INDEX


def shard_metadata(root: Path, shard: int) -> Mapping[str, str]:
    with safe_open(str(shard_path(root, shard)), framework="pt") as handle:
        return handle.metadata() or {}


def cache_problem(root: Path, split: Split, vae_print: str, resolution: int) -> str | None:
    """Why the cache at `root` cannot serve `split` (None: it can)."""
    index_path = Path(root) / INDEX
    if not index_path.is_file():
        return f"{index_path} does not exist"
    try:
        index = pd.read_parquet(index_path)
    except Exception as exc:  # any unreadable index means "rebuild"
        return f"{index_path} is unreadable ({exc})"
    missing = set(COLUMNS) - set(index.columns)
    if missing:
        return f"{index_path} lacks columns {sorted(missing)}"
    rows = index[index["split"] == split.name].set_index("file_name")
    names = [p.name for p in split.paths]
    if not set(names) <= set(rows.index):
        return f"{index_path}: split {split.name!r} has images not in the cache"
    if list(rows.loc[names, "text"]) != list(split.captions):
        return f"{index_path}: captions of split {split.name!r} differ from metadata.jsonl"
    for shard in sorted(set(rows.loc[names, "shard"])):
        if not shard_path(root, int(shard)).is_file():
            return f"{shard_path(root, int(shard))} is missing"
        meta = shard_metadata(root, int(shard))
        if meta.get("format") != FORMAT:
            return f"{shard_path(root, int(shard))}: format {meta.get('format')!r}, want {FORMAT}"
        if meta.get("vae") != vae_print:
            return f"{shard_path(root, int(shard))}: made with another VAE or encoding dtype"
        if meta.get("resolution") != str(resolution):
            return f"{shard_path(root, int(shard))}: {meta.get('resolution')} px, want {resolution}"
    return None


class CachedLatents(torch.utils.data.Dataset):
    """(mean, std, input_ids) of one split from a cache, read lazily row by row."""

    def __init__(self, root: Path, split: Split, input_ids: torch.Tensor) -> None:
        index = pd.read_parquet(Path(root) / INDEX)
        rows = index[index["split"] == split.name].set_index("file_name")
        located = rows.loc[[p.name for p in split.paths]]
        self.root, self.input_ids = Path(root), input_ids
        shards, rows_ = located["shard"].astype(int), located["row"].astype(int)
        self.where = list(zip(shards, rows_, strict=True))
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.where)

    def _handle(self, shard: int):
        if shard not in self._handles:  # one handle per shard and worker process
            self._handles[shard] = safe_open(str(shard_path(self.root, shard)), framework="pt")
        return self._handles[shard]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard, row = self.where[index]
        handle = self._handle(shard)
        return {
            "mean": handle.get_slice("mean")[row : row + 1][0].float(),
            "std": handle.get_slice("std")[row : row + 1][0].float(),
            "input_ids": self.input_ids[index],
        }

    def __getstate__(self) -> dict:  # DataLoader workers open their own handles
        return {**self.__dict__, "_handles": {}}

    def all_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self[i] for i in range(len(self))]
        return torch.stack([i["mean"] for i in items]), torch.stack([i["std"] for i in items])
