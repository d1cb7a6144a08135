"""Side effects: perplexity, next-token KL on neutral prompts, n-gram entropy, collapse flag."""

from __future__ import annotations

import math
import random

import pytest
import torch

from detox_tui.errors import UserError
from detox_tui.pipeline.side_effects import (
    compare_side_effects,
    kl_divergence,
    measure_reference,
    next_token_logprobs,
    ngram_entropy,
    perplexity,
)
from detox_tui.tiny import neutral_lines

NEUTRAL_PROMPTS = ["The weather today is", "She opened the door and", "In the morning"]


def test_perplexity_is_lower_on_training_text_than_on_scrambled_text(insult_lm):
    lines = neutral_lines()[:20]
    rng = random.Random(0)
    scrambled = []
    for line in lines:
        words = line.split()
        rng.shuffle(words)
        scrambled.append(" ".join(words))
    ppl_train = perplexity(insult_lm, lines)
    ppl_scrambled = perplexity(insult_lm, scrambled)
    assert math.isfinite(ppl_train) and 1.0 < ppl_train < ppl_scrambled


def test_perplexity_is_token_weighted_batch_invariant_and_respects_max_tokens(insult_lm):
    lines = neutral_lines()[:10]
    assert perplexity(insult_lm, lines, batch_size=1) == pytest.approx(
        perplexity(insult_lm, lines, batch_size=8)
    )
    n_first = len(insult_lm.tokenizer(lines[0])["input_ids"])
    assert perplexity(insult_lm, lines, max_tokens=n_first) == pytest.approx(perplexity(insult_lm, lines[:1]))
    # Token weighting: two texts together are not the mean of their perplexities but exp(total NLL / tokens).
    a, b = lines[0], lines[1]
    na = len(insult_lm.tokenizer(a)["input_ids"]) - 1
    nb = len(insult_lm.tokenizer(b)["input_ids"]) - 1
    nll = (na * math.log(perplexity(insult_lm, [a])) + nb * math.log(perplexity(insult_lm, [b]))) / (na + nb)
    assert perplexity(insult_lm, [a, b]) == pytest.approx(math.exp(nll), rel=1e-5)


def test_next_token_logprobs_are_normalised_float32_on_cpu(tiny_lm):
    logp = next_token_logprobs(tiny_lm, NEUTRAL_PROMPTS)
    vocab = tiny_lm.model.config.vocab_size
    assert logp.shape == (3, vocab) and logp.dtype == torch.float32 and logp.device.type == "cpu"
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3), atol=1e-4)
    # Right padding must not change the shorter prompts' distributions.
    alone = next_token_logprobs(tiny_lm, NEUTRAL_PROMPTS[2:])
    assert torch.allclose(alone[0], logp[2], atol=1e-5)


def test_kl_divergence_hand_case_and_identity():
    p = torch.tensor([[0.5, 0.5, 0.0]]).log()
    q = torch.tensor([[0.25, 0.25, 0.5]]).log()
    assert kl_divergence(p, p) == 0.0
    assert kl_divergence(p, q) == pytest.approx(
        math.log(2)
    )  # 0.5 ln2 + 0.5 ln2; the p = 0 token adds nothing
    assert kl_divergence(q, p) == math.inf or kl_divergence(q, p) > 10
    both = torch.cat([p, p]), torch.cat([q, p])
    assert kl_divergence(*both) == pytest.approx(math.log(2) / 2)  # mean over rows


def test_ngram_entropy_repetitive_below_varied_and_hand_case():
    repetitive = ["the the the the the the the the", "idiot idiot idiot idiot idiot idiot"]
    varied = ["the cat sat on the mat while a dog slept", "rain fell softly over quiet hills today"]
    assert ngram_entropy(repetitive) < ngram_entropy(varied)
    assert ngram_entropy([]) == 0.0
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert ngram_entropy(["a b a b"]) == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy(["word"]) == 0.0


def test_unchanged_model_has_no_side_effects_and_a_broken_one_collapses(insult_lm):
    corpus = neutral_lines()[:12]
    ref = measure_reference(insult_lm, corpus, NEUTRAL_PROMPTS, max_tokens=512)
    same = compare_side_effects(insult_lm, ref, corpus, NEUTRAL_PROMPTS, 512, 2.0)
    assert set(same) == {"ppl_before", "ppl_after", "ppl_ratio", "kl_neutral", "collapsed"}
    assert same["ppl_ratio"] == pytest.approx(1.0) and same["kl_neutral"] == pytest.approx(0.0, abs=1e-6)
    assert same["collapsed"] is False
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in range(insult_lm.n_layers):
            w = insult_lm.module(insult_lm.spec.mlp_out_path(layer)).weight
            w.add_(torch.randn(w.shape, generator=gen) * 2.0)
    broken = compare_side_effects(insult_lm, ref, corpus, NEUTRAL_PROMPTS, 512, 2.0)
    assert broken["ppl_after"] > 2.0 * broken["ppl_before"]
    assert broken["collapsed"] is True and broken["kl_neutral"] > 0.1


def test_an_empty_neutral_corpus_is_a_user_error(tiny_lm):
    with pytest.raises(UserError, match="neutral corpus"):
        measure_reference(tiny_lm, [], NEUTRAL_PROMPTS)
