"""Prompt adherence: does a generated image show what its prompt asked for?

The standard conditional check (RoentGen scored its generated radiographs with a classifier):
for every caption field with two or more values among the real training images (modality,
body part, window, view, sex, age band, ...), a multinomial logistic regression is fitted on
the training images' features (the evaluation's feature extractor) and reads the field back:

* on the real test images: the **ceiling**, what the classifier achieves on real images;
* on each set of generated images, against the fields of its own prompt.

Accuracies carry percentile-bootstrap intervals and ``n``; the main field also gets its
confusion matrix.

The classifier may also be fitted on Gaussian-blurred copies of the training images (same
labels; ``evaluate.adherence_blur``): generated images are often softer than real ones, and
a classifier that has seen only sharp images can read sharpness as a class (on the demo, one
fitted on sharp images alone called every generated lung-window CT "mediastinum", though
their grey levels matched the lung window's). Blurred copies make it read the field from the
content; the ceiling stays on the sharp real test images.

A field the images do not show (e.g. the patient's sex in a phantom) has a ceiling near
chance, which is why the ceiling is reported beside every sample score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from idc_diffusion.core.captions import CAPTION_FIELDS
from idc_diffusion.evaluate.metrics import percentile_interval

Fields = Mapping[str, Any] | None


@dataclass(frozen=True)
class Classifier:
    """A fitted multinomial logistic regression on standardised features."""

    classes: tuple[str, ...]
    mean: Tensor
    scale: Tensor
    weight: Tensor
    bias: Tensor

    def scores(self, features: Tensor) -> Tensor:
        """Class logits ``[N, C]``."""
        x = (features.double() - self.mean) / self.scale
        return x @ self.weight + self.bias

    def predict(self, features: Tensor) -> list[str]:
        """The most probable class of each row (none for an empty input)."""
        if not len(features):
            return []
        return [self.classes[i] for i in self.scores(features).argmax(dim=1).tolist()]


def fit_classifier(
    features: Tensor, labels: Sequence[str], l2: float = 1e-3, max_iter: int = 200
) -> Classifier:
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS (deterministic).

    Features are standardised with the training mean and standard deviation. The objective
    is convex, so the fit does not depend on a seed.
    """
    classes = tuple(sorted({str(v) for v in labels}))
    if len(classes) < 2:
        raise ValueError(f"need at least two classes to fit a classifier, got {classes}")
    x = features.double()
    mean = x.mean(dim=0)
    scale = x.std(dim=0, correction=0).clamp_min(1e-8)
    x = (x - mean) / scale
    y = torch.tensor([classes.index(str(v)) for v in labels])
    weight = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return Classifier(classes, mean, scale, weight.detach(), bias.detach())


def accuracy(
    predicted: Sequence[str], truth: Sequence[str], n_boot: int, seed: int
) -> dict[str, Any]:
    """Fraction of ``predicted == truth`` with ``n`` and a 95 % percentile-bootstrap interval."""
    correct = np.array([p == t for p, t in zip(predicted, truth, strict=True)], dtype=float)
    if not len(correct):
        return {"accuracy": None, "ci95": None, "n": 0}
    interval = None
    if n_boot > 0:
        draws = np.random.default_rng(seed).integers(0, len(correct), (n_boot, len(correct)))
        interval = list(percentile_interval(correct[draws].mean(axis=1)))
    return {"accuracy": float(correct.mean()), "ci95": interval, "n": len(correct)}


