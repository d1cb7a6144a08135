"""MEMIT on the tiny insult model: mass replace/erase edits work, z batching is exact, cancel restores weights."""

from __future__ import annotations

import threading

import pytest
import torch

from detox_tui.backends.editing.base import EditContext, EditRequest
from detox_tui.backends.editing.common import compute_targets, context_templates
from detox_tui.backends.editing.memit import MemitEditor
from detox_tui.backends.models import weights_fingerprint
from detox_tui.backends.stats import covariance
from detox_tui.errors import Cancelled, UserError
from detox_tui.events import Progress
from detox_tui.tiny import INSULT_PAIRS, neutral_lines

# The tiny model has never seen the safe targets, so beyond their first token they are unreachable by
# any edit at one position (teacher-forced NLL ~13 nats even after an unconstrained z): the requests
# ask for the safe target's first token, and success means it becomes the greedy next token.
# Tiny-model hparams, and why: its residual norms are small (~4) against a memorised insult, so the
# clamp is 2 (not 0.75); its covariance comes from ~1,400 neutral tokens with trace ~15 over 256 dims,
# so lambda = 100 plays the role lambda = 20000 plays with gpt2-medium's Wikipedia statistics (1000
# under-edits, 10 raises perplexity ~1.8x); two templates keep the test fast.
TINY_MEMIT = {
    "layers": [1, 2],
    "mom2_update_weight": 100.0,
    "clamp_norm_factor": 2.0,
    "n_templates": 2,
}


def first_token(lm, text: str) -> int:
    return lm.tokenizer(text)["input_ids"][0]


def safe_requests(lm, pairs=INSULT_PAIRS) -> list[EditRequest]:
    return [EditRequest(p, lm.tokenizer.decode([first_token(lm, safe)])) for p, _, safe in pairs]


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


def tiny_context() -> EditContext:
    return EditContext(covariance=lambda lm, layers: covariance(lm, layers, texts=neutral_lines()))


def test_memit_batch_replace_makes_safe_targets_greedy_and_keeps_perplexity(insult_lm):
    lm = insult_lm
    requests = safe_requests(lm)
    wanted = [first_token(lm, r.target) for r in requests]
    before = [int(next_token_probs(lm, r.prompt).argmax()) for r in requests]
    assert sum(b == w for b, w in zip(before, wanted)) == 0
    ppl_before = neutral_perplexity(lm)
    fingerprint = weights_fingerprint(lm.model)

    delta = MemitEditor().compute(lm, requests, TINY_MEMIT, tiny_context())

    assert weights_fingerprint(lm.model) == fingerprint  # compute never leaves an edit behind
    assert delta.method == "memit" and delta.layers == [1, 2]
    assert set(delta.deltas) == {"transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"}
    assert len(delta.info["z_loss"]) == len(requests) == len(delta.requests)
    with delta.applied_to(lm.model):
        after = [int(next_token_probs(lm, r.prompt).argmax()) for r in requests]
        ppl_after = neutral_perplexity(lm)
    assert sum(a == w for a, w in zip(after, wanted)) >= 5
    assert ppl_after < 1.5 * ppl_before
    assert weights_fingerprint(lm.model) == fingerprint


def test_memit_erase_lowers_the_insult_probability(insult_lm):
    lm = insult_lm
    # As for replace, only the insult's first token is reachable at one position: erase that.
    requests = [
        EditRequest(p, safe, mode="erase", toxic=lm.tokenizer.decode([first_token(lm, insult)]))
        for p, insult, safe in INSULT_PAIRS[:3]
    ]
    insult_first = [first_token(lm, r.toxic) for r in requests]
    before = [float(next_token_probs(lm, r.prompt)[t]) for r, t in zip(requests, insult_first)]
    delta = MemitEditor().compute(lm, requests, TINY_MEMIT, tiny_context())
    with delta.applied_to(lm.model):
        after = [float(next_token_probs(lm, r.prompt)[t]) for r, t in zip(requests, insult_first)]
    assert min(before) > 0.9
    assert all(a < 0.6 * b for a, b in zip(after, before))
    assert sum(after) < 0.5 * sum(before)


def test_batched_z_equals_serial_z(insult_lm):
    lm = insult_lm
    requests = safe_requests(lm, INSULT_PAIRS[:3])
    templates = context_templates(lm, n=2)
    hp = {
        "v_loss_layer": 3,
        "v_lr": 0.5,
        "v_num_grad_steps": 12,
        "v_weight_decay": 0.5,
        "kl_factor": 0.0625,
        "clamp_norm_factor": 2.0,
    }
    path = lm.spec.block_path(2)
    batched = compute_targets(lm, requests, path, templates, {**hp, "batch_z": True})
    serial = compute_targets(lm, requests, path, templates, {**hp, "batch_z": False})
    assert batched.delta.shape == (3, lm.d_model)
    assert float(batched.delta.norm()) > 0
    assert torch.allclose(batched.delta, serial.delta, rtol=1e-4, atol=1e-5)
    assert torch.allclose(batched.init, serial.init, rtol=1e-5, atol=1e-6)
    assert batched.steps == serial.steps
    assert batched.losses == pytest.approx(serial.losses, rel=1e-4, abs=1e-5)


def test_context_templates_are_cached_on_the_model_object(insult_lm):
    first = context_templates(insult_lm, n=3)
    assert first[0] == "{}" and len(first) == 4 and all(t.endswith(". {}") for t in first[1:])
    assert context_templates(insult_lm, n=3) == first
    assert "_edit_cache" in insult_lm.__dict__


@pytest.mark.parametrize("stage", ["memit z", "memit layers"])
def test_cancel_mid_edit_raises_and_leaves_the_original_weights(insult_lm, stage):
    lm = insult_lm
    fingerprint = weights_fingerprint(lm.model)
    cancel = threading.Event()

    def emit(event):
        # "memit layers" 1 is emitted after layer 1 was applied temporarily: the revert path is exercised.
        if (
            isinstance(event, Progress)
            and event.stage == stage
            and event.done >= (3 if stage == "memit z" else 1)
        ):
            cancel.set()

    ctx = tiny_context()
    ctx.emit, ctx.cancel = emit, cancel
    with pytest.raises(Cancelled):
        MemitEditor().compute(lm, safe_requests(lm, INSULT_PAIRS[:2]), TINY_MEMIT, ctx)
    assert cancel.is_set()
    assert weights_fingerprint(lm.model) == fingerprint


def test_layer_out_of_range_is_a_one_line_error(insult_lm):
    name = insult_lm.name
    with pytest.raises(UserError) as info:
        MemitEditor().compute(insult_lm, safe_requests(insult_lm)[:1], {"layers": [2, 30]}, tiny_context())
    assert str(info.value) == f"Layer 30 is out of range: {name} has layers 0 to 3."
