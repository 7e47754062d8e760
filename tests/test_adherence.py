"""Prompt adherence: the classifier, accuracies with intervals, confusion matrices, fields."""

from __future__ import annotations

import pytest
import torch

from idc_diffusion.evaluate.adherence import (
    accuracy,
    confusion_matrix,
    field_adherence,
    fit_classifier,
    gaussian_blur,
    prompt_adherence,
    scorable_fields,
)

CENTRES = {"CT": (4.0, 0.0, 0.0), "MR": (0.0, 4.0, 0.0), "radiograph": (0.0, 0.0, 4.0)}


def clusters(per_class: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Three well-separated Gaussian clusters in 3-D (unit-variance noise x 0.3)."""
    generator = torch.Generator().manual_seed(seed)
    features, labels = [], []
    for name, centre in CENTRES.items():
        noise = 0.3 * torch.randn(per_class, 3, generator=generator)
        features.append(torch.tensor(centre) + noise)
        labels += [name] * per_class
    return torch.cat(features), labels


def test_classifier_reads_separated_clusters_back() -> None:
    train_x, train_y = clusters(20, seed=0)
    test_x, test_y = clusters(10, seed=1)
    classifier = fit_classifier(train_x, train_y)
    assert classifier.classes == ("CT", "MR", "radiograph")
    assert classifier.predict(test_x) == test_y
    assert classifier.predict(torch.tensor([list(c) for c in CENTRES.values()])) == list(CENTRES)
    assert classifier.predict(torch.zeros(0, 3)) == []


def test_classifier_fit_is_deterministic_and_needs_two_classes() -> None:
    x, y = clusters(5, seed=2)
    a, b = fit_classifier(x, y), fit_classifier(x, y)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with pytest.raises(ValueError, match="two classes"):
        fit_classifier(x[:5], y[:5])


def test_accuracy_counts_and_bootstrap_interval() -> None:
    score = accuracy(["a", "b", "a", "a"], ["a", "b", "b", "a"], n_boot=0, seed=0)
    assert score == {"accuracy": 0.75, "ci95": None, "n": 4}
    perfect = accuracy(["a"] * 6, ["a"] * 6, n_boot=50, seed=0)
    assert perfect["accuracy"] == 1.0 and perfect["ci95"] == [1.0, 1.0]
    mixed = accuracy(["a", "b"] * 10, ["a"] * 20, n_boot=200, seed=0)
    low, high = mixed["ci95"]
    assert 0.0 <= low < 0.5 < high <= 1.0
    assert accuracy([], [], n_boot=10, seed=0) == {"accuracy": None, "ci95": None, "n": 0}


def test_confusion_matrix_rows_are_truth() -> None:
    truth = ["CT", "CT", "MR", "MR", "MR"]
    predicted = ["CT", "MR", "MR", "MR", "CT"]
    assert confusion_matrix(truth, predicted, ["CT", "MR"]) == [[1, 1], [1, 2]]


def test_scorable_fields_need_two_non_null_values() -> None:
    fields = [
        {"modality": "CT", "window": "lung", "plane": "axial", "view": None},
        {"modality": "CT", "window": "mediastinum", "plane": "axial", "view": None},
        {"modality": "radiograph", "window": "voi", "plane": None, "view": "PA"},
        None,
    ]
    assert scorable_fields(fields) == ["modality", "window"]


def test_field_adherence_scores_each_set_against_its_own_fields() -> None:
    train_x, train_y = clusters(20, seed=0)
    test_x, test_y = clusters(4, seed=1)
    as_fields = [{"modality": m} for m in test_y]
    # "good" images sit at their prompt's centre; "bad" ones all at the CT centre
    good = (test_x, as_fields)
    bad = (torch.tensor([CENTRES["CT"]] * len(test_y)), as_fields)
    missing = (test_x[:2], [None, {"modality": "PET"}])
    result = field_adherence(
        "modality",
        (train_x, [{"modality": m} for m in train_y]),
        (test_x, as_fields),
        {"good": good, "bad": bad, "missing": missing},
        n_boot=20,
        seed=0,
        confusion=True,
    )
    assert result["classes"] == ["CT", "MR", "radiograph"]
    assert result["n_train"] == 60 and result["majority_rate"] == pytest.approx(1 / 3)
    assert result["real_test"]["accuracy"] == 1.0 and result["real_test"]["n"] == 12
    assert result["good"]["accuracy"] == 1.0
    assert result["bad"]["accuracy"] == pytest.approx(1 / 3)
    assert result["bad"]["confusion"] == [[4, 0, 0], [4, 0, 0], [4, 0, 0]]
    assert result["missing"] == {
        "accuracy": None,
        "ci95": None,
        "n": 0,
        "left_out": 2,
        "confusion": [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
    }


def test_prompt_adherence_main_field_gets_the_confusion_matrix() -> None:
    train_x, train_y = clusters(10, seed=0)
    train_fields = [{"modality": m, "window": "lung" if i % 2 else "soft"} for i, m in
                    enumerate(train_y)]  # fmt: skip
    result = prompt_adherence(
        (train_x, train_fields), (train_x, train_fields), {"fine_tuned": (train_x, train_fields)},
        n_boot=0,
    )  # fmt: skip
    assert result["fields"] == ["modality", "window"] and result["main_field"] == "modality"
    assert "confusion" in result["by_field"]["modality"]["fine_tuned"]
    assert "confusion" not in result["by_field"]["window"]["fine_tuned"]
    assert result["by_field"]["modality"]["fine_tuned"]["accuracy"] == 1.0


def test_gaussian_blur_keeps_flat_images_and_mass_and_spreads_by_sigma() -> None:
    flat = torch.full((2, 3, 16, 16), 77, dtype=torch.uint8)
    assert torch.equal(gaussian_blur(flat, 2.0), flat)
    point = torch.zeros(1, 1, 41, 41, dtype=torch.uint8)
    point[0, 0, 20, 20] = 255
    blurred = gaussian_blur(point, 1.5).double()[0, 0]
    assert blurred[20, 20] < 255 and abs(blurred.sum().item() - 255) < 41 * 41 * 0.5  # rounding
    row = blurred.sum(dim=0) / blurred.sum()
    offsets = torch.arange(41, dtype=torch.float64) - 20
    assert abs(float((row * offsets**2).sum()) - 1.5**2) < 0.3  # variance = sigma^2


def test_blurred_copies_make_the_classifier_read_content_not_sharpness() -> None:
    # classes differ in brightness; the training images are sharp (textured), the images
    # to read are smooth: a sharp-only fit keys on the texture and misreads them
    generator = torch.Generator().manual_seed(0)
    texture = (torch.rand(40, 1, 16, 16, generator=generator) > 0.5).to(torch.uint8) * 60
    brightness = torch.tensor([40] * 20 + [140] * 20, dtype=torch.uint8).view(40, 1, 1, 1)
    sharp = brightness + texture * torch.tensor([1] * 20 + [0] * 20).view(40, 1, 1, 1).to(
        torch.uint8
    )
    labels = [f"{'dark' if i < 20 else 'bright'}" for i in range(40)]
    smooth = torch.tensor([70] * 10 + [140] * 10, dtype=torch.uint8).view(20, 1, 1, 1)
    smooth = smooth.expand(20, 1, 16, 16).contiguous()
    truth = ["dark"] * 10 + ["bright"] * 10

    def features(images: torch.Tensor) -> torch.Tensor:  # mean and local contrast
        x = images.double()
        return torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))], dim=1)

    fields = [{"window": label} for label in labels]
    test = (features(sharp), fields)
    generated = {"model": (features(smooth), [{"window": t} for t in truth])}
    plain = field_adherence("window", (features(sharp), fields), test, generated, 20, 0)
    blurred = field_adherence(
        "window", (features(sharp), fields), test, generated, 20, 0,
        train_blurred=[features(gaussian_blur(sharp, s)) for s in (1.0, 2.0)],
    )  # fmt: skip
    assert plain["real_test"]["accuracy"] == blurred["real_test"]["accuracy"] == 1.0
    assert plain["model"]["accuracy"] <= 0.5 < blurred["model"]["accuracy"] == 1.0
    assert blurred["n_train"] == plain["n_train"] == 40  # copies are not counted as images