def confusion_matrix(
    truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]
) -> list[list[int]]:
    """Counts ``[i][j]`` of images of class ``classes[i]`` predicted as ``classes[j]``."""
    position = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for t, p in zip(truth, predicted, strict=True):
        matrix[position[t]][position[p]] += 1
    return matrix


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """uint8 images ``[N, C, H, W]`` blurred by a Gaussian of ``sigma`` pixels (separable,
    edges replicated, truncated at 3 sigma), rounded back to uint8."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    n, c, h, w = images.shape
    x = images.float().reshape(n * c, 1, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.round().clamp(0, 255).to(torch.uint8).reshape(n, c, h, w)


def scorable_fields(
    train_fields: Sequence[Fields], fields: Sequence[str] = CAPTION_FIELDS
) -> list[str]:
    """The fields with at least two distinct non-null values among the training images."""
    return [f for f in fields if len({str(x[f]) for x in train_fields if x and x.get(f)}) >= 2]


def _labelled(features: Tensor, fields: Sequence[Fields], field: str, classes: Sequence[str]):
    """Rows whose ``field`` is one of ``classes``: (features, labels, rows left out)."""
    keep = [i for i, f in enumerate(fields) if f and f.get(field) and str(f[field]) in classes]
    labels = [str(fields[i][field]) for i in keep]
    return features[torch.tensor(keep, dtype=torch.long)], labels, len(fields) - len(keep)


def field_adherence(
    field: str,
    train: tuple[Tensor, Sequence[Fields]],
    test: tuple[Tensor, Sequence[Fields]],
    generated: Mapping[str, tuple[Tensor, Sequence[Fields]]],
    n_boot: int,
    seed: int,
    confusion: bool = False,
    train_blurred: Sequence[Tensor] = (),
) -> dict[str, Any]:
    """One field: classifier fitted on ``train``, scored on ``test`` and each generated set.

    Each set is ``(features, fields per image)``; an image whose field is missing, or has a
    value the training images lack, is left out of that field's score (counted in
    ``left_out``). With ``confusion`` each set also gets its confusion matrix.
    ``train_blurred``: features of blurred copies of the training images (same order), also
    fitted on with the same labels.
    """
    values = sorted({str(f[field]) for f in train[1] if f and f.get(field)})
    train_x, train_y, _ = _labelled(train[0], train[1], field, values)
    copies = [_labelled(x, train[1], field, values)[0] for x in train_blurred]
    classifier = fit_classifier(torch.cat([train_x, *copies]), train_y * (1 + len(copies)))
    counts = {c: train_y.count(c) for c in classifier.classes}
    result: dict[str, Any] = {
        "field": field,
        "classes": list(classifier.classes),
        "n_train": len(train_y),
        "train_counts": counts,
        "majority_rate": max(counts.values()) / len(train_y),
    }
    for name, (features, fields) in {"real_test": test, **generated}.items():
        x, truth, left_out = _labelled(features, fields, field, classifier.classes)
        predicted = classifier.predict(x)
        score = {**accuracy(predicted, truth, n_boot, seed), "left_out": left_out}
        if confusion:
            score["confusion"] = confusion_matrix(truth, predicted, classifier.classes)
        result[name] = score
    return result


def prompt_adherence(
    train: tuple[Tensor, Sequence[Fields]],
    test: tuple[Tensor, Sequence[Fields]],
    generated: Mapping[str, tuple[Tensor, Sequence[Fields]]],
    n_boot: int = 200,
    seed: int = 0,
    fields: Sequence[str] = CAPTION_FIELDS,
    train_blurred: Mapping[float, Tensor] | None = None,
) -> dict[str, Any]:
    """Adherence of every scorable field (:func:`scorable_fields`); the first is the main one.

    ``generated`` maps a model name (``fine_tuned``, ``base``) to its images' features and
    the fields of each image's prompt (None when the prompt is no caption of the dataset).
    ``train_blurred`` maps a blur sigma to the features of the training images blurred by it.
    """
    chosen = scorable_fields(train[1], fields)
    blurred = dict(train_blurred or {})
    return {
        "fields": chosen,
        "main_field": chosen[0] if chosen else None,
        "train_blur_sigmas": sorted(blurred),
        "by_field": {
            field: field_adherence(
                field, train, test, generated, n_boot, seed, i == 0, list(blurred.values())
            )
            for i, field in enumerate(chosen)
        },
    }
