"""`detox-tui demo`: the demo model is built once into the data dir, reused, rebuilt when damaged, and shows a
real, measured effect headless and in the app with its settings prefilled."""

from __future__ import annotations

import json
import os

import pytest

from detox_tui import demo
from detox_tui.cli import main
from detox_tui.events import Log, Progress
from detox_tui.pipeline.store import RunStore

# A build too short to teach the model anything: enough for the cache's behaviour, in a second or two.
QUICK = {**demo.BUILD, "steps": 2}


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    """A data dir holding the real demo build (the settings `detox-tui demo` uses), built once for the module."""
    home = tmp_path_factory.mktemp("demo-home")
    built = demo.ensure_demo(home)
    assert built.built
    return home


def test_the_demo_builds_with_its_prompts_and_a_manifest(demo_home):
    d = demo.ensure_demo(demo_home)
    assert (
        d.folder.parent == demo_home / "demo" and d.folder.name == f"v{demo.DEMO_VERSION}-{demo.cache_key()}"
    )
    assert (d.model_dir / "config.json").is_file() and (d.model_dir / "model.safetensors").is_file()
    records = [json.loads(line) for line in d.prompts.read_text(encoding="utf-8").splitlines()]
    assert records == demo.prompt_records() and all(r["target"].startswith(" ") for r in records)
    assert d.manifest["build"] == demo.BUILD and d.manifest["build_seconds"] > 0
    assert set(d.manifest["files"]) >= {"prompts.jsonl", "model/model.safetensors", "model/tokenizer.json"}
    assert demo.cache_problem(d.folder, demo.cache_key()) is None


def test_a_second_call_reuses_the_cache_without_training(demo_home, monkeypatch):
    weights = demo.ensure_demo(demo_home).model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached demo model was trained again")

    monkeypatch.setattr("detox_tui.tiny.train_insult_model", no_training)
    again = demo.ensure_demo(demo_home)
    assert not again.built and weights.stat().st_mtime_ns == mtime


def test_a_damaged_or_partial_cache_is_rebuilt(tmp_path):
    events = []
    first = demo.ensure_demo(tmp_path, build=QUICK, emit=events.append)
    assert first.built
    assert any(isinstance(e, Progress) and e.stage == demo.BUILD_STAGE and e.done == e.total for e in events)
    key = demo.cache_key(QUICK)
    weights = first.model_dir / "model.safetensors"

    # A damaged weights file: detected by its checksum, rebuilt whole, and the user is told why.
    weights.write_bytes(weights.read_bytes()[:100])
    assert demo.cache_problem(first.folder, key) == "model/model.safetensors is damaged"
    events.clear()
    second = demo.ensure_demo(tmp_path, build=QUICK, emit=events.append)
    assert second.built and demo.cache_problem(second.folder, key) is None
    assert any(isinstance(e, Log) and "damaged" in e.message for e in events)

    # A folder without its manifest (written last) is not a finished build.
    (second.folder / demo.MANIFEST).unlink()
    assert demo.ensure_demo(tmp_path, build=QUICK).built
    # Nor is one for other build settings: they get their own folder.
    assert demo.cache_key(QUICK) != demo.cache_key(demo.BUILD)
    assert not demo.ensure_demo(tmp_path, build=QUICK).built


def test_an_interrupted_build_leaves_nothing_that_looks_finished(tmp_path):
    def interrupt(event):
        if isinstance(event, Progress) and event.done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo(tmp_path, build=QUICK, emit=interrupt)
    root = tmp_path / "demo"
    assert list(root.iterdir()) == []  # neither the final folder nor the temporary one
    assert demo.ensure_demo(tmp_path, build=QUICK).built


