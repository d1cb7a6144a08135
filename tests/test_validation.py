"""Validate before working: every cheap mistake is refused in one sentence before anything is generated."""

from __future__ import annotations

import math

import pytest

from detox_tui.backends.editing import presets
from detox_tui.backends.editing.base import EDITORS, editor_class
from detox_tui.config import ExperimentConfig, GenerationConfig, ModelConfig, ScoringConfig
from detox_tui.errors import UserError
from detox_tui.pipeline.validation import validate_edit
from detox_tui.prompts.base import PromptItem


def config(model_dir, **kw) -> ExperimentConfig:
    cfg = ExperimentConfig(
        model=ModelConfig(name=str(model_dir), device="cpu", dtype="float32"),
        generation=GenerationConfig(samples=2, max_new_tokens=3, seed=0),
        scoring=ScoringConfig(scorer="profanity"),
    )
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def prompts(n: int = 2, target: str | None = " fine.") -> list[PromptItem]:
    return [PromptItem(f"Prompt number {i} says", target=target) for i in range(n)]


def _forbidden(*args, **kwargs):
    raise AssertionError("work started before the configuration was validated")


@pytest.fixture
def workbench(tiny_model_dir, tmp_path, monkeypatch):
    """A workbench on the untrained 4-layer model whose generation, scoring and statistics fail if reached."""
    from detox_tui.backends import stats
    from detox_tui.pipeline import experiment

    wb = experiment.Workbench.load(config(tiny_model_dir), data_dir=str(tmp_path / "home"))
    monkeypatch.setattr(experiment, "generate_continuations", _forbidden)
    monkeypatch.setattr(experiment, "measure_reference", _forbidden)
    monkeypatch.setattr(stats, "covariance", _forbidden)
    monkeypatch.setattr(wb.scorer, "score", _forbidden)
    return wb


# (run, config fields, prompts, holdout, configs, words the one-line message must contain)
BAD = [
    ("edit", dict(method="nope"), None, (), None, ["--method", "nope"]),
    ("edit", dict(method=None), None, (), None, ["No editing method", "--method"]),
    ("edit", dict(method="memit", mode="delete"), None, (), None, ["--mode", "delete"]),
    ("edit", dict(method="memit", layers=[1, 9]), None, (), None, ["Layer 9", "--layers", "0 to 3"]),
    ("edit", dict(method="memit", layers=[-1]), None, (), None, ["Layer -1", "--layers"]),
    (
        "edit",
        dict(method="rome", layers=[1, 2]),
        None,
        (),
        None,
        ["ROME edits exactly one layer, but 2 were given in --layers (1,2); give one, e.g. --layers 1."],
    ),
    ("edit", dict(method="memit", layers=[]), None, (), None, ["--layers names no layer"]),
    ("edit", dict(method="memit", layers=[1], hparams={"lambda": 3}), None, (), None, ["'lambda'"]),
    ("edit", dict(method="ft", layers=[1], hparams={"lr": math.nan}), None, (), None, ["'lr'", "finite"]),
    ("edit", dict(method="ft", layers=[1], hparams={"lr": math.inf}), None, (), None, ["'lr'", "finite"]),
    ("edit", dict(method="memit", layers=[1], hparams={"v_loss_layer": 7}), None, (), None, ["Layer 7"]),
    (
        "edit",
        dict(method="memit", layers=[1]),
        [PromptItem("Has a target", target=" ok"), PromptItem("Lacks one")],
        (),
        None,
        ["'Lacks one'", "no safe target", "--mode erase"],
    ),
    (
        "edit",
        dict(method="memit", layers=[1], protocol="per-prompt"),
        None,
        [PromptItem("Held out", target=" ok")],
        None,
        ["--holdout", "--batch"],
    ),
    (
        "edit",
        dict(method="memit", layers=[1]),
        [PromptItem("The cat sat", target=" ok", subject="dog")],
        (),
        None,
        ["'dog'", "does not occur"],
    ),
    ("edit", dict(method="memit", layers=[1]), [], (), None, ["No prompts"]),
    (
        "ablation",
        dict(method="memit"),
        None,
        (),
        [[1], [1, 5]],
        ["Layer 5 in the --configs entry '1,5'", "0 to 3", "leave --configs out"],
    ),
    ("ablation", dict(method="rome"), None, (), [[1], [1, 2]], ["ROME edits exactly one layer", "--configs"]),
    ("ablation", dict(method="dinm"), None, (), [[1, 2]], ["DINM edits exactly one layer", "--configs"]),
    ("ablation", dict(method="memit"), None, (), [[1], [1]], ["'1'", "twice"]),
    (
        "ablation",
        dict(method="memit"),
        None,
        (),
        [],
        ["No layer configurations were given (--configs is empty)."],
    ),
]


