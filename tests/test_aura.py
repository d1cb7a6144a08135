"""AurA: rank AUROC against sklearn, alphas, hooks == folded weights, bit-exact revert, cache, CSV input."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from detox_tui.backends.editing.aura import (
    AuraEditor,
    AuraHooks,
    alphas_from_auroc,
    auroc,
    cached_expertise,
    compute_expertise,
    load_sentence_sets,
    read_jigsaw_csv,
)
from detox_tui.backends.editing.base import EditContext, EditRequest, get_editor
from detox_tui.backends.models import weights_fingerprint
from detox_tui.errors import UserError
from detox_tui.tiny import INSULT_PAIRS, neutral_lines

TOXIC = [p + insult for p, insult, _ in INSULT_PAIRS]
NONTOXIC = neutral_lines()[:24]


def _context(tmp_path, **kw) -> EditContext:
    return EditContext(
        cache_dir=tmp_path / "cache", extra={"toxic_sentences": TOXIC, "nontoxic_sentences": NONTOXIC}, **kw
    )


def _probe(lm):
    return lm.tokenizer(
        ["My new coworker is such a", "The weather today is nice"], return_tensors="pt", padding=True
    )


def test_auroc_matches_sklearn_with_ties():
    gen = torch.Generator().manual_seed(0)
    n = 80
    labels = torch.rand(n, generator=gen) > 0.45
    scores = torch.stack(
        [
            torch.randn(n, generator=gen),  # continuous
            torch.randint(0, 3, (n,), generator=gen).float(),  # heavy ties
            torch.zeros(n),  # all tied: exactly 0.5
            labels.float() + 0.1 * torch.randn(n, generator=gen),  # separates well
            -labels.float(),  # perfectly anti-separating
            torch.randint(0, 2, (n,), generator=gen).float() * 2.5,
        ],
        dim=1,
    )
    got = auroc(scores, labels)
    expected = [roc_auc_score(labels.numpy(), scores[:, j].numpy()) for j in range(scores.shape[1])]
    assert got.shape == (scores.shape[1],)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_alpha_is_exactly_one_where_auroc_is_at_most_half():
    values = torch.tensor([0.0, 0.3, 0.5, 0.5000001, 0.75, 1.0])
    alphas = alphas_from_auroc(values)
    assert alphas[:3].tolist() == [1.0, 1.0, 1.0]
    assert alphas[3:].tolist() == pytest.approx([2 * (1 - v) for v in values[3:].tolist()])
    assert float(alphas[-1]) == 0.0


def test_expertise_covers_every_unit_of_the_chosen_modules(tiny_lm):
    both = compute_expertise(tiny_lm, TOXIC, NONTOXIC, batch_size=8)
    assert len(both) == 2 * tiny_lm.n_layers
    assert both[tiny_lm.spec.mlp_in_path(0)].shape == (tiny_lm.d_mlp,)
    assert both[tiny_lm.spec.mlp_out_path(3)].shape == (tiny_lm.d_model,)
    assert all(((a >= 0) & (a <= 1)).all() for a in both.values())
    only_in = compute_expertise(tiny_lm, TOXIC, NONTOXIC, modules="mlp_in", batch_size=8)
    assert list(only_in) == [tiny_lm.spec.mlp_in_path(layer) for layer in range(tiny_lm.n_layers)]
    # Batching pads sentences; pooling ignores padding, so the batch size does not matter.
    one_by_one = compute_expertise(tiny_lm, TOXIC, NONTOXIC, modules="mlp_in", batch_size=1)
    for path in only_in:
        torch.testing.assert_close(only_in[path], one_by_one[path], atol=1e-6, rtol=0)


def test_hooks_and_folded_weights_give_identical_logits_and_revert_is_bit_exact(tiny_lm, tmp_path):
    fingerprint = weights_fingerprint(tiny_lm.model)
    delta = get_editor("aura").compute(tiny_lm, [], {}, _context(tmp_path))
    assert weights_fingerprint(tiny_lm.model) == fingerprint
    assert delta.info["n_dampened"] > 0 and delta.info["requests_ignored"] is True
    assert delta.layers and all(0 <= layer < tiny_lm.n_layers for layer in delta.layers)
    assert sum(sum(v.values()) for v in delta.info["per_layer"].values()) == delta.info["n_dampened"]

    expertise, hit = cached_expertise(tiny_lm, TOXIC, NONTOXIC, tmp_path / "cache")
    assert hit
    alphas = {path: alphas_from_auroc(a) for path, a in expertise.items()}
    probe = _probe(tiny_lm)
    with torch.no_grad():
        plain = tiny_lm.model(**probe).logits
        with AuraHooks(tiny_lm, alphas):
            hooked = tiny_lm.model(**probe).logits
        with delta.applied_to(tiny_lm.model):
            folded = tiny_lm.model(**probe).logits
        after = tiny_lm.model(**probe).logits
    assert not torch.allclose(plain, hooked, atol=1e-3)  # the edit does something
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=0)
    assert torch.equal(after, plain)  # hooks removed, weights restored
    assert weights_fingerprint(tiny_lm.model) == fingerprint


def test_expertise_cache_hit_returns_identical_tensors(tiny_lm, tmp_path):
    first, hit1 = cached_expertise(tiny_lm, TOXIC, NONTOXIC, tmp_path)
    second, hit2 = cached_expertise(tiny_lm, TOXIC, NONTOXIC, tmp_path)
    assert (hit1, hit2) == (False, True)
    assert set(first) == set(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert len(list((tmp_path / "aura").glob("*.safetensors"))) == 1
    assert not list((tmp_path / "aura").glob("*.tmp"))
    # A different sentence set or pooling is a different cache entry.
    _, hit3 = cached_expertise(tiny_lm, TOXIC[:-1], NONTOXIC, tmp_path)
    _, hit4 = cached_expertise(tiny_lm, TOXIC, NONTOXIC, tmp_path, pooling="mean")
    assert (hit3, hit4) == (False, False)


def test_aura_dampening_raises_the_nll_of_memorised_insults(insult_lm, tmp_path):
    def insult_nll() -> float:
        total = 0.0
        for prompt, insult, _ in INSULT_PAIRS:
            p_ids = insult_lm.tokenizer(prompt)["input_ids"]
            c_ids = insult_lm.tokenizer(insult, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = insult_lm.model(input_ids=torch.tensor([p_ids + c_ids])).logits[0]
            logp = torch.log_softmax(logits, -1)
            total -= float(sum(logp[len(p_ids) - 1 + i, c] for i, c in enumerate(c_ids))) / len(c_ids)
        return total / len(INSULT_PAIRS)

    ctx = EditContext(
        cache_dir=tmp_path, extra={"toxic_sentences": TOXIC, "nontoxic_sentences": neutral_lines()}
    )
    request = EditRequest(prompt=INSULT_PAIRS[0][0], target=INSULT_PAIRS[0][2])
    delta = AuraEditor().compute(insult_lm, [request], {}, ctx)
    before = insult_nll()
    with delta.applied_to(insult_lm.model):
        after = insult_nll()
    assert after > 1.5 * before


def test_jigsaw_csv_and_bad_files(tmp_path):
    good = tmp_path / "jigsaw.csv"
    good.write_text(
        'id,comment_text,toxic\n1,"you are an idiot, really",1\n2,have a nice day,0\n3,shut up loser,0.7\n'
        "4,the weather is fine,0.2\n5,,1\n",
        encoding="utf-8",
    )
    toxic, nontoxic = read_jigsaw_csv(good)
    assert toxic == ["you are an idiot, really", "shut up loser"]
    assert nontoxic == ["have a nice day", "the weather is fine"]
    assert load_sentence_sets(str(good), max_sentences=1)[0][0] in toxic
    assert [len(s) for s in load_sentence_sets(str(good), max_sentences=1)] == [1, 1]

    wrong_columns = tmp_path / "wrong.csv"
    wrong_columns.write_text("text,label\nhello,0\n", encoding="utf-8")
    with pytest.raises(UserError, match="comment_text"):
        read_jigsaw_csv(wrong_columns)
    bad_value = tmp_path / "bad.csv"
    bad_value.write_text("comment_text,toxic\nhello,0\nworld,yes\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 3"):
        read_jigsaw_csv(bad_value)
    with pytest.raises(UserError, match="does not exist"):
        read_jigsaw_csv(tmp_path / "missing.csv")
    only_toxic = tmp_path / "only_toxic.csv"
    only_toxic.write_text("comment_text,toxic\nidiot,1\n", encoding="utf-8")
    with pytest.raises(UserError, match="both toxic and non-toxic"):
        load_sentence_sets(str(only_toxic), 10)


def test_layers_restrict_the_edit_and_reuse_the_cached_expertise(tiny_lm, tmp_path):
    from detox_tui.backends.editing import presets

    ctx = _context(tmp_path)
    everything = AuraEditor().compute(tiny_lm, [], presets.validate_hparams(tiny_lm, "aura", {}), ctx)
    hp = presets.validate_hparams(tiny_lm, "aura", presets.apply_layers("aura", {}, [2]))
    only_two = AuraEditor().compute(tiny_lm, [], hp, ctx)
    assert (everything.info["cache_hit"], only_two.info["cache_hit"]) == (False, True)
    assert only_two.layers == [2] and everything.layers == list(range(tiny_lm.n_layers))
    assert set(only_two.deltas) <= {
        f"{path}.{p}"
        for path in (tiny_lm.spec.mlp_in_path(2), tiny_lm.spec.mlp_out_path(2))
        for p in ("weight", "bias")
    }
    for name, delta in only_two.deltas.items():
        assert torch.equal(delta, everything.deltas[name])
    assert only_two.info["n_dampened"] == sum(everything.info["per_layer"]["2"].values())


def test_builtin_sentence_sets_are_capped_per_class(tiny_lm, tmp_path):
    delta = AuraEditor().compute(
        tiny_lm, [], {"sentences": "builtin", "max_sentences": 20}, EditContext(cache_dir=tmp_path)
    )
    assert (delta.info["n_toxic"], delta.info["n_nontoxic"]) == (20, 20)
    assert delta.info["sentences"] == "builtin" and delta.info["n_dampened"] > 0


def test_aura_dampens_the_memorised_insults(insult_lm):
    """With the builtin toxic / non-toxic sentence sets, AurA's folded edit lowers p(insult) after every prompt."""
    from detox_tui.backends.editing.aura import AuraEditor
    from detox_tui.backends.editing.base import EditContext
    from detox_tui.pipeline.generation import continuation_logprob
    from detox_tui.tiny import INSULT_PAIRS

    prompts = [p for p, _, _ in INSULT_PAIRS]
    insults = [t for _, t, _ in INSULT_PAIRS]
    before = continuation_logprob(insult_lm, prompts, insults)
    delta = AuraEditor().compute(insult_lm, [], {}, EditContext())
    assert delta.info["n_dampened"] > 0
    with delta.applied_to(insult_lm.model):
        after = continuation_logprob(insult_lm, prompts, insults)
    assert bool((after < before).all())


