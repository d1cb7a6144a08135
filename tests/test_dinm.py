"""DINM on the tiny insult model: per-request layer location, detoxified edits, weights left untouched."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from profanity_check import predict_prob

from detox_tui.backends.editing.base import EditContext, EditDelta, EditRequest, get_editor
from detox_tui.backends.editing.dinm import DinmEditor, locate_toxic_layer
from detox_tui.backends.models import weights_fingerprint
from detox_tui.errors import Cancelled, UserError
from detox_tui.tiny import INSULT_PAIRS

# Stronger than the gpt2-medium preset: the tiny model memorised its insults over 300 steps.
TINY_HPARAMS = {"steps": 20, "lr": 1e-2, "nll_weight": 1.0, "kl_weight": 1.0}


def _requests(pairs=INSULT_PAIRS[:3]) -> list[EditRequest]:
    return [EditRequest(prompt=p, target=safe, toxic=insult) for p, insult, safe in pairs]


def _greedy(lm, prompts: list[str], max_new_tokens: int = 10) -> list[str]:
    outs = []
    for prompt in prompts:
        enc = lm.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        outs.append(lm.tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return outs


def test_dinm_lowers_toxicity_of_edited_prompts_and_leaves_weights_unchanged(insult_lm):
    requests = _requests()
    prompts = [r.prompt for r in requests]
    before = predict_prob(_greedy(insult_lm, prompts))
    assert before.mean() > 0.9  # the tiny model really insults

    fingerprint = weights_fingerprint(insult_lm.model)
    delta = get_editor("dinm").compute(insult_lm, requests, TINY_HPARAMS, EditContext())
    assert weights_fingerprint(insult_lm.model) == fingerprint

    located = delta.info["located_layers"]
    assert len(located) == len(requests)
    assert all(0 <= layer < insult_lm.n_layers for layer in located)
    assert delta.layers == sorted(set(located))
    assert set(delta.deltas) == {f"{insult_lm.spec.mlp_out_path(layer)}.weight" for layer in located}
    assert len(delta.info["loss"]) == len(requests)
    assert all(len(curve) == TINY_HPARAMS["steps"] for curve in delta.info["loss_history"])

    with delta.applied_to(insult_lm.model):
        after = predict_prob(_greedy(insult_lm, prompts))
    assert after.mean() < 0.5
    assert np.all(after < before)
    assert weights_fingerprint(insult_lm.model) == fingerprint


def test_first_request_layer_is_located_on_the_original_model(insult_lm):
    requests = _requests(INSULT_PAIRS[:2])
    expected, distances = locate_toxic_layer(
        insult_lm, requests[0].prompt, requests[0].target, requests[0].toxic
    )
    assert len(distances) == insult_lm.n_layers
    assert distances[expected] == max(distances)
    delta = DinmEditor().compute(insult_lm, requests, {**TINY_HPARAMS, "steps": 2}, EditContext())
    assert delta.info["located_layers"][0] == expected
    assert delta.info["layer_distances"][0] == pytest.approx(distances)


def test_forced_layer_skips_location_and_edits_only_that_layer(insult_lm, tmp_path):
    delta = DinmEditor().compute(
        insult_lm, _requests(), {**TINY_HPARAMS, "steps": 3, "layer": 1}, EditContext()
    )
    assert delta.info["located_layers"] == [1, 1, 1]
    assert delta.layers == [1]
    assert list(delta.deltas) == [f"{insult_lm.spec.mlp_out_path(1)}.weight"]
    assert float(delta.deltas[list(delta.deltas)[0]].abs().max()) > 0

    loaded = EditDelta.load(delta.save(tmp_path / "dinm.safetensors"))
    assert loaded.info["located_layers"] == [1, 1, 1]
    assert torch.equal(loaded.deltas[list(delta.deltas)[0]], delta.deltas[list(delta.deltas)[0]])


def test_user_errors_and_cancel_leave_the_model_unchanged(insult_lm):
    fingerprint = weights_fingerprint(insult_lm.model)
    probe = insult_lm.tokenizer("The weather today is", return_tensors="pt")
    with torch.no_grad():
        logits = insult_lm.model(**probe).logits
    prompt, _, safe = INSULT_PAIRS[0]
    with pytest.raises(UserError, match="unsafe response"):
        DinmEditor().compute(
            insult_lm, [EditRequest(prompt=prompt, target=safe)], TINY_HPARAMS, EditContext()
        )
    with pytest.raises(UserError, match="out of range"):
        DinmEditor().compute(insult_lm, _requests(), {**TINY_HPARAMS, "layer": 99}, EditContext())

    cancel = threading.Event()
    calls = []

    def cancel_after_a_few(event):
        calls.append(event)
        if len(calls) == 4:
            cancel.set()

    with pytest.raises(Cancelled):
        DinmEditor().compute(
            insult_lm, _requests(), TINY_HPARAMS, EditContext(emit=cancel_after_a_few, cancel=cancel)
        )
    assert weights_fingerprint(insult_lm.model) == fingerprint
    with torch.no_grad():  # no tuning hook left behind either
        assert torch.equal(insult_lm.model(**probe).logits, logits)


def test_default_hparams_are_the_documented_dinm_preset(tiny_lm):
    hp = DinmEditor().default_hparams(tiny_lm)
    assert hp["steps"] == 10 and hp["lr"] == pytest.approx(5e-4)
    assert hp["nll_weight"] == pytest.approx(0.1) and hp["kl_weight"] == pytest.approx(1.0)


def test_validated_preset_hparams_locate_per_request(insult_lm):
    from detox_tui.backends.editing import presets

    hp = presets.validate_hparams(insult_lm, "dinm", {"steps": 1})
    assert hp["layer"] is None
    delta = DinmEditor().compute(insult_lm, _requests(), hp, EditContext())
    assert delta.info["forced_layer"] is False
    assert len(delta.info["located_layers"]) == 3
