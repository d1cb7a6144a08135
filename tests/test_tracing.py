"""Causal tracing on a tiny GPT-2: shape, clean-restore recovery, kinds, subject corruption, events."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from detox_tui.backends.tracing import TraceResult, noise_level, peak_layers, trace, window_layers
from detox_tui.errors import Cancelled, UserError
from detox_tui.events import Progress

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
        "noise",
    }
    assert len(data["scores"]) == tiny_lm.n_layers and len(data["scores"][0]) == len(data["tokens"])
    assert data["continuation"] == " stupid"
    assert data["noise"] == result.noise > 0

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


# --- Noise level and restoration window, checked against a re-implementation written here -----------------
# The tiny model is GPT-2: transformer.wte is the token embedding, transformer.drop (identity in eval) sees
# token + position embeddings, i.e. the corrupted input of the first block.

SUBJECT = "that town"


def _ids(lm, text: str) -> list[int]:
    return list(lm.tokenizer(text)["input_ids"])


def _subject_token_ids(lm) -> tuple[list[int], list[int]]:
    """The subject's token ids as they are in PROMPT, and their positions."""
    before, through, full = _ids(lm, "People from"), _ids(lm, "People from that town"), _ids(lm, PROMPT)
    assert full[: len(through)] == through and through[: len(before)] == before
    return through[len(before) :], list(range(len(before), len(through)))


def _embedding_std(lm, ids: list[int]) -> float:
    return float(lm.model.transformer.wte.weight.detach()[ids].double().std())


class _FirstBlockInputs:
    """Records the input of the first block (embeddings + positions) of every forward pass."""

    def __init__(self, lm):
        self.lm, self.seen = lm, []

    def __enter__(self):
        def hook(_m, _i, out):
            self.seen.append(out.detach().clone())

        self.handle = self.lm.model.transformer.drop.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_noise_is_three_times_the_std_of_the_subject_token_embeddings(tiny_lm):
    lm = tiny_lm
    ids, positions = _subject_token_ids(lm)
    samples = 12
    with _FirstBlockInputs(lm) as rec:
        result = trace(lm, PROMPT, " stupid", subject=SUBJECT, samples=samples, seed=3)
    expected = 3 * _embedding_std(lm, ids)
    assert result.noise == pytest.approx(expected, rel=1e-6)
    assert result.to_dict()["noise"] == pytest.approx(expected, rel=1e-6)
    # The model really saw that much noise: the first corrupted pass (the no-restoration baseline, one row
    # per sample) minus the clean pass is zero off the subject and N(0, noise^2) on it.
    clean = rec.seen[0]
    corrupted = next(x for x in rec.seen if x.shape[0] == samples)
    diff = (corrupted - clean).double()
    others = [i for i in range(clean.shape[1]) if i not in positions]
    assert float(diff[:, others].abs().max()) == 0.0
    on_subject = diff[:, positions]
    assert float(on_subject.pow(2).mean().sqrt()) == pytest.approx(expected, rel=0.1)

    # No subject: the prompt's own tokens; a list of texts: theirs; an explicit level: that one.
    whole = trace(lm, PROMPT, " stupid", samples=2)
    assert whole.noise == pytest.approx(3 * _embedding_std(lm, _ids(lm, PROMPT)), rel=1e-6)
    texts = ["that town", "my coworker", "the other team"]
    corpus_ids = [i for t in texts for i in _ids(lm, t)]
    from_texts = trace(lm, PROMPT, " stupid", subject=SUBJECT, samples=2, noise_texts=texts)
    assert from_texts.noise == pytest.approx(3 * _embedding_std(lm, corpus_ids), rel=1e-6)
    assert noise_level(lm, texts) == pytest.approx(from_texts.noise, rel=1e-12)
    with _FirstBlockInputs(lm) as rec:
        fixed = trace(lm, PROMPT, " stupid", subject=SUBJECT, samples=samples, noise=0.5)
    assert fixed.noise == 0.5
    diff = (next(x for x in rec.seen if x.shape[0] == samples) - rec.seen[0]).double()[:, positions]
    assert float(diff.pow(2).mean().sqrt()) == pytest.approx(0.5, rel=0.1)
    with pytest.raises(UserError, match="noise"):
        trace(lm, PROMPT, " stupid", noise=-1.0)


def _continuation_probs(logits: torch.Tensor, n_prompt: int, cont: list[int]) -> torch.Tensor:
    logp = logits.double().log_softmax(-1)
    return torch.stack([logp[:, n_prompt - 1 + j, c] for j, c in enumerate(cont)], dim=-1).sum(-1).exp()


@pytest.mark.parametrize("kind, module", [("mlp", "mlp"), ("attn", "attn")])
def test_window_restores_that_many_layers_around_each_cell(tiny_lm, kind, module):
    """Each mlp/attn cell = p with the clean outputs of `window` layers centred on it restored at its token."""
    lm = tiny_lm
    lm.model.double()  # exact comparison with the re-implementation below
    samples, window = 3, 3
    with _FirstBlockInputs(lm) as rec:
        result = trace(lm, PROMPT, " stupid", subject=SUBJECT, kind=kind, window=window, samples=samples)
    corrupted = next(x for x in rec.seen if x.shape[0] == samples)
    prompt_ids, cont = _ids(lm, PROMPT), lm.tokenizer(" stupid", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + cont]).expand(samples, -1)
    blocks = lm.model.transformer.h
    n = len(blocks)

    clean_out = {}
    handles = [
        getattr(blocks[i], module).register_forward_hook(
            lambda _m, _i, out, i=i: clean_out.__setitem__(i, (out[0] if isinstance(out, tuple) else out)[0])
        )
        for i in range(n)
    ]
    with torch.no_grad():
        lm.model(input_ids=ids[:1])
    for h in handles:
        h.remove()

    def p_restoring(layers: list[int], token: int | None) -> float:
        def restore(i):
            def hook(_m, _i, out):
                h = out[0] if isinstance(out, tuple) else out
                h = h.clone()
                h[:, token] = clean_out[i][token]
                return (h, *out[1:]) if isinstance(out, tuple) else h

            return hook

        hs = [lm.model.transformer.drop.register_forward_hook(lambda _m, _i, _o: corrupted)]
        hs += [getattr(blocks[i], module).register_forward_hook(restore(i)) for i in layers]
        try:
            with torch.no_grad():
                logits = lm.model(input_ids=ids).logits
        finally:
            for h in hs:
                h.remove()
        return float(_continuation_probs(logits, len(prompt_ids), cont).mean())

    p_corrupted = p_restoring([], None)
    assert result.p_corrupted == pytest.approx(p_corrupted, rel=1e-9)
    assert result.window == window
    widened = 0
    for layer in range(n):
        lo = layer - window // 2
        restored = [i for i in range(lo, lo + window) if 0 <= i < n]
        for t in range(len(prompt_ids)):
            expected = p_restoring(restored, t) - p_corrupted
            assert result.scores[layer, t] == pytest.approx(expected, rel=1e-7, abs=1e-13)
            centre_only = p_restoring([layer], t) - p_corrupted
            widened += abs(centre_only - expected) > 1e-6 * abs(expected) + 1e-12
    assert widened > 0  # the window made a visible difference on some cells
