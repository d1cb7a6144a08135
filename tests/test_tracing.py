"""Causal tracing on a tiny GPT-2: shape, clean-restore recovery, kinds, subject corruption, events."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from detox_tui.backends.tracing import TraceResult, peak_layers, trace, window_layers
from detox_tui.errors import Cancelled, UserError
from detox_tui.pipeline.events import Progress

PROMPT = "People from that town are all"


def _prompt_len(lm, prompt: str = PROMPT) -> int:
    return len(lm.tokenizer(prompt)["input_ids"])


def _continuation_prob(lm, prompt: str, continuation: str) -> float:
    p_ids = lm.tokenizer(prompt)["input_ids"]
    c_ids = lm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([p_ids + c_ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[len(p_ids) - 1 + i, c] for i, c in enumerate(c_ids)).exp())


def test_restoring_last_layer_at_last_token_recovers_clean_probability(tiny_lm):
    # " stupid" is one token, so the last prompt position's last-layer state decides it alone.
    assert len(tiny_lm.tokenizer(" stupid", add_special_tokens=False)["input_ids"]) == 1
    result = trace(tiny_lm, PROMPT, " stupid", samples=4, seed=1)

    n_tokens = _prompt_len(tiny_lm)
    assert result.scores.shape == (tiny_lm.n_layers, n_tokens)
    assert result.layers == tiny_lm.n_layers and len(result.tokens) == n_tokens
    assert "".join(result.tokens) == PROMPT
    assert np.isfinite(result.scores).all()
    assert result.p_clean == pytest.approx(_continuation_prob(tiny_lm, PROMPT, " stupid"), rel=1e-4)
    # The corruption must change the probability, or the recovery below would be trivial.
    assert abs(result.p_clean - result.p_corrupted) > 1e-3 * result.p_clean
    assert result.scores[-1, -1] == pytest.approx(result.p_clean - result.p_corrupted, rel=1e-3)
    assert result.p_corrupted + result.scores[-1, -1] == pytest.approx(result.p_clean, rel=1e-4)


def test_multi_token_continuation_probability_is_the_teacher_forced_product(tiny_lm):
    result = trace(tiny_lm, PROMPT, " stupid idiots and losers.", samples=2)
    assert result.p_clean == pytest.approx(
        _continuation_prob(tiny_lm, PROMPT, " stupid idiots and losers."), rel=1e-4
    )


@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_mlp_and_attn_kinds_run_with_a_window(tiny_lm, kind):
    result = trace(tiny_lm, PROMPT, " stupid", kind=kind, window=2, samples=3, batch_size=12)
    assert result.kind == kind and result.window == 2
    assert result.scores.shape == (tiny_lm.n_layers, _prompt_len(tiny_lm))
    assert np.isfinite(result.scores).all()
    assert np.abs(result.scores).max() > 0


def test_window_is_centred_and_clipped():
    assert window_layers(5, 10, 24) == list(range(0, 10))
    assert window_layers(12, 10, 24) == list(range(7, 17))
    assert window_layers(23, 4, 24) == [21, 22, 23]
    assert window_layers(2, 1, 4) == [2]


def test_batch_size_does_not_change_scores(tiny_lm):
    small = trace(tiny_lm, PROMPT, " stupid", samples=2, batch_size=2)
    large = trace(tiny_lm, PROMPT, " stupid", samples=2, batch_size=200)
    np.testing.assert_allclose(small.scores, large.scores, rtol=1e-4, atol=1e-12)


def test_subject_corruption_leaves_earlier_tokens_without_effect(tiny_lm):
    result = trace(tiny_lm, PROMPT, " stupid", subject="that town", samples=3)
    tokens_before = len(tiny_lm.tokenizer("People from")["input_ids"])
    # Causal attention: tokens before the noised subject never see the noise, so restoring them is a no-op.
    assert np.all(result.scores[:, :tokens_before] == 0)
    assert np.abs(result.scores[:, tokens_before:]).max() > 0


def test_to_dict_is_json_and_peak_layers_pick_the_strongest(tiny_lm):
    result = trace(tiny_lm, PROMPT, " stupid", samples=2)
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) == {
        "tokens",
        "layers",
        "scores",
        "continuation",
        "p_clean",
        "p_corrupted",
        "kind",
        "window",
    }
    assert len(data["scores"]) == tiny_lm.n_layers and len(data["scores"][0]) == len(data["tokens"])
    assert data["continuation"] == " stupid"

    scores = np.zeros((5, 3))
    scores[3, 1], scores[1, 2], scores[4, 0] = 0.9, 0.5, -0.7
    synthetic = TraceResult(["a", "b", "c"], 5, scores, 1.0, 0.1, " x", "hidden", 1)
    assert peak_layers(synthetic, k=2) == [1, 3]
    assert peak_layers(result, k=2) == sorted(peak_layers(result, k=2))
    assert all(0 <= layer < tiny_lm.n_layers for layer in peak_layers(result, k=10))


def test_progress_is_reported_and_cancel_stops(tiny_lm):
    events = []
    trace(tiny_lm, PROMPT, " stupid", samples=2, emit=events.append)
    progress = [e for e in events if isinstance(e, Progress) and e.stage == "trace"]
    assert progress[-1].done == progress[-1].total == tiny_lm.n_layers * _prompt_len(tiny_lm)

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        trace(tiny_lm, PROMPT, " stupid", samples=2, cancel=cancel)


def test_bad_arguments_are_user_errors(tiny_lm):
    with pytest.raises(UserError, match="trace kind"):
        trace(tiny_lm, PROMPT, " stupid", kind="neurons")
    with pytest.raises(UserError, match="does not occur"):
        trace(tiny_lm, PROMPT, " stupid", subject="village")
    with pytest.raises(UserError, match="continuation"):
        trace(tiny_lm, PROMPT, "")
