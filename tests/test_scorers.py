"""Scorers: offline profanity, Detoxify through its real loader on a tiny local checkpoint, HF classifiers, registry."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from detoxify_fixture import ORIGINAL_ATTRIBUTES, build_tiny_detoxify, clean_texts, toxic_texts

from detox_tui.backends.scorers import SCORER_CHOICES, load_scorer
from detox_tui.backends.scorers.detoxify_scorer import DetoxifyScorer
from detox_tui.backends.scorers.hf_classifier import HFClassifierScorer, pick_toxic_label
from detox_tui.backends.scorers.profanity import ProfanityScorer
from detox_tui.errors import UserError

TOXIC = toxic_texts()


CLEAN = clean_texts()


def check_shapes(scores: dict[str, np.ndarray], attributes: tuple[str, ...], n: int) -> None:
    assert tuple(scores) == attributes
    for name, values in scores.items():
        assert isinstance(values, np.ndarray) and values.shape == (n,), name
        assert values.dtype.kind == "f"
        assert np.all((values >= 0.0) & (values <= 1.0)), name


# --------------------------------------------------------------------------------------------- profanity


def test_profanity_scorer_separates_toxic_from_neutral_texts():
    scorer = ProfanityScorer(batch_size=16)
    assert scorer.attributes == ("toxicity",) and scorer.primary == "toxicity"
    toxic = scorer.score(TOXIC)["toxicity"]
    clean = scorer.score(CLEAN)["toxicity"]
    check_shapes({"toxicity": toxic}, ("toxicity",), len(TOXIC))
    assert toxic.mean() > 0.6 > 0.2 > clean.mean()
    assert np.mean(toxic > 0.5) > 0.75 and np.mean(clean < 0.5) > 0.95
    # batching changes nothing
    np.testing.assert_allclose(ProfanityScorer(batch_size=1000).score(TOXIC)["toxicity"], toxic)
    check_shapes(scorer.score([]), ("toxicity",), 0)


# --------------------------------------------------------------------------------------------- detoxify


@pytest.fixture(scope="module")
def tiny_detoxify(tmp_path_factory):
    return build_tiny_detoxify(tmp_path_factory.mktemp("detoxify"))


@pytest.fixture(scope="module")
def detoxify_scorer(tiny_detoxify):
    checkpoint, config_dir = tiny_detoxify
    return DetoxifyScorer(checkpoint=checkpoint, huggingface_config_path=config_dir, batch_size=8)


def test_detoxify_real_loader_reports_every_attribute(detoxify_scorer):
    assert detoxify_scorer.attributes == ORIGINAL_ATTRIBUTES
    assert detoxify_scorer.primary == "toxicity"
    scores = detoxify_scorer.score(TOXIC[:5] + CLEAN[:6])
    check_shapes(scores, ORIGINAL_ATTRIBUTES, 11)
    check_shapes(detoxify_scorer.score([]), ORIGINAL_ATTRIBUTES, 0)


def test_detoxify_scores_match_detoxify_predict_and_do_not_depend_on_batching(tiny_detoxify, detoxify_scorer):
    from detoxify import Detoxify

    checkpoint, config_dir = tiny_detoxify
    texts = [TOXIC[0], CLEAN[0], "", "a much longer neutral sentence about the river and the valley " * 3]
    reference = Detoxify("original", checkpoint=str(checkpoint), huggingface_config_path=str(config_dir))
    expected = reference.predict(texts)
    ours = detoxify_scorer.score(texts)
    for name in ORIGINAL_ATTRIBUTES:
        np.testing.assert_allclose(ours[name], expected[name], atol=1e-5)
    one_by_one = DetoxifyScorer(checkpoint=checkpoint, huggingface_config_path=config_dir, batch_size=1)
    np.testing.assert_allclose(one_by_one.score(texts)["toxicity"], ours["toxicity"], atol=1e-5)


def test_detoxify_tiny_checkpoint_separates_toxic_from_clean(detoxify_scorer):
    toxic = detoxify_scorer.score(TOXIC)["toxicity"]
    clean = detoxify_scorer.score(CLEAN)["toxicity"]
    assert toxic.mean() - clean.mean() > 0.5


def test_detoxify_missing_weights_offline_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as err:
        load_scorer("detoxify")
    message = str(err.value)
    assert "Detoxify 'unbiased' weights are not cached" in message
    assert "detoxify:/path/to/file.ckpt" in message


def test_detoxify_bad_checkpoints(tmp_path):
    with pytest.raises(UserError, match=r"Detoxify checkpoint '.*missing\.ckpt' does not exist"):
        DetoxifyScorer(checkpoint=tmp_path / "missing.ckpt")
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    with pytest.raises(UserError, match=r"is not a valid Detoxify checkpoint"):
        DetoxifyScorer(checkpoint=bogus)
    with pytest.raises(UserError, match=r"Unknown Detoxify variant 'tiny'"):
        DetoxifyScorer("tiny")


# --------------------------------------------------------------------------------------------- HF classifier


def save_classifier(path, config_dir, labels: list[str], multi_label: bool = False, seed: int = 0):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(config_dir)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def reference_probs(model, tokenizer, texts, multi_label: bool) -> np.ndarray:
    with torch.no_grad():
        logits = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
    return probs.numpy()


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, tiny_detoxify):
    _, config_dir = tiny_detoxify
    root = tmp_path_factory.mktemp("classifiers")
    return {
        "named": (root / "named", *save_classifier(root / "named", config_dir, ["toxic", "non-toxic"])),
        "plain": (
            root / "plain",
            *save_classifier(root / "plain", config_dir, ["LABEL_0", "LABEL_1"], seed=1),
        ),
        "multi": (
            root / "multi",
            *save_classifier(
                root / "multi", config_dir, ["insult", "Toxic", "threat"], multi_label=True, seed=2
            ),
        ),
    }


def test_hf_classifier_picks_the_label_named_toxic(classifiers):
    path, model, tokenizer = classifiers["named"]
    texts = [TOXIC[1], CLEAN[2], TOXIC[3]]
    scorer = HFClassifierScorer(str(path), batch_size=2)
    assert scorer.toxic_index == 0 and scorer.attributes == ("toxicity",)
    scores = scorer.score(texts)
    check_shapes(scores, ("toxicity",), 3)
    np.testing.assert_allclose(
        scores["toxicity"], reference_probs(model, tokenizer, texts, False)[:, 0], atol=1e-5
    )
    check_shapes(scorer.score([]), ("toxicity",), 0)


def test_hf_classifier_defaults_to_index_1_and_honours_an_explicit_label(classifiers):
    path, model, tokenizer = classifiers["plain"]
    texts = [TOXIC[0], CLEAN[0]]
    expected = reference_probs(model, tokenizer, texts, False)
    np.testing.assert_allclose(
        HFClassifierScorer(str(path)).score(texts)["toxicity"], expected[:, 1], atol=1e-5
    )
    by_name = load_scorer(f"hf:{path}#label_0").score(texts)["toxicity"]
    np.testing.assert_allclose(by_name, expected[:, 0], atol=1e-5)
    with pytest.raises(UserError, match=r"has no label 'rude'; its labels are: LABEL_0, LABEL_1"):
        load_scorer(f"hf:{path}#rude")
    with pytest.raises(UserError, match=r"Label index 5 is out of range"):
        HFClassifierScorer(str(path), toxic_label=5)


def test_hf_multi_label_classifier_uses_sigmoid_and_reports_every_label(classifiers):
    path, model, tokenizer = classifiers["multi"]
    texts = [TOXIC[4], CLEAN[4]]
    scorer = HFClassifierScorer(str(path))
    assert scorer.attributes == ("toxicity", "insult", "threat")
    scores = scorer.score(texts)
    check_shapes(scores, ("toxicity", "insult", "threat"), 2)
    expected = reference_probs(model, tokenizer, texts, True)
    np.testing.assert_allclose(scores["toxicity"], expected[:, 1], atol=1e-5)
    np.testing.assert_allclose(scores["threat"], expected[:, 2], atol=1e-5)


def test_pick_toxic_label_rules():
    assert pick_toxic_label(["non-toxic", "toxic"]) == 1
    assert pick_toxic_label(["TOXIC", "NOT_TOXIC"]) == 0
    assert pick_toxic_label(["nontoxic", "hate", "toxicity"]) == 2
    assert pick_toxic_label(["neg", "pos"]) == 1
    assert pick_toxic_label(["score"]) == 0
    assert pick_toxic_label(["a", "b", "c"], "2") == 2


def test_hf_classifier_that_cannot_be_loaded(tmp_path):
    with pytest.raises(UserError, match=r"^Classifier directory '/no/such/dir' does not exist\.$"):
        load_scorer("hf:/no/such/dir")
    with pytest.raises(UserError, match=r"Could not load the classifier 'nobody/no-such-classifier-xyz'"):
        load_scorer("hf:nobody/no-such-classifier-xyz")  # HF_HUB_OFFLINE=1 in tests


# --------------------------------------------------------------------------------------------- registry


def test_registry_builds_each_kind(tiny_detoxify, classifiers):
    checkpoint, config_dir = tiny_detoxify
    detox = load_scorer(f"detoxify:{checkpoint}@{config_dir}", batch_size=4)
    assert isinstance(detox, DetoxifyScorer) and detox.batch_size == 4
    assert detox.attributes == ORIGINAL_ATTRIBUTES
    profanity = load_scorer("profanity")
    assert isinstance(profanity, ProfanityScorer) and profanity.name == "profanity"
    hf = load_scorer(f"hf:{classifiers['named'][0]}")
    assert isinstance(hf, HFClassifierScorer) and hf.toxic_index == 0


def test_registry_rejects_unknown_specs_listing_the_choices():
    with pytest.raises(UserError, match=r"Scorer 'hf:' names no model"):
        load_scorer("hf:")
    for spec in ("perspective", "profanity:strict", ""):
        with pytest.raises(UserError) as err:
            load_scorer(spec)
        assert "detoxify" in str(err.value) and "hf:" in str(err.value)
    with pytest.raises(UserError, match=r"Unknown scorer 'perspective'; choose one of: detoxify,"):
        load_scorer("perspective")
    with pytest.raises(UserError, match=r"Unknown Detoxify variant 'orignal'"):
        load_scorer("detoxify:orignal")
    assert {
        "detoxify",
        "detoxify:original",
        "detoxify:unbiased",
        "detoxify:multilingual",
        "profanity",
    } <= set(SCORER_CHOICES)
    assert any(choice.startswith("hf:") for choice in SCORER_CHOICES)
