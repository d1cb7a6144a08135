"""Every editing method and causal tracing on tiny random models of each supported open-weight family.

Families: Llama (untied head), Llama 3.2 style (tied head: the unembedding is the embedding matrix), Qwen 2,
Qwen 3 (q/k norms), Mistral, Gemma 2 (pre/post feed-forward norms, sqrt(d) embedding scale, final logit
soft-cap, tied head) and Gemma 3 text. All use grouped-query attention (2 key/value heads for 4 query heads)
and a gated MLP. Each case computes an edit through the editor's public compute(): the delta is finite, non-zero,
touches the family's expected parameters, and applying then reverting it restores the weights bit for bit.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from detox_tui.backends.editing import presets
from detox_tui.backends.editing.base import EditContext, EditRequest, get_editor
from detox_tui.backends.editing.common import compute_keys, key_position
from detox_tui.backends.models import load_model, unembed_logits, weights_fingerprint
from detox_tui.backends.stats import covariance
from detox_tui.backends.tracing import trace
from detox_tui.tiny import (
    INSULT_PAIRS,
    build_tokenizer,
    neutral_lines,
    save_random_family_model,
    training_texts,
)

# name -> (model_type, config overrides, expected ModelSpec family)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "llama": ("llama", {"tie_word_embeddings": False}, "llama"),
    "llama_tied": ("llama", {"tie_word_embeddings": True}, "llama"),
    "qwen2": ("qwen2", {"tie_word_embeddings": False}, "llama"),
    "qwen3": ("qwen3", {"head_dim": 16, "tie_word_embeddings": True}, "llama"),
    "mistral": ("mistral", {}, "llama"),
    # A soft-cap of 2 bends the tiny model's logits visibly, so reading them without it would be caught.
    "gemma2": (
        "gemma2",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 2.0},
        "gemma",
    ),
    "gemma3_text": ("gemma3_text", {"head_dim": 16, "query_pre_attn_scalar": 16}, "gemma"),
}

# Few steps, few templates, two layers: the point is that each method runs on each architecture.
FAST = {
    "memit": {"layers": [1, 2], "n_templates": 2, "template_length": 4, "v_num_grad_steps": 2},
    "alphaedit": {"layers": [1, 2], "n_templates": 2, "template_length": 4, "v_num_grad_steps": 2},
    "rome": {"layer": 1, "n_templates": 2, "template_length": 4, "v_num_grad_steps": 2},
    "ft": {"layers": [1], "steps": 2},
    "dinm": {"steps": 2},
    "aura": {"max_sentences": 8, "batch_size": 8},
}
DOWN_PROJ = re.compile(r"model\.layers\.(\d+)\.mlp\.down_proj\.weight")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    tokenizer = build_tokenizer(training_texts() + [safe for _, _, safe in INSULT_PAIRS])
    return {
        name: save_random_family_model(
            tmp_path_factory.mktemp(f"tiny-{name}"), model_type, tokenizer, **overrides
        )
        for name, (model_type, overrides, _) in FAMILIES.items()
    }


_LOADED: dict[str, object] = {}


@pytest.fixture(params=list(FAMILIES))
def family_lm(request, family_dirs):
    name = request.param
    if name not in _LOADED:
        _LOADED[name] = load_model(str(family_dirs[name]), device="cpu", dtype="float32")
    lm = _LOADED[name]
    model_type, overrides, family = FAMILIES[name]
    assert lm.model.config.model_type == model_type
    assert lm.spec.family == family
    cfg = lm.model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    tied = lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    assert tied == bool(cfg.tie_word_embeddings)
    return lm


def _context(tmp_path) -> EditContext:
    toxic = [p + insult for p, insult, _ in INSULT_PAIRS]
    return EditContext(
        cache_dir=tmp_path / "cache",
        covariance=lambda lm, layers: covariance(lm, layers, texts=neutral_lines(), tokens=400),
        neutral_prompts=neutral_lines()[:4],
        extra={"toxic_sentences": toxic, "nontoxic_sentences": neutral_lines()[:8]},
    )


def _expected(method: str, lm, delta) -> set[str]:
    names = set(delta.deltas)
    if method in ("memit", "alphaedit", "ft"):
        return {f"model.layers.{i}.mlp.down_proj.weight" for i in FAST[method]["layers"]}
    if method == "rome":
        return {f"model.layers.{FAST['rome']['layer']}.mlp.down_proj.weight"}
    if method == "dinm":  # the layer it locates itself, one out-projection
        assert len(names) == 1
        return {n for n in names if DOWN_PROJ.fullmatch(n)}
    # aura: the neuron (down_proj's input) and the out-projection's outputs both fold into down_proj.
    assert presets.load_preset(lm, "aura")["unit"] == "neuron"
    assert names
    return {n for n in names if DOWN_PROJ.fullmatch(n)}


@pytest.mark.parametrize("method", presets.METHODS)
def test_every_method_edits_every_family_and_reverts_bit_exactly(family_lm, method, tmp_path):
    lm = family_lm
    torch.manual_seed(0)
    requests = [EditRequest(prompt=p, target=safe, toxic=insult) for p, insult, safe in INSULT_PAIRS[:2]]
    fingerprint = weights_fingerprint(lm.model)

    delta = get_editor(method).compute(lm, requests, dict(FAST[method]), _context(tmp_path))

    assert weights_fingerprint(lm.model) == fingerprint, "compute left an edit behind"
    assert set(delta.deltas) == _expected(method, lm, delta)
    params = dict(lm.model.named_parameters())
    for name, d in delta.deltas.items():
        assert d.shape == params[name].shape
        assert bool(torch.isfinite(d).all()), name
    assert any(bool(d.abs().max() > 0) for d in delta.deltas.values()), "the edit changes nothing"
    with delta.applied_to(lm.model):
        assert weights_fingerprint(lm.model) != fingerprint
    assert weights_fingerprint(lm.model) == fingerprint


def test_memit_key_is_the_input_of_down_proj(family_lm):
    lm = family_lm
    request = EditRequest(prompt=INSULT_PAIRS[0][0], target=INSULT_PAIRS[0][2])
    layer = 1
    ids, key = key_position(lm, "{}", request)
    seen = []
    handle = lm.module(f"model.layers.{layer}.mlp.down_proj").register_forward_pre_hook(
        lambda _m, inputs: seen.append(inputs[0].detach())
    )
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    keys = compute_keys(lm, layer, [request], ["{}"])
    assert keys.shape == (1, 128)
    torch.testing.assert_close(keys[0].float(), seen[0][0, key].float(), atol=1e-5, rtol=1e-5)


def test_logits_read_through_the_final_norm_and_head_match_the_model(family_lm):
    """The z/v optimisation's logits (final norm, head, soft-cap) equal the model's own, tied heads included."""
    lm = family_lm
    ids = lm.tokenizer(neutral_lines()[0], return_tensors="pt")["input_ids"]
    normed = []
    handle = lm.module(lm.spec.final_norm).register_forward_hook(lambda _m, _i, out: normed.append(out))
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits
    finally:
        handle.remove()
    with torch.no_grad():
        ours = unembed_logits(lm, normed[0])
    torch.testing.assert_close(ours, logits, atol=1e-5, rtol=1e-5)
    if lm.model.config.model_type == "gemma2":  # the soft-cap is in play: the bare head disagrees
        bare = lm.module(lm.spec.unembed)(normed[0])
        assert float((bare - logits).abs().max()) > 1e-2


def test_causal_tracing_runs_on_every_family(family_lm):
    lm = family_lm
    prompt, insult, _ = INSULT_PAIRS[0]
    result = trace(lm, prompt, insult, kind="hidden", samples=2, seed=0)
    assert result.scores.shape == (lm.n_layers, len(result.tokens))
    assert np.isfinite(result.scores).all()
    assert np.isfinite(result.p_clean) and np.isfinite(result.p_corrupted)


@pytest.mark.parametrize(
    ("hub_id", "model_type", "n_layers", "method", "expected"),
    [
        (
            "meta-llama/Meta-Llama-3-8B-Instruct",
            "llama",
            32,
            "memit",
            {"clamp_norm_factor": 0.75, "v_lr": 0.1},
        ),
        ("meta-llama/Llama-3.2-3B", "llama", 28, "memit", {"layers": [4, 5, 6, 7, 8], "v_loss_layer": 27}),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2", 28, "ft", {"layers": [27]}),
        ("google/gemma-2-9b", "gemma2", 42, "aura", {"unit": "neuron"}),
    ],
)
def test_published_presets_reach_the_models_they_were_published_for(
    hub_id, model_type, n_layers, method, expected
):
    from types import SimpleNamespace

    from detox_tui.backends.models import spec_for_model_type

    lm = SimpleNamespace(
        name=hub_id,
        n_layers=n_layers,
        spec=spec_for_model_type(model_type),
        model=SimpleNamespace(config=SimpleNamespace(model_type=model_type)),
    )
    hp = presets.load_preset(lm, method)
    assert {k: hp[k] for k in expected} == expected
