"""Analyses of trained language models: the AR-hit perplexity split of Zoology's Table 1 (`ar_hits`)."""

from zoo_jax.analysis.ar_hits import (
    PAPER_THRESHOLD_RATE,
    ArHitReport,
    BigramCounts,
    GapExplained,
    SliceStats,
    analyze,
    ar_hit_mask,
    count_bigrams,
    gap_explained,
    load_eval,
    save_eval,
    scaled_threshold,
    seen_earlier_mask,
)

__all__ = [
    "PAPER_THRESHOLD_RATE",
    "ArHitReport",
    "BigramCounts",
    "GapExplained",
    "SliceStats",
    "analyze",
    "ar_hit_mask",
    "count_bigrams",
    "gap_explained",
    "load_eval",
    "save_eval",
    "scaled_threshold",
    "seen_earlier_mask",
]