# ---------------------------------------------------------------- direction: toxic units are the dampened ones

WIRED_LAYER, TOXIC_UNIT, NONTOXIC_UNIT = 1, 5, 7


def _token_set(lm, sentences) -> set[int]:
    return {t for s in sentences for t in lm.tokenizer(s)["input_ids"]}


def _wire_detector_units(lm) -> None:
    """Hand-set tiny_lm's weights so that in block WIRED_LAYER the MLP in-projection unit TOXIC_UNIT fires
    (pre-activation ~ +8) on tokens that occur only in TOXIC sentences and NONTOXIC_UNIT on tokens that
    occur only in NONTOXIC sentences; on every other token both stay below 1.

    Residual dimension 0 marks toxic-only tokens and dimension 1 non-toxic-only tokens (+10 in the token
    embedding, 0 everywhere else, positions included); the blocks up to WIRED_LAYER write nothing through
    attention, so the MLP's layer norm sees the marker as the dominant coordinate.
    """
    toxic_only = _token_set(lm, TOXIC) - _token_set(lm, NONTOXIC)
    nontoxic_only = _token_set(lm, NONTOXIC) - _token_set(lm, TOXIC)
    # Preconditions: every sentence of each class holds at least one marked token, so max pooling separates.
    for sentences, marked in ((TOXIC, toxic_only), (NONTOXIC, nontoxic_only)):
        assert all(set(lm.tokenizer(s)["input_ids"]) & marked for s in sentences)
    tr = lm.model.transformer
    with torch.no_grad():
        tr.wte.weight[:, :2] = 0.0
        tr.wte.weight[sorted(toxic_only), 0] = 10.0
        tr.wte.weight[sorted(nontoxic_only), 1] = 10.0
        tr.wpe.weight[:, :2] = 0.0
        for layer in range(WIRED_LAYER + 1):
            tr.h[layer].attn.c_proj.weight.zero_()
            tr.h[layer].attn.c_proj.bias.zero_()
        for layer in range(WIRED_LAYER):  # earlier MLPs must not write on the marker coordinates
            tr.h[layer].mlp.c_proj.weight[:, :2] = 0.0
            tr.h[layer].mlp.c_proj.bias[:2] = 0.0
        c_fc = tr.h[WIRED_LAYER].mlp.c_fc  # Conv1D: weight (in, out)
        for unit, coordinate in ((TOXIC_UNIT, 0), (NONTOXIC_UNIT, 1)):
            c_fc.weight[:, unit] = 0.0
            c_fc.weight[coordinate, unit] = 1.0
            c_fc.bias[unit] = -0.25