@pytest.mark.parametrize("run, fields, items, held, configs, words", BAD)
def test_bad_configurations_fail_in_one_line_before_any_work(
    workbench, tiny_model_dir, run, fields, items, held, configs, words
):
    from detox_tui.pipeline.experiment import run_ablation, run_edit

    cfg = config(tiny_model_dir, **fields)
    items = prompts() if items is None else items
    # The engine function alone...
    with pytest.raises(UserError) as direct:
        validate_edit(workbench.lm, cfg, items, held, configs, ablation=run == "ablation")
    # ...and the engine's runs, which call it first: nothing generated (the fixture fails on that), no run stored.
    with pytest.raises(UserError) as info:
        if run == "edit":
            run_edit(workbench, items, cfg, holdout=held)
        else:
            run_ablation(workbench, items, cfg, configs)
    message = str(info.value)
    assert message == str(direct.value)
    assert "\n" not in message and message.endswith(".")
    for word in words:
        assert word in message, (word, message)
    assert workbench.store.list_runs() == []


def test_front_end_names_replace_the_cli_options(tiny_lm, tiny_model_dir):
    cfg = config(tiny_model_dir, method="rome", layers=[1, 2])
    names = {"layers": "the selected layers", "configs": "ablation list"}
    with pytest.raises(UserError, match=r"but 2 were given in the selected layers \(1,2\); select one\."):
        validate_edit(tiny_lm, cfg, prompts(), names=names)
    with pytest.raises(
        UserError, match="but the ablation list entry '1,2' has 2; give one layer per entry[.]"
    ):
        validate_edit(tiny_lm, cfg, prompts(), configs=[[1, 2]], ablation=True, names=names)


def test_valid_configurations_return_the_hparams_each_run_uses(tiny_lm, tiny_model_dir):
    edit = validate_edit(tiny_lm, config(tiny_model_dir, method="rome", layers=[2]), prompts())
    assert edit.editor is editor_class("rome")
    assert edit.layer_sets == [[2]] and edit.hparams[0]["layer"] == 2 and "layers" not in edit.hparams[0]
    preset = validate_edit(tiny_lm, config(tiny_model_dir, method="memit"), prompts())
    assert preset.layer_sets == [None]
    assert preset.hparams[0]["layers"] == presets.load_preset(tiny_lm, "memit")["layers"]
    ablation = validate_edit(
        tiny_lm, config(tiny_model_dir, method="memit"), prompts(), configs=[[2, 1], [3]], ablation=True
    )
    assert ablation.configs == [[1, 2], [3]]
    assert [hp["layers"] for hp in ablation.hparams] == [[1, 2], [3]]


def test_erase_mode_needs_no_targets_and_aura_needs_neither_targets_nor_layers(tiny_lm, tiny_model_dir):
    no_targets = prompts(target=None)
    validate_edit(tiny_lm, config(tiny_model_dir, method="memit", mode="erase"), no_targets)
    aura = validate_edit(tiny_lm, config(tiny_model_dir, method="aura"), no_targets)
    assert aura.hparams[0]["layers"] == []  # every layer
    # DINM locates its own layer: none given is fine, and an empty selection means the same.
    dinm = validate_edit(tiny_lm, config(tiny_model_dir, method="dinm", layers=[]), prompts())
    assert dinm.layer_sets == [None] and dinm.hparams[0]["layer"] is None
    # AurA is request-free: one edit covers every prompt, so held-out prompts are fine under per-prompt.
    validate_edit(
        tiny_lm, config(tiny_model_dir, method="aura", protocol="per-prompt"), no_targets, holdout=no_targets
    )