def test_headless_json_prints_the_verdict_the_engine_measured(demo_home, capsys):
    rc = main(["demo", "--headless", "--json", "--data-dir", str(demo_home)])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)
    assert result["demo"]["built"] is False  # the module's build, reused
    assert result["config"]["method"] == "memit" and result["config"]["layers"] == demo.RUN["layers"]
    assert result["config"]["scoring"]["scorer"] == "profanity"
    rows, summary = result["rows"], result["summary"]
    assert len(rows) == len(demo.prompt_records())
    # The verdict is what the rows measured: each detoxified prompt fell significantly on sampled continuations.
    detoxified = [r for r in rows if r["detoxified"]]
    assert summary["share_detoxified"] > 0
    assert summary["share_detoxified"] == pytest.approx(len(detoxified) / len(rows))
    assert (
        summary["share_detoxified_ci_low"]
        < summary["share_detoxified"]
        <= summary["share_detoxified_ci_high"]
    )
    for r in detoxified:
        assert r["after"]["mean"] < r["before"]["mean"] and r["p_value"] < 0.05 and r["converged"]
    # The run is in the data dir's store, as any edit run.
    store = RunStore.open(str(demo_home))
    assert store.resolve_id(result["run_id"]) == result["run_id"]


def test_demo_usage_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["demo", "--json", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --json needs --headless (the app prints no results to read)."]
    assert not (tmp_path / "demo").exists()  # refused before any build


def test_demo_without_headless_opens_the_app_on_the_cached_demo(demo_home, monkeypatch, capsys):
    from detox_tui.app import DetoxApp

    opened = []
    monkeypatch.setattr(DetoxApp, "run", lambda self, *a, **k: opened.append(self))
    assert main(["demo", "--data-dir", str(demo_home)]) == 0
    (app,) = opened
    d = demo.ensure_demo(demo_home)
    assert app.model_name == str(d.model_dir) and app.prompts_source == str(d.prompts)
    assert app.scorer_name == "profanity" and app.data_dir == str(demo_home)
    assert app.initial_layers == demo.RUN["layers"] and app.initial_hparams == demo.RUN["hparams"]
    assert "demo model (cached)" in capsys.readouterr().err


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_the_app_opens_on_the_demo_with_its_settings(demo_home):
    from detox_tui.app import DetoxApp
    from detox_tui.widgets.layer_picker import LayerPicker
    from detox_tui.widgets.method_form import MethodForm
    from detox_tui.widgets.prompt_picker import PromptPicker
    from tests.app_harness import wait_for, wait_loaded

    d = demo.ensure_demo(demo_home)
    app = DetoxApp(**demo.app_options(d, str(demo_home)))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_loaded(pilot)
        assert (
            os.path.samefile(app.workbench.lm.name, d.model_dir) and app.workbench.scorer.name == "profanity"
        )
        assert [i.target for i in app.query_one(PromptPicker).items] == [
            r["target"] for r in demo.prompt_records()
        ]
        form, picker = app.query_one(MethodForm), app.query_one(LayerPicker)

        def shows_demo_values() -> bool:
            fields = form.hparam_inputs()
            return all(float(fields[k].value) == float(v) for k, v in demo.RUN["hparams"].items())

        assert form.method == "memit" and shows_demo_values()
        assert form.hparams()["mom2_update_weight"] == demo.RUN["hparams"]["mom2_update_weight"]
        assert picker.selected_layers == demo.RUN["layers"]
        assert picker.configs == demo.RUN["ablation"]
        assert form.run_settings() == demo.RUN["run_settings"]
        # Reset and a round trip through another method come back to the demo's values, not the preset's.
        form.query_one("#hp-reset").press()
        await pilot.pause()
        assert shows_demo_values()
        form.set_method("rome")
        await wait_for(pilot, lambda: "key_form" in form.hparam_inputs(), what="rome's fields")
        form.set_method("memit")
        await wait_for(pilot, lambda: "mom2_update_weight" in form.hparam_inputs(), what="memit's fields")
        assert shows_demo_values() and picker.selected_layers == demo.RUN["layers"]
