"""Caption statistics for the dataset summary (pure functions)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from idc_diffusion.core.captions import CLIP_MAX_TOKENS, clip_token_count

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
LENGTH_BINS = (8, 16, 24, 32, 48, 64, CLIP_MAX_TOKENS)


def length_histogram(token_counts: Sequence[int]) -> dict[str, int]:
    """Captions per estimated-token-length bin ("<=8", ..., "<=77", ">77")."""
    bins: Counter[str] = Counter()
    for count in token_counts:
        edge = next((b for b in LENGTH_BINS if count <= b), None)
        bins[f"<={edge}" if edge is not None else f">{CLIP_MAX_TOKENS}"] += 1
    order = [f"<={b}" for b in LENGTH_BINS] + [f">{CLIP_MAX_TOKENS}"]
    return {key: bins[key] for key in order if bins[key]}


def caption_statistics(
    captions: Sequence[str], max_tokens: int = CLIP_MAX_TOKENS, top: int = 10
) -> dict:
    """Vocabulary, token-length histogram and most common captions of a caption list."""
    words: Counter[str] = Counter()
    for text in captions:
        words.update(_WORD.findall(text.lower()))
    tokens = [clip_token_count(text) for text in captions]
    return {
        "captions": len(captions),
        "distinct_captions": len(set(captions)),
        "vocabulary_size": len(words),
        "top_words": dict(words.most_common(top)),
        "tokens_max": max(tokens, default=0),
        "tokens_mean": round(sum(tokens) / len(tokens), 2) if tokens else 0.0,
        "over_token_limit": sum(t > max_tokens for t in tokens),
        "token_length_histogram": length_histogram(tokens),
        "most_common": [
            {"text": text, "count": count} for text, count in Counter(captions).most_common(top)
        ],
    }
