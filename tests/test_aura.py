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
