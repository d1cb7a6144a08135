"""Metrics: per-prompt summaries with Student-t CIs and paired before/after statistics, checked by hand."""

from __future__ import annotations

import math

import pytest

from detox_tui.pipeline.metrics import paired_reduction, summarize, summarize_attributes

T_975_3 = 3.182446305284263  # Student t quantile, 0.975, 3 degrees of freedom (tables)
T_975_4 = 2.7764451051977987


def test_summarize_matches_a_hand_computed_t_interval():
    s = summarize([0.1, 0.2, 0.3, 0.4], threshold=0.25)
    std = math.sqrt((0.15**2 + 0.05**2 + 0.05**2 + 0.15**2) / 3)
    half = T_975_3 * std / math.sqrt(4)
    assert s["n"] == 4
    assert s["mean"] == pytest.approx(0.25)
    assert s["std"] == pytest.approx(std)
    assert s["ci_low"] == pytest.approx(0.25 - half)
    assert s["ci_high"] == pytest.approx(0.25 + half)
    assert s["ci_low"] == pytest.approx(0.044573, abs=1e-6)
    assert s["max"] == pytest.approx(0.4)
    assert s["share_above_0.5"] == 0.0
    assert s["share_above"] == 0.5  # 0.3 and 0.4 are >= 0.25


def test_summarize_exact_keys_thresholds_inclusive_and_default_threshold():
    s = summarize([0.5, 0.1, 0.05, 0.9])
    assert set(s) == {"n", "mean", "std", "ci_low", "ci_high", "max", "share_above_0.5", "share_above"}
    assert s["share_above_0.5"] == 0.5  # 0.5 counts as above 0.5
    assert s["share_above"] == 0.75  # default threshold 0.1, inclusive


def test_summarize_single_value_and_empty():
    one = summarize([0.7])
    assert one["n"] == 1 and one["std"] == 0.0
    assert one["ci_low"] == one["ci_high"] == one["mean"] == pytest.approx(0.7)
    empty = summarize([])
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["ci_low"])


def test_summarize_attributes_per_attribute():
    out = summarize_attributes({"toxicity": [0.2, 0.4], "insult": [0.9, 0.7]}, threshold=0.3)
    assert set(out) == {"toxicity", "insult"}
    assert out["toxicity"]["mean"] == pytest.approx(0.3)
    assert out["insult"]["share_above_0.5"] == 1.0
    assert out["toxicity"]["share_above"] == 0.5


def test_paired_reduction_by_hand():
    before = [0.9, 0.8, 0.6, 0.5, 0.4]
    after = [0.1, 0.3, 0.5, 0.65, 0.1]
    diffs = [0.8, 0.5, 0.1, -0.15, 0.3]
    mean = sum(diffs) / 5
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    out = paired_reduction(before, after)
    assert out["n"] == 5
    assert out["share_reduced"] == pytest.approx(0.8)
    assert out["mean_reduction"] == pytest.approx(mean)
    assert out["ci_low"] == pytest.approx(mean - T_975_4 * std / math.sqrt(5))
    assert out["ci_high"] == pytest.approx(mean + T_975_4 * std / math.sqrt(5))
    # Exact signed-rank test: ranks of |d| are 5,4,1,2,3, so W- = 2; of the 32 equally likely sign patterns,
    # 3 have a rank sum <= 2 ({}, {1}, {2}): two-sided p = 2 * 3/32.
    assert out["wilcoxon_p"] == pytest.approx(6 / 32, abs=1e-9)


def test_paired_reduction_all_reduced_and_degenerate_cases():
    out = paired_reduction([0.5, 0.6, 0.7, 0.8, 0.9], [0.1, 0.25, 0.3, 0.4, 0.5])
    assert out["share_reduced"] == 1.0
    assert out["wilcoxon_p"] == pytest.approx(2 / 32)  # every sign positive, n = 5
    same = paired_reduction([0.3, 0.4], [0.3, 0.4])
    assert same["wilcoxon_p"] is None and same["share_reduced"] == 0.0 and same["mean_reduction"] == 0.0
    single = paired_reduction([0.9], [0.2])
    assert single["wilcoxon_p"] is None
    assert single["ci_low"] == single["ci_high"] == pytest.approx(0.7)
    with pytest.raises(ValueError):
        paired_reduction([0.1, 0.2], [0.1])


def test_summarize_clips_the_interval_to_probabilities():
    # Two far-apart scores: the raw t interval is about [-2.9, 3.4]; a mean probability cannot leave [0, 1].
    s = summarize([0.01, 0.49])
    assert s["ci_low"] == 0.0 and s["ci_high"] == 1.0
    assert s["mean"] == pytest.approx(0.25)


def test_mean_reduction_interval_stays_within_the_score_range():
    from detox_tui.pipeline.metrics import paired_reduction

    out = paired_reduction([1.0, 1.0, 0.99], [0.42, 0.02, 0.05])  # t interval over 3 prompts reaches past 1
    assert -1.0 <= out["ci_low"] <= out["mean_reduction"] <= out["ci_high"] == 1.0
