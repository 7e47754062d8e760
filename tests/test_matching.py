"""Matched real/generated sets: the same number of images of each caption on both sides."""

from __future__ import annotations

from collections import Counter

from idc_diffusion.evaluate.matching import (
    match_by_prompt,
    per_caption_cap,
    subset_indices,
    unmatched,
)


def test_the_reviewers_case_compares_like_with_like() -> None:
    """18 CT + 6 MR generated vs 8 CT + 4 MR + 2 CR real: 8 CT + 4 MR on each side."""
    prompts = ["CT"] * 18 + ["MR"] * 6
    real = ["CT"] * 8 + ["MR"] * 4 + ["CR"] * 2
    matched = match_by_prompt(real, prompts, max_images=100, seed=0)
    real_mix = Counter(real[i] for i in matched.real)
    generated_mix = Counter(prompts[i] for i in matched.generated)
    assert real_mix == generated_mix == {"CT": 8, "MR": 4}
    summary = matched.summary(len(real), len(prompts))
    assert summary["matched"] is True and summary["captions"] == 2
    assert summary["real_left_out"] == 2 and summary["generated_left_out"] == 12
    assert summary["per_caption"] == [
        {"caption": "CR", "real": 2, "generated": 0, "used": 0},
        {"caption": "CT", "real": 8, "generated": 18, "used": 8},
        {"caption": "MR", "real": 4, "generated": 6, "used": 4},
    ]


def test_cap_keeps_the_mix_equal_and_choice_seeded() -> None:
    prompts = ["a"] * 10 + ["b"] * 10 + ["c"] * 2
    real = ["a"] * 12 + ["b"] * 6 + ["c"] * 5
    matched = match_by_prompt(real, prompts, max_images=9, seed=1)
    # matchable 10 / 6 / 2: a cap of 4 per caption would need 10 > 9 images, 3 needs 8
    assert Counter(real[i] for i in matched.real) == {"a": 3, "b": 3, "c": 2}
    assert Counter(prompts[i] for i in matched.generated) == {"a": 3, "b": 3, "c": 2}
    again = match_by_prompt(real, prompts, max_images=9, seed=1)
    assert (again.real, again.generated) == (matched.real, matched.generated)
    other = match_by_prompt(real, prompts, max_images=9, seed=2)
    assert (other.real, other.generated) != (matched.real, matched.generated)
    assert len(set(matched.real)) == len(matched.real) == 8  # no image twice


def test_per_caption_cap() -> None:
    assert per_caption_cap([10, 6, 2], 100) == 10
    assert per_caption_cap([10, 6, 2], 9) == 3  # 4 + 4 + 2 = 10 > 9; 3 + 3 + 2 = 8
    assert per_caption_cap([], 5) == 0


def test_unmatched_and_subsets() -> None:
    fallback = unmatched(n_real=10, n_generated=4, max_images=6, seed=0)
    assert fallback.generated == [0, 1, 2, 3] and len(fallback.real) == 6
    assert fallback.summary(10, 4)["matched"] is False
    assert subset_indices(3, 5) == [0, 1, 2]
    assert subset_indices(10, 4, seed=0) == sorted(set(subset_indices(10, 4, seed=0)))
