"""Training data: imagefolder splits as tensors, and a deterministic, resumable batch order.

Images are the prepared 8-bit grayscale PNG squares; each becomes a 3-channel tensor in
[-1, 1] (the SD VAE's input). No augmentation: horizontal flips destroy laterality.
The order of micro-batches is a pure function of (seed, micro-batch index), so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Split:
    """One imagefolder split: image paths, captions, and what the records say about pixels."""

    name: str
    metadata: Path
    paths: list[Path]
    captions: list[str]
    pixel_sources: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def read_split(data_dir: Path, split: str) -> Split:
    """Records of ``data_dir/split/metadata.jsonl`` (empty Split when the file is missing)."""
    metadata = Path(data_dir) / split / "metadata.jsonl"
    paths: list[Path] = []
    captions: list[str] = []
    sources: list[str] = []
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                paths.append(metadata.parent / record["file_name"])
                captions.append(str(record["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{metadata}:{number}: bad record ({exc})") from exc
            sources.append(str(record.get("pixel_source") or "unknown"))
    return Split(split, metadata, paths, captions, sources)


def image_resolution(split: Split) -> int:
    """The common square size of a split's images (ValueError naming any odd one out)."""
    sizes: dict[tuple[int, int], Path] = {}
    for path in split.paths:
        if not path.is_file():
            raise ValueError(f"{split.metadata}: image {path.name} listed but missing")
        with Image.open(path) as image:
            sizes.setdefault(image.size, path)
    if not sizes:
        raise ValueError(f"{split.metadata}: no images")
    if len(sizes) > 1:
        found = ", ".join(f"{w}x{h} ({p.name})" for (w, h), p in sizes.items())
        raise ValueError(f"{split.metadata}: images differ in size: {found}; rerun prepare")
    ((width, height),) = sizes
    if width != height or width % 8:
        raise ValueError(f"{split.metadata}: images are {width}x{height}; need squares of 8k px")
    return width


def load_image(path: Path) -> torch.Tensor:
    """A PNG as a (3, H, W) float tensor in [-1, 1] (grayscale repeated to RGB)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def load_images(paths: Sequence[Path]) -> torch.Tensor:
    """Several images stacked into (N, 3, H, W)."""
    return torch.stack([load_image(p) for p in paths])


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (well mixed by numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Caption token ids, padded/truncated to the tokenizer's model_max_length."""
    return tokenizer(
        list(captions),
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids


def split_fingerprint(split: Split) -> str:
    """Hash of a split's file names and captions (what a checkpoint was trained on)."""
    digest = hashlib.sha256()
    for path, caption in zip(split.paths, split.captions, strict=True):
        digest.update(f"{path.name}\t{caption}\n".encode())
    return digest.hexdigest()[:16]


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of `n` items in `epoch`: seeded by (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, micro_step: int) -> list[int]:
    """Item indices of global micro-batch `micro_step` (epochs of ceil(n / batch_size))."""
    per_epoch = -(-n // batch_size)
    epoch, batch = divmod(micro_step, per_epoch)
    order = epoch_permutation(n, seed, epoch)
    return order[batch * batch_size : (batch + 1) * batch_size].tolist()


def epoch_of(n: int, batch_size: int, micro_step: int) -> int:
    """The epoch a micro-batch belongs to."""
    return micro_step // -(-n // batch_size)


class BatchStream:
    """Micro-batches from `start` on, for one process of `num_processes` (a batch_sampler).

    Each global micro-batch holds ``batch_size * num_processes`` items; this process takes
    its slice. Infinite: the training loop decides when to stop.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
    ) -> None:
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.process_index, self.num_processes = process_index, num_processes

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        global_size = self.batch_size * self.num_processes
        while True:
            indices = batch_indices(self.n, global_size, self.seed, step)
            mine = indices[self.process_index :: self.num_processes]
            yield mine or indices[:1]
            step += 1


class CaptionedImages(torch.utils.data.Dataset):
    """(pixel_values, input_ids) pairs, images read lazily from disk."""

    def __init__(self, split: Split, input_ids: torch.Tensor) -> None:
        self.paths, self.input_ids = split.paths, input_ids

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": load_image(self.paths[index]), "input_ids": self.input_ids[index]}


def make_loader(
    dataset: torch.utils.data.Dataset, stream: BatchStream, workers: int = 0
) -> torch.utils.data.DataLoader:
    """A DataLoader over `stream`'s batches (no shuffling of its own).

    With workers, each keeps 4 batches ready and, on a GPU machine, in pinned memory, so
    decoding PNGs (or reading cached latents) overlaps the GPU's step.
    """
    extra = {"prefetch_factor": 4} if workers else {}
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=stream,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        **extra,
    )
