"""Pilot tests of what the app shows while and after jobs run: the live strip, cancel, help, settings, traces
as runs, and runs written by another process (tiny insult model, offline profanity scorer)."""

from __future__ import annotations

import json

import pytest

from detox_tui.app import DetoxApp
from detox_tui.backends.models import weights_fingerprint
from detox_tui.pipeline.store import RunStore
from detox_tui.prompts.base import PromptItem
from detox_tui.widgets.confirm_dialog import ConfirmDialog
from detox_tui.widgets.export_dialog import ExportDialog, ExportRequest
from detox_tui.widgets.help_screen import HelpScreen
from detox_tui.widgets.method_form import MethodForm
from detox_tui.widgets.results_table import ResultsTable
from detox_tui.widgets.runs_browser import RunsBrowser
from detox_tui.widgets.settings_dialog import SettingsDialog
from tests.app_harness import (
    TINY_MEMIT,
    make_app,
    set_input,
    wait_for,
    wait_idle,
    wait_loaded,
    write_insult_prompts,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _strip(app) -> str:
    return str(app.query_one("#summary").render())


def _notes(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def _slow_memit(pilot) -> None:
    """MEMIT settings whose z optimisation cannot finish early, so keys always land while the edit runs."""
    app = pilot.app
    app.set_focus(None)
    await pilot.press("2")
    form = app.query_one(MethodForm)
    for key, value in {**TINY_MEMIT, "v_lr": "0.000001", "v_num_grad_steps": "100000"}.items():
        await set_input(pilot, form.hparam_inputs()[key], value)
    app.query_one("LayerPicker").set_layers([1, 2])
    await set_input(pilot, app.query_one("#run-samples"), "5")
    await set_input(pilot, app.query_one("#run-max_new_tokens"), "6")
    app.set_focus(None)
    await pilot.pause()


async def test_cancel_asks_first_and_the_strip_says_cancelled_not_the_last_runs_numbers(
    insult_model_dir, tmp_path
):
    app = make_app(insult_model_dir, tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_loaded(pilot)
        original = weights_fingerprint(app.workbench.lm.model)
        await set_input(pilot, app.query_one("#run-samples"), "2")
        await set_input(pilot, app.query_one("#run-max_new_tokens"), "4")
        app.set_focus(None)
        await pilot.press("b")
        await wait_idle(pilot)
        baseline_strip = _strip(app)
        assert "baseline" in baseline_strip and "mean" in baseline_strip

        await _slow_memit(pilot)
        await pilot.press("e")
        assert app.running == "edit"
        # The moment the edit starts, nothing of the baseline stays on screen.
        await pilot.pause()
        assert "edit running" in _strip(app) and "mean" not in _strip(app)
        table = app.query_one(ResultsTable)
        await wait_for(pilot, lambda: table.row_count > 0, 60, "the first before row")

        # Escape never cancels; ctrl+x asks, and "keep running" keeps it running.
        await pilot.press("escape")
        await pilot.pause(0.3)
        assert app.running == "edit" and not isinstance(app.screen, ConfirmDialog)
        await pilot.press("ctrl+x")
        assert isinstance(app.screen, ConfirmDialog)
        # The job's progress keeps arriving under the dialog (the widgets are on the screen below it).
        stage = str(app._q("#stage").render())
        await wait_for(
            pilot, lambda: str(app._q("#stage").render()) != stage, 30, "progress under the dialog"
        )
        assert isinstance(app.screen, ConfirmDialog)
        await pilot.press("n")
        await pilot.pause(0.3)
        assert app.running == "edit" and not app.cancel_event.is_set()

        await pilot.press("ctrl+x")
        await pilot.press("y")
        await wait_idle(pilot)
        strip = _strip(app)
        run = app.workbench.store.list_runs()[0]
        assert run["kind"] == "edit" and run["status"] == "cancelled"
        assert "edit cancelled" in strip and run["id"] in strip
        assert "detoxified" not in strip and "mean" not in strip  # no numbers of any run
        assert weights_fingerprint(app.workbench.lm.model) == original
        # Rows that never got an "after" no longer say they are running.
        assert "running" not in " ".join(str(c) for row in table._data.values() for c in row.values())


async def test_help_lists_the_tabs_keys_and_the_global_ones(insult_model_dir, tmp_path):
    app = make_app(insult_model_dir, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_loaded(pilot)
        await pilot.press("3")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = " ".join(f"{k} {d}" for _title, rows in app.screen.sections for k, d in rows)
        assert "Sort" in text  # the results table's key
        for description in ("Baseline", "Edit", "Cancel", "Settings", "Export"):
            assert description in text
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")

        # The footer shows the essentials at 80 columns, and a click on a key runs it.
        footer = app.query_one("AppFooter")
        line = str(footer.render())
        for shown in ("s Sort", "b Baseline", "e Edit", "^x Cancel", "? Help", "palette"):
            assert shown in line, line
        start = next(start for start, _end, key in footer.spans if key == "question_mark")
        await pilot.click("AppFooter", offset=(start, 0))
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")

        # Every app key is also a palette command, whose title names the key.
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for binding in app.BINDINGS:
            if binding.action in ("quit", "leave_field"):
                continue
            shown = app.get_key_display(binding)
            assert any(shown in t.rsplit("(", 1)[-1].rstrip(")").split(", ") for t in titles), binding


async def test_a_scorer_that_fails_leaves_traces_usable_and_can_be_changed_in_settings(
    insult_model_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    prompts = write_insult_prompts(tmp_path / "prompts.jsonl")
    app = DetoxApp(
        model=str(insult_model_dir),
        prompts=str(prompts),
        scorer="hf:" + str(tmp_path / "no-such-classifier"),
        device="cpu",
        dtype="float32",
    )
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.workbench is not None or app.load_error, 90, "the model")
        assert app.load_error is None and app.workbench.scorer is None
        await wait_for(pilot, lambda: bool(app.query_one("PromptPicker").items), 30, "the prompts")
        assert any("scorer" in n and "did not load" in n for n in _notes(app))
        assert "no scorer" in str(app.query_one("#model-status").render())

        # A baseline explains; nothing runs and no run is stored.
        app.set_focus(None)
        await pilot.press("b")
        assert app.running is None
        assert app.workbench.store.list_runs() == []

        # A trace needs no scorer: it runs, is stored as a run and exports under its run id.
        await pilot.press("t")
        assert app.query_one("#tabs").active == "trace"
        assert app.query_one("#trace-prompt").value  # prefilled from the highlighted prompt
        await set_input(pilot, app.query_one("#trace-cont"), " stupid idiots")
        await pilot.press("enter")
        await wait_idle(pilot)
        runs = app.workbench.store.list_runs()
        assert [r["kind"] for r in runs] == ["trace"] and runs[0]["status"] == "finished"
        await pilot.press("escape")  # leave the continuation field (escape never cancels anything)
        await pilot.press("x")
        assert isinstance(app.screen, ExportDialog)
        assert runs[0]["id"] in app.screen.query_one("#export-path").value
        app.screen.dismiss(ExportRequest(str(tmp_path / "trace.json"), "json"))
        await pilot.pause()
        data = json.loads((tmp_path / "trace.json").read_text())
        assert data["meta"]["run_id"] == runs[0]["id"] and data["meta"]["kind"] == "trace"
        assert [r["layer"] for r in data["rows"]] == list(range(app.workbench.lm.n_layers))

        # Settings: choose the profanity scorer; then a baseline runs.
        await pilot.press("comma")
        assert isinstance(app.screen, SettingsDialog)
        await set_input(pilot, app.screen.query_one("#settings-scorer"), "profanity")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.workbench.scorer is not None, 60, "the new scorer")
        assert "profanity" in str(app.query_one("#model-status").render())
        await set_input(pilot, app.query_one("#run-samples"), "2")
        await set_input(pilot, app.query_one("#run-max_new_tokens"), "4")
        app.set_focus(None)
        await pilot.press("b")
        await wait_idle(pilot)
        newest = app.workbench.store.list_runs()[0]
        assert newest["kind"] == "baseline" and newest["status"] == "finished", _notes(app)


async def test_a_run_written_by_another_process_appears_and_fills_in(insult_model_dir, tmp_path):
    app = make_app(insult_model_dir, tmp_path)
    app.STORE_POLL = 0.2
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_loaded(pilot)
        # Another process (a headless `detox-tui baseline`) writes the same store file.
        other = RunStore(app.workbench.store.path)
        items = [PromptItem(prompt=f"prompt {i}") for i in range(3)]
        run_id = other.create_run("baseline", {"scoring": {"threshold": 0.1}}, model="elsewhere")
        other.add_prompts(run_id, items)
        browser = app.query_one(RunsBrowser)
        await wait_for(pilot, lambda: any(r["id"] == run_id for r in browser.runs), 10, "the new run")

        await pilot.press("6")
        browser.move_cursor(row=[r["id"] for r in browser.runs].index(run_id))
        await pilot.press("enter")
        table = app.query_one(ResultsTable)
        await wait_for(pilot, lambda: app.followed is not None, 10, "the run to open")
        assert table.row_count == 0 and "running" in _strip(app)

        for i in range(3):
            row = {
                "idx": i,
                "prompt": f"prompt {i}",
                "mean": 0.5 + i / 10,
                "ci_low": 0.4,
                "ci_high": 0.9,
                "max": 0.9,
                "share_above": 1.0,
                "samples": [0.5, 0.6],
                "generations": ["a", "b"],
            }
            other.add_row(run_id, "baseline", str(i), row)
            await wait_for(pilot, lambda n=i + 1: table.row_count == n, 10, f"row {i + 1}")
        assert "3/3 prompts measured" in _strip(app)

        summary = {
            "n_prompts": 3,
            "mean": 0.6,
            "ci_low": 0.4,
            "ci_high": 0.8,
            "threshold": 0.1,
            "share_prompts_above": 1.0,
        }
        other.set_status(run_id, "finished", summary=summary)
        await wait_for(pilot, lambda: app.followed is None, 10, "the run to finish")
        assert "mean 0.600" in _strip(app)
        assert any(run_id in n and "finished" in n for n in _notes(app))


async def test_the_status_bar_times_a_job_and_rings_when_it_ends(insult_model_dir, tmp_path):
    app = make_app(insult_model_dir, tmp_path)
    rings = []
    app.bell = lambda: rings.append(1)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_loaded(pilot)
        await set_input(pilot, app.query_one("#run-samples"), "2")
        await set_input(pilot, app.query_one("#run-max_new_tokens"), "4")
        app.set_focus(None)
        await pilot.press("b")
        await wait_idle(pilot)
        assert rings == [1]
        timing = str(app.query_one("#timing").render())
        assert "finished" in timing or "s" in timing


async def test_quitting_while_an_edit_runs_asks_then_cancels_it_cleanly(insult_model_dir, tmp_path):
    import time

    app = make_app(insult_model_dir, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_loaded(pilot)
        await _slow_memit(pilot)
        await pilot.press("e")
        table = app.query_one(ResultsTable)
        await wait_for(pilot, lambda: table.row_count > 0, 60, "the first before row")
        store = app.workbench.store
        await pilot.press("q")
        assert isinstance(app.screen, ConfirmDialog)  # quitting would cancel the edit: it asks
        await pilot.press("y")
        await pilot.pause(0.5)  # engine events and timers keep arriving while the app closes
    # The app closed without an error (run_test re-raises one); the worker stops at its next step and the
    # run is stored as cancelled.
    deadline = time.monotonic() + 60
    while store.list_runs()[0]["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.list_runs()[0]["status"] == "cancelled"


async def test_after_an_ablation_its_rows_export_under_its_run_id(insult_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_app(insult_model_dir, tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_loaded(pilot)
        await set_input(pilot, app.query_one("#run-samples"), "2")
        await set_input(pilot, app.query_one("#run-max_new_tokens"), "4")
        picker = app.query_one("PromptPicker")
        picker.selected = {0}
        picker.refresh_list()
        form = app.query_one(MethodForm)
        for key, value in TINY_MEMIT.items():
            await set_input(pilot, form.hparam_inputs()[key], value)
        app.query_one("LayerPicker").set_configs([[1, 2]])
        app.set_focus(None)
        await pilot.press("a")
        await wait_idle(pilot, 120)
        run = app.workbench.store.list_runs()[0]
        assert run["kind"] == "ablation" and run["status"] == "finished"
        # Both views of the ablation, the per-prompt table and the per-configuration chart, are that run.
        for tab in ("3", "4"):
            await pilot.press(tab, "x")
            assert isinstance(app.screen, ExportDialog), _notes(app)
            assert run["id"] in app.screen.query_one("#export-path").value
            await pilot.press("escape")


async def test_a_model_reload_from_settings_keeps_the_users_layers(insult_model_dir, tmp_path):
    app = make_app(insult_model_dir, tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_loaded(pilot)
        picker = app.query_one("LayerPicker")
        picker.set_layers([0, 3])
        old = app.workbench
        app.set_focus(None)
        await pilot.press("comma")
        assert isinstance(app.screen, SettingsDialog)
        app.screen.query_one("#settings-dtype").value = "auto"  # float32 -> auto: the model reloads
        await pilot.pause()
        await pilot.press("ctrl+s")
        await wait_for(
            pilot, lambda: app.workbench is not None and app.workbench is not old, 90, "the reload"
        )
        assert app.settings.dtype == "auto"
        assert picker.selected_layers == [0, 3]