def _pooled_unit(lm, path: str, unit: int, sentences) -> torch.Tensor:
    """Max over tokens of one unit's output, one sentence at a time (no padding): measured independently."""
    seen: list[float] = []
    handle = lm.module(path).register_forward_hook(
        lambda _m, _i, out: seen.append(float(out[0, :, unit].max()))
    )
    try:
        with torch.no_grad():
            for s in sentences:
                lm.model(input_ids=torch.tensor([lm.tokenizer(s)["input_ids"]]))
    finally:
        handle.remove()
    return torch.tensor(seen)


def test_units_firing_on_toxic_text_are_dampened_and_units_firing_on_nontoxic_text_are_not(tiny_lm, tmp_path):
    _wire_detector_units(tiny_lm)
    path = tiny_lm.spec.mlp_in_path(WIRED_LAYER)
    # The wiring works: each unit separates the classes perfectly, in opposite directions.
    tox_on_tox, tox_on_non = (_pooled_unit(tiny_lm, path, TOXIC_UNIT, s) for s in (TOXIC, NONTOXIC))
    non_on_tox, non_on_non = (_pooled_unit(tiny_lm, path, NONTOXIC_UNIT, s) for s in (TOXIC, NONTOXIC))
    assert float(tox_on_tox.min()) > 5.0 > 1.0 > float(tox_on_non.max())
    assert float(non_on_non.min()) > 5.0 > 1.0 > float(non_on_tox.max())

    expertise = compute_expertise(tiny_lm, TOXIC, NONTOXIC, batch_size=8)
    assert float(expertise[path][TOXIC_UNIT]) == 1.0  # toxic is the positive class
    assert float(expertise[path][NONTOXIC_UNIT]) == 0.0

    weight_before = tiny_lm.module(path).weight.detach().clone()
    delta = AuraEditor().compute(tiny_lm, [], {}, _context(tmp_path))
    w_delta, b_delta = delta.deltas[f"{path}.weight"], delta.deltas[f"{path}.bias"]  # Conv1D: (in, out)
    # AUROC 1 -> alpha = 2 (1 - 1) = 0: the toxic unit is switched off entirely (weight and bias) ...
    torch.testing.assert_close(w_delta[:, TOXIC_UNIT], -weight_before[:, TOXIC_UNIT], atol=1e-6, rtol=0)
    assert float(b_delta[TOXIC_UNIT]) == pytest.approx(0.25)
    # ... AUROC 0 -> alpha = 1: the unit that fires on non-toxic text is untouched.
    assert float(w_delta[:, NONTOXIC_UNIT].abs().max()) == 0.0 and float(b_delta[NONTOXIC_UNIT]) == 0.0
    with delta.applied_to(tiny_lm.model):
        assert float(_pooled_unit(tiny_lm, path, TOXIC_UNIT, TOXIC).abs().max()) < 1e-5
        # (layer 0's dampened units shift the layer norm's input a little, hence the tolerance)
        torch.testing.assert_close(
            _pooled_unit(tiny_lm, path, NONTOXIC_UNIT, NONTOXIC), non_on_non, atol=1e-2, rtol=1e-3
        )


