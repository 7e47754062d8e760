"""The GPU training benchmark's CPU-side logic: peak table, meta-device FLOPs, a dry run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from gpu_train_sd21 import RANDOM_SD21, main, peak_tflops, unet_step_flops
from train_fixtures import own_precision


def test_peak_is_the_exact_models_for_the_precision() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0  # SXM
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0  # not the SXM figure
    assert peak_tflops("NVIDIA H200", "no") == 495.0  # float32 runs on TF32 cores
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert peak_tflops("cpu", "bf16") is None and peak_tflops("cpu", "bf16", 10.0) == 10.0


def test_sd21_flops_are_counted_on_the_meta_device() -> None:
    one, two = (unet_step_flops(RANDOM_SD21, 512, batch) for batch in (1, 2))
    assert two == 2 * one
    # SD 2.1-base UNet at 512 px: ~0.8 TFLOP forward per image, backward about twice that
    assert 1.5e12 < one < 4e12


def test_dry_run_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    out = tmp_path / "result.json"
    with own_precision():  # each run picks its precision; earlier tests may have set one
        result = main(["--model", "tiny", "--resolution", "64", "--device", "cpu", "--steps", "2",
                   "--warmup", "1", "--images", "8", "--batch", "4", "--workers", "0",
                       "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == result
    assert len(result["runs"]) == 6 and result["peak_tflops"] is None
    assert all(run["s_per_step"] > 0 for run in result["runs"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # temp space cleaned


def test_a_gpu_session_folder_becomes_two_results(tmp_path: Path) -> None:
    import run as bench_run

    with own_precision():
        argv = ["--model", "tiny", "--resolution", "64", "--device", "cpu", "--steps", "1",
                "--warmup", "1", "--images", "4", "--batch", "2", "--workers", "0"]  # fmt: skip
        raw = main(argv)
    (tmp_path / "gpu_train_sd21.json").write_text(json.dumps(raw))
    (tmp_path / "machine.txt").write_text(
        "name, driver_version, memory.total [MiB]\nNVIDIA H200, 580.1, 143771 MiB\n"
        "torch 2.11.0+cu130 cuda 13.0 diffusers 0.42.1 transformers 5.23.0 accelerate 1.15.0\n"
    )  # no gpu_sample.json: that step failed, the other is still recorded
    [result] = bench_run.record_gpu_session(tmp_path)
    assert result["name"] == "gpu_train" and result["machine"]["gpu"] == "NVIDIA H200"
    assert result["machine"]["torch"] == "2.11.0+cu130"
    ours = raw["runs"]["ours, checkpointing off"]["images_per_s"]
    reference = raw["runs"]["reference, checkpointing off"]["images_per_s"]
    assert result["ratio"] == round(ours / reference, 3)
    assert len(result["table"]) == 2 + 6 and "| ours | off |" in "\n".join(result["table"])
