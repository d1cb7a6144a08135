"""EditDelta from a real edit: bit-exact revert, save/load round trip; presets validated against the model."""

from __future__ import annotations

import pytest
import torch

from detox_tui.backends.editing import presets
from detox_tui.backends.editing.base import EditContext, EditDelta, EditRequest
from detox_tui.backends.editing.ft import FineTuneEditor
from detox_tui.backends.models import MODEL_SPECS, LoadedModel, weights_fingerprint
from detox_tui.errors import UserError
from detox_tui.tiny import INSULT_PAIRS, build_gpt2


def fake_lm(name: str, n_layer: int) -> LoadedModel:
    """A model with the depth of a real one (tiny width) so presets can be checked without a download."""
    model = build_gpt2(vocab_size=16, n_layer=n_layer, n_embd=8, n_head=2, n_positions=16)
    spec = next(s for s in MODEL_SPECS if s.family == "gpt2")
    return LoadedModel(model=model, tokenizer=None, spec=spec, name=name, device=torch.device("cpu"))


@pytest.fixture
def ft_delta(insult_lm) -> EditDelta:
    prompt, _, safe = INSULT_PAIRS[0]
    hp = {"layers": [1, 2], "lr": 5e-3, "norm_constraint": 0.02, "steps": 4}
    return FineTuneEditor().compute(insult_lm, [EditRequest(prompt, safe)], hp, EditContext())


def test_revert_is_bit_exact_after_50_apply_revert_cycles(insult_lm, ft_delta):
    original = weights_fingerprint(insult_lm.model)
    edited = None
    for _ in range(50):
        ft_delta.apply(insult_lm.model)
        now = weights_fingerprint(insult_lm.model)
        assert now != original
        assert edited is None or now == edited  # every application gives the same weights
        edited = now
        ft_delta.revert(insult_lm.model)
        assert weights_fingerprint(insult_lm.model) == original


def test_save_load_round_trip_gives_identical_tensors_and_header(insult_lm, ft_delta, tmp_path):
    path = ft_delta.save(tmp_path / "edit.safetensors")
    loaded = EditDelta.load(path)
    assert loaded.header() == ft_delta.header()
    assert loaded.hparams["layers"] == [1, 2] and loaded.method == "ft"
    assert set(loaded.deltas) == set(ft_delta.deltas)
    for name, tensor in ft_delta.deltas.items():
        assert torch.equal(loaded.deltas[name], tensor)
    with ft_delta.applied_to(insult_lm.model):
        expected = weights_fingerprint(insult_lm.model)
    with loaded.applied_to(insult_lm.model):
        assert weights_fingerprint(insult_lm.model) == expected


def test_named_presets_for_gpt2_medium_and_xl():
    medium = fake_lm("gpt2-medium", 24)
    memit = presets.load_preset(medium, "memit")
    assert memit["layers"] == [4, 5, 6, 7, 8]
    assert memit["mom2_update_weight"] == 20000 and memit["clamp_norm_factor"] == 0.75
    assert memit["v_loss_layer"] == 23 and memit["v_num_grad_steps"] == 20 and memit["kl_factor"] == 0.0625
    assert presets.load_preset(medium, "rome")["layer"] == 8
    ft = presets.load_preset(medium, "ft")
    assert (ft["steps"], ft["lr"], ft["norm_constraint"]) == (25, 5e-4, 2e-3)
    assert presets.load_preset(medium, "dinm") == {
        "steps": 10,
        "lr": 5e-4,
        "nll_weight": 0.1,
        "kl_weight": 1.0,
    }
    assert presets.load_preset(medium, "aura") == {
        "pooling": "max",
        "modules": "both",
        "max_sentences": 500,
        "sentences": "builtin",
        "batch_size": 16,
        "unit": "gate",
    }
    xl = fake_lm("openai-community/gpt2-xl", 48)
    assert presets.load_preset(xl, "memit")["layers"] == [13, 14, 15, 16, 17]
    assert presets.load_preset(xl, "memit")["v_loss_layer"] == 47
    assert presets.load_preset(xl, "rome")["layer"] == 17


def test_unnamed_model_gets_the_family_default_scaled_to_its_depth():
    small = fake_lm("my-gpt2-12", 12)
    memit = presets.load_preset(small, "memit")
    assert memit["layers"] == [2, 3, 4]  # round(l * 12 / 24) for 4..8, deduplicated
    assert memit["v_loss_layer"] == 11
    assert presets.load_preset(small, "rome")["layer"] == 4
    for method in presets.METHODS:  # every preset is valid for the model it was made for
        assert presets.validate_hparams(small, method, presets.load_preset(small, method))


def test_validation_errors_are_one_sentence():
    lm = fake_lm("gpt2-medium", 24)
    cases = [
        ("memit", {"layers": [4, 30]}, "Layer 30 is out of range: gpt2-medium has layers 0 to 23."),
        ("memit", {"lambda": 3}, "Unknown memit hyperparameter 'lambda'"),
        ("memit", {"v_lr": "fast"}, "must be a number"),
        ("memit", {"batch_z": 1}, "must be true or false"),
        ("rome", {"layers": [5, 6]}, "ROME edits exactly one layer"),
        ("ft", {"objective": "ft-x"}, "must be one of ft-m, ft-l"),
        ("ft", {"steps": 0}, "must be at least 1"),
        ("dinm", {"lr": -1.0}, "must not be negative"),
    ]
    for method, hp, message in cases:
        with pytest.raises(UserError) as info:
            presets.validate_hparams(lm, method, {**presets.load_preset(lm, method), **hp})
        text = str(info.value)
        assert message in text and "\n" not in text


def test_validation_coerces_and_apply_layers_sets_the_right_key():
    lm = fake_lm("gpt2-medium", 24)
    hp = presets.validate_hparams(
        lm, "memit", {"layers": [8, 4, 4], "mom2_update_weight": 15000, "v_num_grad_steps": 10.0}
    )
    assert hp["layers"] == [4, 8] and hp["mom2_update_weight"] == 15000.0 and hp["v_num_grad_steps"] == 10
    assert (
        isinstance(hp["v_num_grad_steps"], int) and hp["clamp_norm_factor"] == 0.75
    )  # the rest from the preset
    rome = presets.apply_layers("rome", presets.load_preset(lm, "rome"), [6])
    assert rome["layer"] == 6 and "layers" not in rome
    assert presets.apply_layers("memit", {}, [7, 5]) == {"layers": [5, 7]}
    dinm = presets.validate_hparams(
        lm, "dinm", presets.apply_layers("dinm", presets.load_preset(lm, "dinm"), [3])
    )
    assert dinm["layer"] == 3
    with pytest.raises(UserError, match="exactly one layer"):
        presets.apply_layers("rome", {}, [1, 2])