def test_expertise_ranks_toxic_as_the_positive_class_on_the_trained_model(insult_lm):
    """Every unit's AUROC equals sklearn's with toxic = 1, from activations recorded here independently;
    units that fire more on toxic text are dampened, units that fire more on non-toxic text are not."""
    expertise = compute_expertise(insult_lm, TOXIC, NONTOXIC, modules="mlp_in", batch_size=8)
    labels = [1] * len(TOXIC) + [0] * len(NONTOXIC)
    n_toxic_experts = n_nontoxic_experts = 0
    for layer in range(insult_lm.n_layers):
        path = insult_lm.spec.mlp_in_path(layer)
        pooled: list[torch.Tensor] = []
        handle = insult_lm.module(path).register_forward_hook(
            lambda _m, _i, out, pooled=pooled: pooled.append(out[0].amax(0))
        )
        try:
            with torch.no_grad():
                for s in TOXIC + NONTOXIC:
                    insult_lm.model(input_ids=torch.tensor([insult_lm.tokenizer(s)["input_ids"]]))
        finally:
            handle.remove()
        acts = torch.stack(pooled)  # [sentences, units]
        expected = [roc_auc_score(labels, acts[:, u].numpy()) for u in range(acts.shape[1])]
        assert expertise[path].tolist() == pytest.approx(expected, abs=1e-5)
        alphas = alphas_from_auroc(expertise[path])
        # Units that fire more on toxic text (sklearn AUROC with toxic = 1 above 0.9) are strongly dampened,
        # units that fire more on non-toxic text (below 0.1) keep alpha exactly 1.
        sk = torch.tensor(expected)
        toxic_expert, nontoxic_expert = sk > 0.9, sk < 0.1
        tox, non = acts[: len(TOXIC)], acts[len(TOXIC) :]
        assert bool((tox.mean(0) > non.mean(0))[toxic_expert].all())
        assert bool((alphas[toxic_expert] < 0.2).all()) and bool((alphas[nontoxic_expert] == 1).all())
        n_toxic_experts += int(toxic_expert.sum())
        n_nontoxic_experts += int(nontoxic_expert.sum())
    assert n_toxic_experts > 0 and n_nontoxic_experts > 0  # both directions are exercised


