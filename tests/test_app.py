"""Pilot tests of the Textual app on the tiny insult model with the offline profanity scorer."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from detox_tui.backends.editing.presets import default_ablation_configs
from detox_tui.widgets.export_dialog import ExportDialog, ExportRequest
from detox_tui.widgets.layer_picker import LayerPicker, LayerToggles
from detox_tui.widgets.method_form import MethodForm
from detox_tui.widgets.prompt_detail import PromptDetail
from detox_tui.widgets.prompt_picker import PromptPicker
from detox_tui.widgets.results_table import ResultsTable
from detox_tui.widgets.sort_menu import SortMenu
from tests.app_harness import TINY_MEMIT, make_app, set_input, wait_for, wait_idle, wait_loaded

SIZE = (120, 40)
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def _set_run_settings(pilot, samples: str = "2", tokens: str = "8") -> None:
    app = pilot.app
    await set_input(pilot, app.query_one("#run-samples"), samples)
    await set_input(pilot, app.query_one("#run-max_new_tokens"), tokens)


async def _tiny_memit(pilot, layers=(1, 2)) -> None:
    """MEMIT hyperparameters and layers that edit the tiny model, typed into the form."""
    app = pilot.app
    app.set_focus(None)
    await pilot.press("2")
    form = app.query_one(MethodForm)
    for key, value in TINY_MEMIT.items():
        await set_input(pilot, form.hparam_inputs()[key], value)
    app.query_one(LayerPicker).set_layers(list(layers))
    await pilot.pause()


async def _select_only(pilot, indices) -> None:
    picker = pilot.app.query_one(PromptPicker)
    picker.selected = set(indices)
    picker.refresh_list()
    await pilot.pause()


async def test_prompt_picker_filter_category_and_count(insult_model_dir, tmp_path):
    app = make_app(insult_model_dir, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        picker = app.query_one(PromptPicker)
        assert len(picker.items) == 7 and len(picker.selected) == 7
        assert "7 of 7 selected" in str(app.query_one("#prompt-count").render())
        # Each prompt shows its safe target.
        first = str(app.query_one("#prompt-list").get_option_at_index(0).prompt)
        assert "kind and hard working neighbours." in first

        # Filter as you type, then deselect the only visible prompt.
        await pilot.press("slash")
        await pilot.press(*"coworker")
        assert picker.visible_indices() == [1]
        await pilot.press("ctrl+n")
        assert 1 not in picker.selected and len(picker.selected) == 6
        assert "6 of 7 selected" in str(app.query_one("#prompt-count").render())

        # Clearing the filter keeps the selection; the category filter narrows the list.
        app.query_one("#prompt-filter").value = ""
        await pilot.pause()
        assert len(picker.visible_indices()) == 7 and len(picker.selected) == 6
        app.query_one("#prompt-category").value = "neutral"
        await pilot.pause()
        assert picker.visible_indices() == [6]
        app.query_one("#prompt-category").value = "__all__"
        app.query_one("#prompt-list").focus()
        await pilot.press("ctrl+a")
        assert len(picker.selected) == 7

        # Toggling in the list (space) deselects the highlighted prompt.
        app.query_one("#prompt-category").value = "neutral"
        await pilot.pause()
        await pilot.press("space")
        await pilot.pause()
        assert 6 not in picker.selected
        # "flagged" needs a baseline first: nothing changes.
        await pilot.press("f")
        assert len(picker.selected) == 6


async def test_layer_toggles_presets_and_ablation_list(insult_model_dir, tmp_path):
    app = make_app(insult_model_dir, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await pilot.press("2")
        layers = app.query_one(LayerPicker)
        toggles = app.query_one(LayerToggles)
        assert toggles.n_layers == app.workbench.lm.n_layers == 4
        assert toggles.has_focus
        default = list(layers.default_layers)
        assert layers.selected_layers == default and default  # the MEMIT preset's layers, scaled to 4 blocks

        # Keyboard: move to layer 3 and toggle it on, then layer 0.
        await pilot.press("right", "right", "right", "space")
        assert 3 in layers.selected_layers
        await pilot.press("right", "space")
        assert layers.selected_layers == sorted({*default, 0, 3})
        await pilot.press("space")
        assert 0 not in layers.selected_layers

        # Presets: the ablation list is the engine's depth-scaled default (the same as `ablate` without --configs).
        layers.apply_preset("default")
        assert layers.selected_layers == default
        assert layers.configs == default_ablation_configs(4) and len(layers.configs) > 1
        seeded = default_ablation_configs(4)
        layers.set_layers([2, 3])
        await pilot.press("plus")
        assert layers.configs == [*seeded, [2, 3]]
        assert layers.remove_config(0)
        assert layers.configs == [*seeded[1:], [2, 3]]


async def test_bad_hparam_is_refused(insult_model_dir, tmp_path):
    app = make_app(insult_model_dir, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await pilot.press("2")
        field = app.query_one(MethodForm).hparam_inputs()["v_num_grad_steps"]
        await set_input(pilot, field, "abc")
        assert field.has_class("-invalid")
        await pilot.press("escape")  # leave the field so "e" is a binding, not text
        app.set_focus(None)
        await pilot.press("e")
        await pilot.pause()
        assert app.running is None  # the run did not start
        assert field.has_focus  # the bad field is shown to the user
        assert any("v_num_grad_steps" in n.message for n in app._notifications)

        # A negative learning rate and an out-of-range layer are refused the same way.
        await set_input(pilot, field, "20")
        assert not field.has_class("-invalid")
        layer_field = app.query_one(MethodForm).hparam_inputs()["v_loss_layer"]
        await set_input(pilot, layer_field, "9")
        assert layer_field.has_class("-invalid")


async def test_baseline_then_edit_rows_appear_and_detail(insult_model_dir, tmp_path):
    app = make_app(insult_model_dir, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await _set_run_settings(pilot)
        await _select_only(pilot, [0, 1, 6])
        app.set_focus(None)
        await pilot.press("b")
        await wait_idle(pilot)
        table = app.query_one(ResultsTable)
        assert table.mode == "baseline" and table.row_count == 3
        means = {r["prompt"]: r["mean"] for r in table.rows_data}
        assert means["People from that town are all"] >= 0.5  # the tiny model insults
        assert "baseline" in str(app.query_one("#summary").render())

        # Flagged = baseline mean >= threshold; the neutral prompt is not flagged.
        await pilot.press("f")
        picker = app.query_one(PromptPicker)
        assert picker.selected == {i for i, m in picker.means.items() if m >= 0.1}
        assert 0 in picker.selected and 6 not in picker.selected

        await _select_only(pilot, [0, 1])
        await _tiny_memit(pilot)
        app.set_focus(None)
        await pilot.press("e")
        await wait_idle(pilot, 120)
        assert table.mode == "edit"
        rows = [r for r in table.rows_data if not r.get("pending")]
        assert [r["idx"] for r in sorted(rows, key=lambda r: r["idx"])] == [0, 1]
        assert all(r["config"] == "1,2" for r in rows)
        # Each row carries both sides of the comparison (whether MEMIT succeeds is the engine's tests' business).
        assert all(r["before"]["n"] == 2 and r["after"]["n"] == 2 for r in rows)
        assert all(len(r["generations_after"]) == 2 for r in rows)
        summary = str(app.query_one("#summary").render())
        # The strip shows the engine's verdict: share detoxified with its CI, Defense Success.
        assert "detoxified" in summary and "defense" in summary and "ppl" in summary
        assert f"{app.current_run['summary']['share_detoxified']:.0%}" in summary

        # Sorting from the keyboard: s opens the sort menu; "after [95% CI]" ascending, then descending.
        table.focus()
        for reverse in (False, True):
            await pilot.press("s")
            menu = app.screen
            assert isinstance(menu, SortMenu)
            target = menu.choices.index(("after", reverse))
            start = menu.query_one("#sort-options").highlighted or 0
            await pilot.press(
                *(["down"] * (target - start) if target >= start else ["up"] * (start - target))
            )
            await pilot.press("enter")
            await pilot.pause()
            afters = [r["after"]["mean"] for r in table.rows_data]
            assert afters == sorted(afters, reverse=reverse)
            direction = "descending" if reverse else "ascending"
            assert any(f"sorted by after [95% CI], {direction}" in str(n.message) for n in app._notifications)

        # The prompt detail shows the generations before and after.
        await pilot.press("d")
        assert isinstance(app.screen, PromptDetail)
        assert app.screen.query_one("#detail-after")
        await pilot.press("escape")
        assert not isinstance(app.screen, PromptDetail)


async def test_export_writes_file_and_asks_before_overwriting(insult_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_app(insult_model_dir, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await _set_run_settings(pilot, samples="2", tokens="5")
        await _select_only(pilot, [0, 6])
        app.set_focus(None)
        await pilot.press("b")
        await wait_idle(pilot)
        await pilot.press("x")
        assert isinstance(app.screen, ExportDialog)
        path_field = app.screen.query_one("#export-path")
        assert path_field.value.startswith(str(tmp_path)) and path_field.value.endswith(".csv")
        target = tmp_path / "out.json"
        app.screen.query_one("#export-format").value = "json"
        await pilot.pause()
        path_field.value = str(target)
        await pilot.press("enter")
        await pilot.pause()
        data = json.loads(target.read_text())
        assert [r["prompt"] for r in data["rows"]] == [
            "People from that town are all",
            "The weather today is",
        ]

        # Exporting to the same path again asks first; the file is untouched until confirmed.
        target.write_text("keep")
        await pilot.press("x")
        app.screen.query_one("#export-format").value = "json"
        await pilot.pause()
        app.screen.query_one("#export-path").value = str(target)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ExportDialog)
        assert "exists" in str(app.screen.query_one("#export-warning").render())
        assert target.read_text() == "keep"
        await pilot.press("enter")
        await pilot.pause()
        assert not isinstance(app.screen, ExportDialog)
        assert json.loads(target.read_text())["rows"]

        # Typing a .md path with the format left at csv switches the format: Markdown, never CSV, in a .md file.
        await pilot.press("x")
        assert str(app.screen.query_one("#export-format").value) == "csv"
        assert str(app.screen.query_one("#export-columns").value) == "default"
        app.screen.query_one("#export-path").value = str(tmp_path / "table.md")
        await pilot.pause()
        assert str(app.screen.query_one("#export-format").value) == "md"
        await pilot.press("enter")
        await pilot.pause()
        text = (tmp_path / "table.md").read_text()
        assert text.startswith("| prompt | n | mean toxicity [95% CI] | max | share ≥ 0.5 |")
        assert "Summary:" in text and "| EMT | " in text and "Definitions:" in text

        # A format that clashes with the extension is refused with a notification; nothing is written.
        await pilot.press("x")
        dialog = app.screen
        dialog.query_one("#export-path").value = str(tmp_path / "paper.tex")
        await pilot.pause()
        assert str(dialog.query_one("#export-format").value) == "tex"
        dialog.query_one("#export-format").value = "csv"  # the path follows: paper.csv
        await pilot.pause()
        assert dialog.query_one("#export-path").value == str(tmp_path / "paper.csv")
        dialog.dismiss(ExportRequest(str(tmp_path / "clash.md"), "csv"))
        await pilot.pause()
        assert not (tmp_path / "clash.md").exists()
        assert any("clashes" in str(n.message) for n in app._notifications)


@pytest.mark.parametrize("missing", ["no-such-model-dir"])
async def test_missing_model_is_reported_not_raised(tmp_path, missing):
    from detox_tui.app import DetoxApp

    app = DetoxApp(model=str(tmp_path / missing), scorer="profanity", device="cpu")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.load_error is not None, 60, "the load error")
        # Prompts are still browsable, and runs explain why they cannot start.
        await wait_for(pilot, lambda: bool(app.query_one(PromptPicker).items), 30, "the builtin prompts")
        app.set_focus(None)
        await pilot.press("b")
        assert app.running is None
        assert "failed to load" in str(app.query_one("#model-status").render())


async def test_a_pending_row_filled_in_place_widens_its_columns():
    # An edit's rows first show "running…"; when the result arrives the "after [95% CI]" cell must not be cut.
    from textual.app import App

    from detox_tui.widgets.results_table import fmt_ci

    class One(App):
        def compose(self):
            yield ResultsTable()

    before = {"idx": 0, "prompt": "p", "mean": 0.9, "ci_low": 0.85, "ci_high": 0.95, "samples": [0.9] * 5}
    after = {"mean": 0.19, "ci_low": 0.0, "ci_high": 0.61}
    edit = {"idx": 0, "prompt": "p", "config": "1,2", "before": before, "after": after, "reduction": 0.71}
    async with One().run_test(size=(160, 20)) as pilot:
        table = pilot.app.query_one(ResultsTable)
        table.start("edit")
        table.add_result("before", before)
        await pilot.pause()
        table.add_result("edit", edit)
        await pilot.pause()
        column = table.columns[next(k for k in table.columns if k.value == "after")]
        assert column.content_width >= fmt_ci(after).cell_len


async def test_alphaedit_is_chosen_in_the_form_and_edits_with_its_own_hyperparameters(
    insult_model_dir, tmp_path
):
    from textual.widgets import Select

    app = make_app(insult_model_dir, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await _set_run_settings(pilot)
        await _select_only(pilot, [0, 1])
        app.set_focus(None)
        await pilot.press("2")
        app.query_one("#method", Select).value = "alphaedit"
        await pilot.pause()
        form = app.query_one(MethodForm)
        fields = form.hparam_inputs()
        # AlphaEdit's own settings replace MEMIT's covariance weight.
        assert {"nullspace_threshold", "l2", "sequential_batch"} <= set(fields)
        assert "mom2_update_weight" not in fields
        for key, value in {"l2": "1", "clamp_norm_factor": "4", "n_templates": "2"}.items():
            await set_input(pilot, fields[key], value)
        app.query_one(LayerPicker).set_layers([1, 2])
        # RECT and the chat-template setting from the Settings dialog reach the run.
        app.settings = replace(app.settings, rect=50.0, chat_template="none")
        app.set_focus(None)
        await pilot.press("e")
        await wait_idle(pilot, 180)
        table = app.query_one(ResultsTable)
        rows = [r for r in table.rows_data if not r.get("pending")]
        assert table.mode == "edit" and sorted(r["idx"] for r in rows) == [0, 1]
        run = app.current_run
        assert run["kind"] == "edit" and run["summary"]["method"] == "alphaedit"
        assert (
            run["summary"]["hparams"]["nullspace_threshold"] == 0.02
            and run["summary"]["hparams"]["l2"] == 1.0
        )
        assert "detoxified" in str(app.query_one("#summary").render())
        stored = app.workbench.store.get_run(run["run_id"])["config"]
        assert stored["rect"] == 50.0 and stored["chat_template"] == "none"
