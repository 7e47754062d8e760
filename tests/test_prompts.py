"""Prompt sets: test captions, files, and the grid over structured caption fields."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from idc_diffusion.sample.prompts import PromptError, grid_prompts, read_prompts

CAPTION = {
    "separator": ", ",
    "parts": [
        ["{modality} of the {body_part}", "{modality}"],
        ["{plane} slice", "{view} view"],
        ["{window} window"],
        ["{sex}"],
    ],
}
RECORDS = [
    {"text": "t1", "modality": "CT", "body_part": "chest", "plane": "axial", "window": "lung"},
    {"text": "t2", "modality": "CT", "body_part": "chest", "plane": "axial", "window": "lung"},
    {"text": "t3", "modality": "CT", "body_part": "chest", "window": "mediastinum", "sex": "male"},
    {"text": "t4", "modality": "MR", "body_part": "brain", "plane": "axial", "window": None},
    {"text": "t5", "modality": "radiograph", "body_part": None, "view": "PA", "window": None},
]


def write_split(root: Path, split: str, records: list[dict]) -> Path:
    (root / split).mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"file_name": f"{i}.png", **r}) for i, r in enumerate(records)]
    (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_grid_uses_only_combinations_present() -> None:
    prompts = grid_prompts(RECORDS, ["modality", "body_part", "window"], CAPTION)
    assert prompts == [
        "CT of the chest, lung window",
        "CT of the chest, mediastinum window",
        "MR of the brain",
        "radiograph",
    ]


def test_grid_fields_choose_the_axes() -> None:
    assert grid_prompts(RECORDS, ["modality"], CAPTION) == ["CT", "MR", "radiograph"]
    assert grid_prompts(RECORDS, ["modality", "view"], CAPTION) == [
        "CT",
        "MR",
        "radiograph, PA view",
    ]


def test_grid_rejects_fields_outside_the_caption_allow_list() -> None:
    with pytest.raises(PromptError, match=r"\['PatientID'\] are not caption fields"):
        grid_prompts(RECORDS, ["modality", "PatientID"], CAPTION)


def test_read_prompts_grid_from_a_split(tmp_path: Path) -> None:
    root = write_split(tmp_path, "train", RECORDS)
    grid = {"split": "train", "fields": ["modality", "body_part", "window"]}
    assert read_prompts("grid", root, 2, grid, CAPTION) == [
        "CT of the chest, lung window",
        "CT of the chest, mediastinum window",
    ]
    with pytest.raises(PromptError, match="caption template"):
        read_prompts("grid", root, 10, grid, None)
    with pytest.raises(PromptError, match=r"no prompts in .*val.*metadata\.jsonl"):
        read_prompts("grid", root, 10, {**grid, "split": "val"}, CAPTION)


def test_test_captions_and_files(tmp_path: Path) -> None:
    root = write_split(tmp_path, "test", RECORDS)
    assert read_prompts("test_captions", root, 10) == ["t1", "t2", "t3", "t4", "t5"]
    csv = tmp_path / "p.csv"
    pd.DataFrame({"prompt": [" b ", "a", "b", None]}).to_csv(csv, index=False)
    assert read_prompts(str(csv), root, 10) == ["b", "a"]


def test_bad_prompt_files_are_refused(tmp_path: Path) -> None:
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("")
    with pytest.raises(PromptError, match=r"no prompts in .*empty\.csv"):
        read_prompts(str(empty_csv), tmp_path, 10)
    other = tmp_path / "other.csv"
    other.write_text("text\nx\n")
    with pytest.raises(PromptError, match="no 'prompt' column"):
        read_prompts(str(other), tmp_path, 10)
    broken = write_split(tmp_path / "b", "test", [])
    (broken / "test" / "metadata.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(PromptError, match=r"metadata\.jsonl:2: not valid JSON"):
        read_prompts("test_captions", broken, 10)


def test_grid_uses_the_modality_specific_parts() -> None:
    caption = {**CAPTION, "modality_parts": {"DX": [["{view} {modality}"], ["{window} window"]]}}
    assert grid_prompts(RECORDS, ["modality", "view", "window"], caption) == [
        "CT, lung window",
        "CT, mediastinum window",
        "MR",
        "PA radiograph",
    ]
    assert grid_prompts(RECORDS[4:], ["modality", "view"], CAPTION) == ["radiograph, PA view"]