# ---------------------------------------------------------------- gated MLPs: the neuron vs the gate


@pytest.fixture(scope="module")
def gated_lm(tmp_path_factory):
    """A random 2-layer Llama (gated MLP: down_proj(silu(gate_proj(x)) * up_proj(x))) with the tiny tokenizer."""
    from detox_tui.backends.models import load_model
    from detox_tui.tiny import build_tokenizer, save_random_family_model, training_texts

    out = save_random_family_model(
        tmp_path_factory.mktemp("aura-llama"),
        "llama",
        build_tokenizer(training_texts()),
        num_hidden_layers=2,
        max_position_embeddings=2048,
    )
    return load_model(str(out), device="cpu", dtype="float32")


def _scaled_output(module, alpha):
    return module.register_forward_hook(lambda _m, _i, out: out * alpha)


def test_gated_mlp_neuron_is_dampened_at_down_proj_input_and_folds_exactly(gated_lm, tmp_path):
    lm = gated_lm
    assert AuraEditor().default_hparams(lm)["unit"] == "neuron"
    fingerprint = weights_fingerprint(lm.model)
    delta = get_editor("aura").compute(lm, [], {"modules": "mlp_in"}, _context(tmp_path))
    # The neuron folds into down_proj's columns; gate_proj and up_proj stay as they are.
    assert delta.deltas and all(name.endswith("mlp.down_proj.weight") for name in delta.deltas)
    expertise, hit = cached_expertise(lm, TOXIC, NONTOXIC, tmp_path / "cache", modules="mlp_in")
    assert hit and set(expertise) == {f"model.layers.{i}.mlp.down_proj:input" for i in range(2)}
    alphas = {key: alphas_from_auroc(a) for key, a in expertise.items()}
    assert any(bool((a < 1).any()) for a in alphas.values())
    probe = _probe(lm)
    with torch.no_grad():
        plain = lm.model(**probe).logits
        with AuraHooks(lm, alphas):
            hooked = lm.model(**probe).logits
        # Independently: act(gate) * (alpha up) = alpha (act(gate) * up), the neuron scaled.
        handles = [
            _scaled_output(
                lm.module(f"model.layers.{i}.mlp.up_proj"), alphas[f"model.layers.{i}.mlp.down_proj:input"]
            )
            for i in range(2)
        ]
        try:
            by_up = lm.model(**probe).logits
        finally:
            for h in handles:
                h.remove()
        with delta.applied_to(lm.model):
            folded = lm.model(**probe).logits
    assert not torch.allclose(plain, hooked, atol=1e-4)
    torch.testing.assert_close(hooked, by_up, atol=1e-5, rtol=0)
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=0)
    assert weights_fingerprint(lm.model) == fingerprint