@pytest.mark.parametrize("n_layers", [4, 12, 24, 48])
@pytest.mark.parametrize("single_layer", [False, True])
def test_default_ablation_configs_scale_with_depth(n_layers, single_layer):
    configs = presets.default_ablation_configs(n_layers, single_layer=single_layer)
    assert len(configs) >= 3
    assert all(0 <= layer < n_layers for c in configs for layer in c)
    assert all(c == sorted(set(c)) for c in configs)
    assert len({tuple(c) for c in configs}) == len(configs)
    assert configs == sorted(configs, key=lambda c: (len(c), c))
    if single_layer:
        assert all(len(c) == 1 for c in configs)
    else:
        assert {len(c) for c in configs} == {1, 2, 3}


def test_default_ablation_configs_follow_the_documented_rule():
    # gpt2-medium (24 layers): 1/6, 1/3, 1/2 of the depth, and pairs and a triple around the MEMIT preset's centre.
    assert presets.default_ablation_configs(24) == [[4], [8], [12], [5, 6], [6, 7], [5, 6, 7]]
    assert presets.default_ablation_configs(24, single_layer=True) == [[4], [5], [6], [7], [8], [12]]
    assert presets.default_ablation_configs(48) == [[8], [16], [24], [11, 12], [12, 13], [11, 12, 13]]
    assert presets.default_ablation_configs(1) == [[0]]


def test_ablation_without_configs_uses_the_scaled_defaults(tiny_lm, tiny_model_dir):
    for method in ("memit", "rome"):
        checked = validate_edit(tiny_lm, config(tiny_model_dir, method=method), prompts(), ablation=True)
        single = editor_class(method).single_layer
        assert checked.configs == presets.default_ablation_configs(tiny_lm.n_layers, single_layer=single)


# ------------------------------------------------------------------ capabilities drive behaviour


def test_every_registered_editor_declares_consistent_capabilities():
    assert tuple(EDITORS) == presets.METHODS
    for method in EDITORS:
        cls = editor_class(method)
        assert cls.name == method and cls.title
        assert cls.layers_key in ("layers", "layer")
        # One index under "layer" exactly when the method edits a single layer.
        assert (cls.layers_key == "layer") == cls.single_layer
        assert not (cls.request_free and cls.needs_targets)
        assert not cls.locates_layer or cls.layers_optional
    assert editor_class("rome").single_layer and editor_class("rome").needs_covariance
    assert editor_class("memit").needs_covariance and not editor_class("ft").needs_covariance
    assert editor_class("aura").request_free and not editor_class("aura").needs_targets
    assert editor_class("dinm").locates_layer
    with pytest.raises(UserError, match="Unknown editing method 'x'"):
        editor_class("x")


def test_a_new_single_layer_editor_is_refused_several_layers_through_its_attribute(
    tiny_lm, tiny_model_dir, monkeypatch
):
    """Validation reads the class attributes, not the name: flip MEMIT to single-layer and it is refused."""
    cls = editor_class("memit")
    cfg = config(tiny_model_dir, method="memit", layers=[1, 2])
    validate_edit(tiny_lm, cfg, prompts())
    monkeypatch.setattr(cls, "single_layer", True)
    with pytest.raises(UserError, match="MEMIT edits exactly one layer"):
        validate_edit(tiny_lm, cfg, prompts())
    monkeypatch.setattr(cls, "single_layer", False)
    monkeypatch.setattr(cls, "needs_targets", False)
    validate_edit(tiny_lm, config(tiny_model_dir, method="memit", layers=[1]), prompts(target=None))
    monkeypatch.setattr(editor_class("aura"), "needs_targets", True)
    monkeypatch.setattr(editor_class("aura"), "request_free", False)
    with pytest.raises(UserError, match="no safe target"):
        validate_edit(tiny_lm, config(tiny_model_dir, method="aura"), prompts(target=None))


def test_covariance_is_computed_only_for_methods_that_declare_it(insult_model_dir, tmp_path, monkeypatch):
    from detox_tui.backends import stats
    from detox_tui.pipeline import experiment

    calls = []
    monkeypatch.setattr(stats, "covariance", lambda lm, layers, **kw: calls.append(list(layers)))
    created = []
    real = experiment._UnionCovariance

    def spy(*args, **kwargs):
        created.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "_UnionCovariance", spy)
    wb = experiment.Workbench.load(config(insult_model_dir), data_dir=str(tmp_path / "home"))
    cfg = config(insult_model_dir, method="ft", hparams={"steps": 1})
    experiment.run_ablation(wb, [PromptItem("Those people are", target=" kind")], cfg, [[1]])
    assert created == [] and calls == []
    monkeypatch.setattr(editor_class("ft"), "needs_covariance", True)
    experiment.run_ablation(wb, [PromptItem("Those people are", target=" kind")], cfg, [[1]])
    assert created == [[1]]


