"""bfloat16 models: every editing method computes its edit in float32/float64, and the weights stay bfloat16.

For each method of the registry, on a tiny GPT-2 and a tiny Llama loaded in bfloat16 on the CPU: the delta is
finite and stored in float32 (a bfloat16 weight has an 8-bit mantissa; float32's 24 bits hold the update
without rounding it to the weight's grid before it is added), compute leaves the weights untouched, applying
then reverting restores every parameter bit for bit, and every parameter stays bfloat16.
"""

from __future__ import annotations

import pytest
import torch

from detox_tui.backends.editing import presets
from detox_tui.backends.editing.base import EditContext, EditRequest, editor_class, get_editor
from detox_tui.backends.models import load_model
from detox_tui.backends.stats import covariance
from detox_tui.tiny import (
    INSULT_PAIRS,
    neutral_lines,
    save_random_family_model,
)

# Few optimisation steps and templates: the point is the dtypes, not the edit's quality.
FAST = {
    "memit": {"layers": [1, 2], "n_templates": 2, "v_num_grad_steps": 3},
    "alphaedit": {"layers": [1, 2], "n_templates": 2, "v_num_grad_steps": 3},
    "rome": {"layer": 1, "n_templates": 2, "v_num_grad_steps": 3},
    "ft": {"layers": [1], "steps": 3},
    "dinm": {"steps": 2},
    "aura": {"max_sentences": 16},
}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """An untrained 4-layer Llama (hidden 64, MLP 176, grouped-query attention) with the tiny BPE tokenizer."""
    return save_random_family_model(
        tmp_path_factory.mktemp("tiny-llama"), "llama", intermediate_size=176, num_hidden_layers=4
    )


@pytest.fixture(params=["gpt2", "llama"])
def bf16_lm(request, tiny_model_dir, tiny_llama_dir):
    path = tiny_model_dir if request.param == "gpt2" else tiny_llama_dir
    lm = load_model(str(path), device="cpu", dtype="bfloat16")
    assert lm.spec.family == request.param
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    return lm


def _hparams(method: str) -> dict:
    if method in FAST:
        return dict(FAST[method])
    # A method added after this test: its preset, on layer 1 (and 2 where it edits several).
    return presets.apply_layers(method, {}, [1] if editor_class(method).single_layer else [1, 2])


def _context(tmp_path) -> EditContext:
    toxic = [p + insult for p, insult, _ in INSULT_PAIRS]
    return EditContext(
        cache_dir=tmp_path / "cache",
        covariance=lambda lm, layers: covariance(lm, layers, texts=neutral_lines(), tokens=600),
        neutral_prompts=neutral_lines()[:4],
        extra={"toxic_sentences": toxic, "nontoxic_sentences": neutral_lines()[:16]},
    )


@pytest.mark.parametrize("method", presets.METHODS)
def test_edit_on_bfloat16_is_float32_finite_and_reverts_bit_exactly(bf16_lm, method, tmp_path):
    lm = bf16_lm
    torch.manual_seed(0)
    requests = [EditRequest(prompt=p, target=safe, toxic=insult) for p, insult, safe in INSULT_PAIRS[:2]]
    before = {name: p.detach().clone() for name, p in lm.model.named_parameters()}

    delta = get_editor(method).compute(lm, requests, _hparams(method), _context(tmp_path))

    params = dict(lm.model.named_parameters())
    assert all(torch.equal(params[name], before[name]) for name in before), "compute left an edit behind"
    assert delta.deltas, "the edit changes nothing"
    for name, d in delta.deltas.items():
        assert d.dtype == torch.float32, (name, d.dtype)
        assert d.shape == params[name].shape
        assert bool(torch.isfinite(d).all()), name
    assert any(bool(d.abs().max() > 0) for d in delta.deltas.values())

    with delta.applied_to(lm.model):
        assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
        edited = [name for name in delta.deltas if not torch.equal(params[name], before[name])]
        assert edited, "the update vanished in bfloat16 rounding"
        assert all(bool(torch.isfinite(params[name]).all()) for name in delta.deltas)
        # Only the delta's parameters move.
        assert all(torch.equal(params[n], before[n]) for n in before if n not in delta.deltas)
    for name, p in lm.model.named_parameters():
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, before[name]), name
