"""ROME and constrained fine-tuning on one request of the tiny insult model."""

from __future__ import annotations

import pytest
import torch

from detox_tui.backends.editing.base import EditContext, EditRequest
from detox_tui.backends.editing.ft import FineTuneEditor
from detox_tui.backends.editing.rome import RomeEditor
from detox_tui.backends.models import linear_weight_out_in, weights_fingerprint
from detox_tui.backends.stats import covariance
from detox_tui.errors import UserError
from detox_tui.tiny import INSULT_PAIRS, neutral_lines


def first_token(lm, text: str) -> int:
    return lm.tokenizer(text)["input_ids"][0]


def next_token_probs(lm, prompt: str) -> torch.Tensor:
    ids = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return lm.model(**ids).logits[0, -1].softmax(-1)


def neutral_perplexity(lm) -> float:
    nll, count = 0.0, 0
    for line in neutral_lines():
        ids = lm.tokenizer(line, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            nll += float(lm.model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return float(torch.exp(torch.tensor(nll / count)))


def one_request(lm) -> EditRequest:
    # Only the safe target's first token is reachable in the tiny model (see test_memit.py).
    prompt, _, safe = INSULT_PAIRS[0]
    return EditRequest(prompt, lm.tokenizer.decode([first_token(lm, safe)]))


@pytest.mark.parametrize("key_form", ["consistent", "reference"])
def test_rome_makes_the_safe_target_greedy_on_one_layer(insult_lm, key_form):
    lm = insult_lm
    request = one_request(lm)
    wanted = first_token(lm, request.target)
    assert int(next_token_probs(lm, request.prompt).argmax()) != wanted
    ppl_before = neutral_perplexity(lm)
    fingerprint = weights_fingerprint(lm.model)
    ctx = EditContext(covariance=lambda lm, layers: covariance(lm, layers, texts=neutral_lines()))
    # Tiny model: clamp 4 (ROME's GPT-2 XL value); its residual norms are too small for 3 to flip a
    # memorised continuation.
    hp = {"layer": 1, "clamp_norm_factor": 4.0, "n_templates": 2, "key_form": key_form}
    delta = RomeEditor().compute(lm, [request], hp, ctx)
    assert weights_fingerprint(lm.model) == fingerprint
    assert delta.layers == [1] and list(delta.deltas) == ["transformer.h.1.mlp.c_proj.weight"]
    # Rank one: a single non-zero singular value.
    sv = torch.linalg.svdvals(delta.deltas["transformer.h.1.mlp.c_proj.weight"].double())
    assert float(sv[1]) < 1e-4 * float(sv[0])
    with delta.applied_to(lm.model):
        assert int(next_token_probs(lm, request.prompt).argmax()) == wanted
        assert neutral_perplexity(lm) < 1.5 * ppl_before
    assert weights_fingerprint(lm.model) == fingerprint


def test_rome_refuses_more_than_one_layer(insult_lm):
    with pytest.raises(UserError, match="exactly one layer"):
        RomeEditor().compute(insult_lm, [one_request(insult_lm)], {"layers": [1, 2]}, EditContext())


@pytest.mark.parametrize("objective", ["ft-m", "ft-l"])
def test_ft_edits_within_the_norm_constraint(insult_lm, objective):
    lm = insult_lm
    request = one_request(lm)
    wanted = first_token(lm, request.target)
    eps = 0.02  # tiny model: 2e-3 (gpt2-medium's value) cannot move its few weights far enough
    fingerprint = weights_fingerprint(lm.model)
    originals = {
        layer: linear_weight_out_in(lm.module(lm.spec.mlp_out_path(layer)), lm.spec).clone()
        for layer in range(4)
    }
    hp = {"layers": [2], "lr": 5e-3, "norm_constraint": eps, "steps": 25, "objective": objective}
    delta = FineTuneEditor().compute(lm, [request], hp, EditContext())
    assert weights_fingerprint(lm.model) == fingerprint
    with delta.applied_to(lm.model):
        assert int(next_token_probs(lm, request.prompt).argmax()) == wanted
        for layer in range(4):
            now = linear_weight_out_in(lm.module(lm.spec.mlp_out_path(layer)), lm.spec)
            moved = float((now - originals[layer]).abs().max())
            if layer == 2:
                assert 0 < moved <= eps + 1e-7
            else:
                assert moved == 0.0
    assert weights_fingerprint(lm.model) == fingerprint


def test_ft_erase_lowers_the_insult_probability(insult_lm):
    lm = insult_lm
    prompt, insult, safe = INSULT_PAIRS[1]
    toxic = lm.tokenizer.decode([first_token(lm, insult)])
    before = float(next_token_probs(lm, prompt)[first_token(lm, insult)])
    hp = {"layers": [2], "lr": 5e-3, "norm_constraint": 0.02, "steps": 25}
    delta = FineTuneEditor().compute(
        lm, [EditRequest(prompt, safe, mode="erase", toxic=toxic)], hp, EditContext()
    )
    with delta.applied_to(lm.model):
        after = float(next_token_probs(lm, prompt)[first_token(lm, insult)])
    assert before > 0.9 and after < 0.5 * before
