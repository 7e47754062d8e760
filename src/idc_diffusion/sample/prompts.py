"""Prompt sets for the sample stage, and the checks run on them before any image is made.

``sample.prompts`` names the set:

* ``test_captions``: the test split's captions (``<dataset>/test/metadata.jsonl``),
  deduplicated and sorted.
* ``grid``: one prompt per distinct combination of the structured caption fields listed in
  ``sample.grid.fields`` (e.g. modality × body part × window) that occurs in the
  ``sample.grid.split`` split's ``metadata.jsonl``, rendered with the prepare stage's caption
  template (``prepare.caption``: each part's first usable alternative, no dropout,
  ``modality_parts`` picked by the modality). Fields not listed are left unknown, so template parts
  that need them fall back to their other alternatives or are dropped. Only combinations
  present in the data are used (a full cross product would ask for "MR of the chest, lung
  window"-style prompts that the model never saw).
* a ``.txt`` file (one prompt per line) or a ``.csv`` file (column ``prompt``).

Every set is deduplicated, keeps its order (files) or is sorted (captions, grid), and is
capped at ``sample.max_prompts``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from idc_diffusion.core.captions import ALLOWED_FIELDS, MODALITY_TEXT, render_caption

TEST_CAPTIONS = "test_captions"
GRID = "grid"


class PromptError(ValueError):
    """A prompt set that cannot be sampled (empty, too long, unreadable)."""


def read_metadata(dataset_dir: Path, split: str) -> list[dict[str, Any]]:
    """The records of a split's metadata.jsonl ([] when the file is missing)."""
    path = Path(dataset_dir) / split / "metadata.jsonl"
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}:{number}: not valid JSON ({exc})") from exc
    return records


def grid_prompts(
    records: Sequence[Mapping[str, Any]], fields: Sequence[str], caption: Mapping[str, Any]
) -> list[str]:
    """Captions of every distinct combination of `fields` present in `records`, sorted.

    `caption` is the prepare stage's ``{"parts": [...], "separator": ...}``.
    """
    unknown = sorted(set(fields) - ALLOWED_FIELDS)
    if unknown:
        raise PromptError(
            f"sample.grid.fields: {unknown} are not caption fields; "
            f"use some of {sorted(ALLOWED_FIELDS)}"
        )
    combos = {tuple(record.get(name) for name in fields) for record in records}
    separator = caption.get("separator", ", ")
    prompts = set()
    for combo in combos:
        values = dict(zip(fields, combo, strict=True))
        parts = parts_for_text(values.get("modality"), caption)
        prompts.add(render_caption(values, parts, separator))
    return sorted(p for p in prompts if p)


def parts_for_text(modality: str | None, caption: Mapping[str, Any]) -> Sequence[Sequence[str]]:
    """The caption parts for a modality as captions write it ("CT", "radiograph"): the
    ``modality_parts`` of the first DICOM code with that text, else ``parts``."""
    per_modality = caption.get("modality_parts") or {}
    for code, text in MODALITY_TEXT.items():
        if text == modality and code in per_modality:
            return per_modality[code]
    return caption["parts"]


def read_prompt_file(path: Path) -> list[str]:
    """Prompts of a .txt (one per line) or .csv (column ``prompt``) file, in file order."""
    if not path.is_file():
        raise PromptError(f"sample.prompts: {path} does not exist")
    if path.suffix.lower() == ".csv":
        try:
            frame = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            return []
        if "prompt" not in frame.columns:
            raise PromptError(f"sample.prompts: {path} has no 'prompt' column")
        prompts = [str(p).strip() for p in frame["prompt"].dropna()]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(p for p in prompts if p))


def read_prompts(
    source: str,
    dataset_dir: Path,
    max_prompts: int,
    grid: Mapping[str, Any] | None = None,
    caption: Mapping[str, Any] | None = None,
) -> list[str]:
    """The prompt set named by `source` (see the module docstring), capped at max_prompts."""
    dataset_dir = Path(dataset_dir)
    if source == TEST_CAPTIONS:
        path = dataset_dir / "test" / "metadata.jsonl"
        prompts = sorted({r["text"] for r in read_metadata(dataset_dir, "test") if r.get("text")})
    elif source == GRID:
        grid = grid or {}
        split = grid.get("split", "train")
        path = dataset_dir / split / "metadata.jsonl"
        if caption is None:
            raise PromptError(
                "sample.prompts: grid needs the prepare stage's caption template "
                "(pass --caption or --config)"
            )
        fields = grid.get("fields", ["modality", "body_part", "window"])
        prompts = grid_prompts(read_metadata(dataset_dir, split), fields, caption)
    else:
        path = Path(source)
        prompts = read_prompt_file(path)
    if not prompts:
        raise PromptError(
            f"sample.prompts: no prompts in {path} (empty file or empty split); "
            "give a prompt file or check the prepare stage's splits"
        )
    return prompts[:max_prompts]


def check_prompt_lengths(prompts: Sequence[str], tokenizer: Any) -> None:
    """Refuse prompts the text encoder would silently truncate (a CLIP tokenizer)."""
    limit = tokenizer.model_max_length
    for index, prompt in enumerate(prompts):
        n = len(tokenizer(prompt).input_ids)
        if n > limit:
            raise PromptError(
                f"prompt {index} has {n} tokens, over the text encoder's limit of {limit}: "
                f"{prompt[:80]!r}... shorten it (or the caption template)"
            )
