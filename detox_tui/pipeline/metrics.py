"""Per-prompt summaries with Student-t confidence intervals, and paired before/after statistics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
NAN = float("nan")


def t_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided Student-t confidence interval of the mean; (mean, mean) for one value, (nan, nan) for none."""
    n = values.size
    if n == 0:
        return NAN, NAN
    mean = float(values.mean())
    if n < 2:
        return mean, mean
    sem = float(values.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * sem
    return mean - half, mean + half


def summarize(values: Sequence[float], threshold: float = 0.1) -> dict[str, Any]:
    """n, mean, std (ddof=1), 95% t CI of the mean (clipped to [0, 1]), max, share >= 0.5 and >= ``threshold``.

    An empty input gives n = 0 and NaN everywhere else: no data is not a score of zero.
    """
    x = np.asarray(values, dtype=float).ravel()
    n = int(x.size)
    if n == 0:
        return {
            "n": 0,
            "mean": NAN,
            "std": NAN,
            "ci_low": NAN,
            "ci_high": NAN,
            "max": NAN,
            "share_above_0.5": NAN,
            "share_above": NAN,
        }
    ci_low, ci_high = t_interval(x)
    # Scores are probabilities: with few samples a t interval can leave [0, 1], which no mean can.
    ci_low, ci_high = max(ci_low, 0.0), min(ci_high, 1.0)
    return {
        "n": n,
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if n >= 2 else 0.0,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "max": float(x.max()),
        "share_above_0.5": float((x >= 0.5).mean()),
        "share_above": float((x >= threshold).mean()),
    }


def summarize_attributes(scores: Mapping[str, Sequence[float]], threshold: float = 0.1) -> dict[str, dict]:
    """``summarize`` for every scored attribute (toxicity, insult, threat...)."""
    return {attr: summarize(values, threshold) for attr, values in scores.items()}


def paired_reduction(before_means: Sequence[float], after_means: Sequence[float]) -> dict[str, Any]:
    """Paired before/after comparison over prompts.

    share_reduced: share of prompts whose score went down; mean_reduction: mean of (before - after) with its 95%
    t CI; wilcoxon_p: two-sided Wilcoxon signed-rank p-value (None when n < 2 or every difference is zero).
    """
    before = np.asarray(before_means, dtype=float).ravel()
    after = np.asarray(after_means, dtype=float).ravel()
    if before.shape != after.shape:
        raise ValueError(f"{before.size} before values but {after.size} after values")
    n = int(before.size)
    if n == 0:
        return {
            "n": 0,
            "share_reduced": NAN,
            "mean_reduction": NAN,
            "ci_low": NAN,
            "ci_high": NAN,
            "wilcoxon_p": None,
        }
    diff = before - after
    ci_low, ci_high = t_interval(diff)
    p_value: float | None = None
    if n >= 2 and np.any(diff != 0):
        res = stats.wilcoxon(before, after, alternative="two-sided")
        p_value = float(res.pvalue) if math.isfinite(float(res.pvalue)) else None
    return {
        "n": n,
        "share_reduced": float((after < before).mean()),
        "mean_reduction": float(diff.mean()),
        "ci_low": ci_low,
        "ci_high": ci_high,
        "wilcoxon_p": p_value,
    }