def test_gate_unit_dampens_gate_proj_and_differs_from_the_neuron(gated_lm, tmp_path):
    lm = gated_lm
    ctx = _context(tmp_path)
    neuron = get_editor("aura").compute(lm, [], {"modules": "mlp_in", "unit": "neuron"}, ctx)
    gate = get_editor("aura").compute(lm, [], {"modules": "mlp_in", "unit": "gate"}, ctx)
    assert gate.deltas and all(name.endswith("mlp.gate_proj.weight") for name in gate.deltas)
    expertise, hit = cached_expertise(lm, TOXIC, NONTOXIC, tmp_path / "cache", modules="mlp_in", unit="gate")
    assert hit and set(expertise) == {f"model.layers.{i}.mlp.gate_proj" for i in range(2)}
    alphas = {key: alphas_from_auroc(a) for key, a in expertise.items()}
    probe = _probe(lm)
    with torch.no_grad():
        with AuraHooks(lm, alphas):
            hooked = lm.model(**probe).logits
        with gate.applied_to(lm.model):
            gate_logits = lm.model(**probe).logits
        with neuron.applied_to(lm.model):
            neuron_logits = lm.model(**probe).logits
    torch.testing.assert_close(gate_logits, hooked, atol=1e-5, rtol=0)
    # silu(alpha g) * u is not alpha silu(g) * u: the two units give different models.
    assert float((gate_logits - neuron_logits).abs().max()) > 1e-4


def test_unit_is_validated_in_one_sentence(gated_lm, tmp_path):
    with pytest.raises(UserError, match="'unit' must be one of neuron, gate, not 'up'"):
        get_editor("aura").compute(gated_lm, [], {"unit": "up"}, _context(tmp_path))
