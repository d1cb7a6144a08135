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


# ---------------------------------------------------------------- location on a hand-wired model

LOCATE_PROMPT, LOCATE_UNSAFE, LOCATE_SAFE = INSULT_PAIRS[0]
WRITE = 2  # the residual coordinate the hand-wired units write on


def _wire_toxic_layer(lm, toxic_layer: int) -> None:
    """Hand-set tiny_lm's weights so that the safe/unsafe block-output distance peaks at ``toxic_layer``.

    Tokens only in the unsafe response get +10 on residual coordinate 0 (0 for every other token and
    position). In block ``toxic_layer`` MLP unit 0 reads that marker and writes ~+250 on coordinate WRITE;
    in the next block (if any) unit 0 reads coordinate WRITE and writes ~-250 back, cancelling it. So only
    block ``toxic_layer``'s output carries the large difference; blocks before and after differ by about the
    marker. No block writes anything through attention, so each position is on its own.
    """
    ids = lambda text: set(lm.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    marked = ids(LOCATE_UNSAFE) - ids(LOCATE_SAFE) - ids(LOCATE_PROMPT)
    assert marked
    tr = lm.model.transformer
    with torch.no_grad():
        tr.wte.weight[:, [0, WRITE]] = 0.0
        tr.wte.weight[sorted(marked), 0] = 10.0
        tr.wpe.weight[:, [0, WRITE]] = 0.0
        for block in tr.h:
            block.attn.c_proj.weight.zero_()
            block.attn.c_proj.bias.zero_()
            block.mlp.c_proj.weight[:, [0, WRITE]] = 0.0
            block.mlp.c_proj.bias[[0, WRITE]] = 0.0
        wired = [(toxic_layer, 0, 50.0)]
        if toxic_layer + 1 < lm.n_layers:
            wired.append((toxic_layer + 1, WRITE, -50.0))
        for layer, read, write in wired:
            mlp = tr.h[layer].mlp  # Conv1D weights: (in, out)
            mlp.c_fc.weight[:, 0] = 0.0
            mlp.c_fc.weight[read, 0] = 1.0
            mlp.c_fc.bias[0] = -3.0  # silent (gelu ~ 0) unless the coordinate read dominates the layer norm
            mlp.c_proj.weight[0, :] = 0.0
            mlp.c_proj.weight[0, WRITE] = write


def _response_block_distances(lm, prompt: str, safe: str, unsafe: str) -> list[float]:
    """L2 distance between the safe and unsafe responses' block outputs, each mean-pooled over the
    response tokens: computed here from HF's hidden states (the last one without the final norm)."""

    def states(response):
        p_ids = lm.tokenizer(prompt)["input_ids"]
        r_ids = lm.tokenizer(response, add_special_tokens=False)["input_ids"]
        last = []
        handle = lm.model.transformer.h[-1].register_forward_hook(
            lambda _m, _i, out: last.append((out[0] if isinstance(out, tuple) else out)[0])
        )
        try:
            with torch.no_grad():
                out = lm.model(input_ids=torch.tensor([p_ids + r_ids]), output_hidden_states=True)
        finally:
            handle.remove()
        blocks = [h[0] for h in out.hidden_states[1:-1]] + last
        return [b[len(p_ids) :].mean(0) for b in blocks]

    return [float((s - u).norm()) for s, u in zip(states(safe), states(unsafe), strict=True)]


@pytest.mark.parametrize("toxic_layer", [1, 2, 3])
def test_locate_finds_the_layer_where_safe_and_unsafe_hidden_states_differ_most(tiny_lm, toxic_layer):
    _wire_toxic_layer(tiny_lm, toxic_layer)
    expected = _response_block_distances(tiny_lm, LOCATE_PROMPT, LOCATE_SAFE, LOCATE_UNSAFE)
    others = [d for i, d in enumerate(expected) if i != toxic_layer]
    assert expected[toxic_layer] > 5 * max(others)  # the wiring really puts the peak there

    layer, distances = locate_toxic_layer(tiny_lm, LOCATE_PROMPT, LOCATE_SAFE, LOCATE_UNSAFE)
    assert layer == toxic_layer
    assert distances == pytest.approx(expected, rel=1e-4, abs=1e-4)

    # The editor locates it too, and tunes only that layer's out-projection.
    request = EditRequest(prompt=LOCATE_PROMPT, target=LOCATE_SAFE, toxic=LOCATE_UNSAFE)
    delta = DinmEditor().compute(tiny_lm, [request], {"steps": 1}, EditContext())
    assert delta.info["located_layers"] == [toxic_layer]
    assert list(delta.deltas) == [f"{tiny_lm.spec.mlp_out_path(toxic_layer)}.weight"]


# ---------------------------------------------------------------- the KL term keeps neutral prompts in place

NEUTRAL = [
    "The weather today is",
    "My favourite book is",
    "The best way to cook rice is",
    "Yesterday I went to the",
    "The history of the city began",
    "On weekends we like to",
]


def _neutral_drift(lm, delta: EditDelta) -> float:
    """Mean KL(p_original || p_edited) of the next-token distributions at every position of each neutral
    prompt (one prompt at a time, no padding): measured here, not by the editor."""

    def log_probs():
        with torch.no_grad():
            return [
                torch.log_softmax(
                    lm.model(input_ids=torch.tensor([lm.tokenizer(p)["input_ids"]])).logits[0], -1
                )
                for p in NEUTRAL
            ]

    before = log_probs()
    with delta.applied_to(lm.model):
        after = log_probs()
    return float(torch.cat([(b.exp() * (b - a)).sum(-1) for b, a in zip(before, after, strict=True)]).mean())


@pytest.mark.parametrize(
    "hparams", [{}, TINY_HPARAMS], ids=["preset", "tiny-strong"]
)  # {} = the preset: kl_weight 1.0, nll_weight 0.1, 10 steps, lr 5e-4
def test_kl_term_keeps_neutral_next_token_distributions_closer(insult_lm, hparams):
    prompt, insult, safe = INSULT_PAIRS[0]
    requests = [EditRequest(prompt=prompt, target=safe, toxic=insult)]
    ctx = EditContext(neutral_prompts=NEUTRAL)
    editor = DinmEditor()
    assert editor.resolve_hparams(insult_lm, hparams)["kl_weight"] > 0
    with_kl = editor.compute(insult_lm, requests, hparams, ctx)
    without_kl = editor.compute(insult_lm, requests, {**hparams, "kl_weight": 0.0}, ctx)
    assert with_kl.info["located_layers"] == without_kl.info["located_layers"]

    drift_kl, drift_free = _neutral_drift(insult_lm, with_kl), _neutral_drift(insult_lm, without_kl)
    assert drift_free > 0  # the edit does move the neutral prompts when nothing holds them
    assert drift_kl < drift_free
    if hparams:  # long enough for the KL gradient (zero at the first step) to matter a lot
        assert drift_kl < 0.5 * drift_free