# ------------------------------------------------------------------ the app calls the same check


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_app_refuses_rome_on_two_layers_with_a_notification_before_any_work(
    insult_model_dir, tmp_path, monkeypatch
):
    from detox_tui.pipeline import experiment
    from detox_tui.widgets.layer_picker import LayerPicker
    from detox_tui.widgets.method_form import MethodForm
    from tests.app_harness import make_app, wait_loaded

    app = make_app(insult_model_dir, tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_loaded(pilot)
        monkeypatch.setattr(experiment, "generate_continuations", _forbidden)
        await pilot.press("2")
        app.query_one(MethodForm).set_method("rome")
        await pilot.pause()
        picker = app.query_one(LayerPicker)
        picker.set_layers([1, 2])
        app.set_focus(None)
        await pilot.press("e")
        await pilot.pause()
        assert app.running is None
        messages = [n.message for n in app._notifications]
        assert any(
            m.startswith("ROME edits exactly one layer, but 2 were given in the layer selection")
            for m in messages
        ), messages
        # An ablation list with a pair is refused the same way, naming the list.
        picker.configs = [[1], [1, 2]]
        await pilot.press("a")
        await pilot.pause()
        assert app.running is None
        assert any("the ablation list entry '1,2' has 2" in n.message for n in app._notifications)
        assert app.workbench.store.list_runs() == []


# ------------------------------------------------------------------ the CLI calls the same check


CLI_BAD = [
    (["ablate", "--configs", "1;1,5"], ["Layer 5 in the --configs entry '1,5'", "leave --configs out"]),
    (["ablate", "--method", "rome", "--configs", "1;1,2"], ["ROME edits exactly one layer", "--configs"]),
    (["edit", "--method", "rome", "--layers", "1,2"], ["ROME edits exactly one layer", "--layers 1"]),
    (["edit", "--layers", "1", "--hparam", "v_lr=1e999"], ["'v_lr'", "finite"]),
    (["edit", "--layers", "1", "--holdout", "PROMPTS"], ["--holdout", "--batch"]),
]


@pytest.mark.parametrize("args, words", CLI_BAD)
def test_cli_refuses_bad_edits_in_one_line_before_any_work(
    capsys, tiny_model_dir, tmp_path, monkeypatch, args, words
):
    from detox_tui.cli import main
    from detox_tui.pipeline import experiment
    from detox_tui.pipeline.store import RunStore

    monkeypatch.setattr(experiment, "generate_continuations", _forbidden)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Those people are", "target": " kind"}\n')
    args = [str(prompts) if a == "PROMPTS" else a for a in args]
    home = tmp_path / "home"
    common = ["--model", str(tiny_model_dir), "--scorer", "profanity", "--device", "cpu"]
    rc = main([*args, *common, "--prompts", str(prompts), "--data-dir", str(home)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert RunStore.open(str(home)).list_runs() == []


def test_cli_ablate_without_configs_scales_to_a_4_layer_model(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """The default --configs (none) no longer fails on a small model: the engine picks configurations in range."""
    from detox_tui.cli import main
    from detox_tui.pipeline import experiment

    seen = []

    def stop_at_run(wb, prompts, cfg, configs=None, **kwargs):
        checked = validate_edit(wb.lm, cfg, prompts, configs=configs, ablation=True)
        seen.append(checked.configs)
        raise UserError("stopped before the work for this test.")

    monkeypatch.setattr(experiment, "run_ablation", stop_at_run)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Those people are", "target": " kind"}\n')
    rc = main(
        ["ablate", "--model", str(tiny_model_dir), "--scorer", "profanity", "--device", "cpu"]
        + ["--prompts", str(prompts), "--data-dir", str(tmp_path / "home")]
    )
    assert rc == 2 and "stopped before the work" in capsys.readouterr().err
    assert seen == [presets.default_ablation_configs(4)]
