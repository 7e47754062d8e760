"""Matched real and generated sets: the same mix of prompts on both sides.

A generated image's condition is its prompt; a real test image's is its caption. FID/KID/PRDC
compare like with like only when both sets hold the same number of images of each condition,
so :func:`match_by_prompt` keeps, for every caption that is both a prompt and a test caption,
``min(real, generated, t)`` images of each side (seeded choice), with ``t`` the largest per-caption
cap that keeps each side within ``max_images``. Everything left out is counted, by caption.
When no prompt is a test caption (prompts from a grid or a file), :func:`unmatched` compares
every generated image with a seeded subset of the test images, marked ``matched: False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Matched:
    """Indices (into the real and generated lists) of the matched sets, and per-caption counts."""

    real: list[int]
    generated: list[int]
    per_caption: list[dict[str, Any]] = field(default_factory=list)
    matched: bool = True

    def summary(self, n_real: int, n_generated: int) -> dict[str, Any]:
        """What was compared: counts kept and left out on each side, by caption."""
        return {
            "matched": self.matched,
            "n_real": len(self.real),
            "n_generated": len(self.generated),
            "captions": sum(1 for c in self.per_caption if c["used"]),
            "real_left_out": n_real - len(self.real),
            "generated_left_out": n_generated - len(self.generated),
            "per_caption": self.per_caption,
        }


def per_caption_cap(pairs: Sequence[int], max_images: int) -> int:
    """Largest ``t`` with ``sum(min(p, t)) <= max_images`` (``pairs`` = matchable counts)."""
    cap = max(pairs, default=0)
    while cap > 0 and sum(min(p, cap) for p in pairs) > max_images:
        cap -= 1
    return cap


def match_by_prompt(
    real_captions: Sequence[str],
    prompts: Sequence[str],
    max_images: int,
    seed: int = 0,
) -> Matched:
    """Matched index lists (see the module doc), sorted, reproducible under ``seed``."""
    real_by: dict[str, list[int]] = {}
    for i, caption in enumerate(real_captions):
        real_by.setdefault(str(caption), []).append(i)
    gen_by: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        gen_by.setdefault(str(prompt), []).append(i)
    shared = sorted(set(real_by) & set(gen_by))
    cap = per_caption_cap([min(len(real_by[c]), len(gen_by[c])) for c in shared], max_images)
    rng = np.random.default_rng(seed)
    real: list[int] = []
    generated: list[int] = []
    per_caption = []
    for caption in sorted(set(real_by) | set(gen_by)):
        have_real, have_gen = real_by.get(caption, []), gen_by.get(caption, [])
        used = min(len(have_real), len(have_gen), cap)
        if used:
            real += sorted(rng.choice(have_real, used, replace=False).tolist())
            generated += sorted(rng.choice(have_gen, used, replace=False).tolist())
        per_caption.append(
            {"caption": caption, "real": len(have_real), "generated": len(have_gen), "used": used}
        )
    return Matched(sorted(real), sorted(generated), per_caption)


def subset_indices(n: int, cap: int, seed: int = 0) -> list[int]:
    """At most ``cap`` of ``range(n)``: a seeded random subset, sorted (all when ``n <= cap``)."""
    if n <= cap:
        return list(range(n))
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False)).tolist()


def unmatched(n_real: int, n_generated: int, max_images: int, seed: int = 0) -> Matched:
    """Every generated image against a seeded subset of at most ``max_images`` real ones."""
    return Matched(subset_indices(n_real, max_images, seed), list(range(n_generated)), [], False)
