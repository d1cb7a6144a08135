"""Pilot tests of the Sweeps tab: a sweep that another process writes row by row is shown and followed live, enter
on an experiment opens its edit run, a sweep opened from the Runs tab stays chosen, and the Ablation tab draws the
finished experiments' bars (tiny insult model, offline profanity scorer)."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import pytest

from detox_tui.config import (
    ExperimentConfig,
    GenerationConfig,
    ModelConfig,
    Paths,
    ScoringConfig,
    SideEffectConfig,
)
from detox_tui.pipeline.store import RunStore
from detox_tui.widgets.ablation_chart import AblationChart
from detox_tui.widgets.help_screen import HelpScreen
from detox_tui.widgets.results_table import ResultsTable
from detox_tui.widgets.runs_browser import RunsBrowser
from detox_tui.widgets.sweeps_view import SweepsView
from tests.app_harness import make_app, wait_for, wait_loaded

pytestmark = pytest.mark.anyio

MEMIT = {"mom2_update_weight": 100.0, "clamp_norm_factor": 4.0, "n_templates": 2}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def child_store(insult_model_dir, tmp_path_factory) -> dict[str, Any]:
    """A run store holding one real MEMIT edit run on the tiny model (made once: an edit takes half a minute on a
    busy CPU), with the AblationRow of its summary, as a sweep driver would record the experiment."""
    from detox_tui.pipeline.experiment import Workbench, run_edit
    from detox_tui.pipeline.records import AblationRow
    from detox_tui.prompts.base import PromptItem
    from detox_tui.tiny import INSULT_PAIRS

    home = tmp_path_factory.mktemp("sweep-child-home")
    cfg = ExperimentConfig(
        model=ModelConfig(name=str(insult_model_dir), device="cpu", dtype="float32"),
        generation=GenerationConfig(samples=2, max_new_tokens=4, seed=0, batch_size=8, greedy=True),
        scoring=ScoringConfig(scorer="profanity"),
        side_effects=SideEffectConfig(max_tokens=128),
    )
    wb = Workbench.load(cfg, data_dir=str(home))
    cfg.method, cfg.layers, cfg.protocol, cfg.hparams = "memit", [1, 2], "per-prompt", MEMIT
    prompt, _insult, safe = INSULT_PAIRS[0]
    result = run_edit(wb, [PromptItem(prompt, target=" " + safe.split()[0], category="insult")], cfg)
    return {
        "path": wb.store.path,
        "run_id": result.run_id,
        # Every field of the AblationRow but its layers and key: a sweep row has its own (the key is the label).
        "metrics": {
            k: v
            for k, v in AblationRow.of([1, 2], result.summary_record).to_dict().items()
            if k not in ("layers", "key")
        },
    }


def _store_with_child(child_store: dict[str, Any]) -> RunStore:
    """This test's run store (its DETOX_TUI_HOME, where the app looks) with a copy of the child edit run."""
    path = Paths.resolve(None).store_path
    path.parent.mkdir(parents=True, exist_ok=True)
    src, dst = sqlite3.connect(child_store["path"]), sqlite3.connect(path)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
    return RunStore(path)


def _experiment(i: int, label: str, layers: list[int] | None, **state: Any) -> dict[str, Any]:
    row = {
        "id": f"e{i:03d}",
        "label": label,
        "key": label,
        "model": "tiny/insult-gpt2",
        "method": "memit",
        "layers": layers,
        "hparams": {"v_lr": 0.5},
        "state": "pending",
        "worker": None,
        "attempts": 0,
        "started": None,
        "elapsed_s": None,
        "run_id": None,
        "error": None,
    }
    row.update(state)
    return row


def _sweep(store: RunStore, rows: list[dict[str, Any]], backend: str = "local") -> str:
    """A running sweep as the sweep driver writes it: the expanded grid in its config, one row per experiment."""
    config = {
        "experiments": [
            {k: r[k] for k in ("id", "label", "model", "method", "layers", "hparams")} for r in rows
        ],
        "backend": backend,
    }
    run_id = store.create_run("sweep", config, model="tiny/insult-gpt2")
    for row in rows:
        store.add_row(run_id, "sweep", row["id"], row)
    return run_id


def _cells(view: SweepsView, key: str) -> dict[str, str]:
    return {str(col.value): str(cell) for col, cell in zip(view.columns, view.get_row(key))}


def _notes(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def test_a_headless_sweep_is_shown_followed_and_its_experiments_open(
    insult_model_dir, child_store, tmp_path
):
    other = _store_with_child(child_store)  # the headless `detox-tui sweep` writing the same file
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    metrics = child_store["metrics"]
    rows = [
        _experiment(
            0,
            "memit L1,2",
            [1, 2],
            state="finished",
            worker="local",
            attempts=1,
            started=now,
            elapsed_s=12.5,
            run_id=child_store["run_id"],
            **metrics,
        ),
        _experiment(
            1, "memit L2 [bold]x[/bold]", [2], state="running", worker="ray:1", attempts=1, started=now
        ),
        _experiment(2, "memit L3", [3]),
        _experiment(3, "memit L0", [0], state="failed", attempts=2, error="[red]CUDA out of memory\x1b[0m"),
    ]
    sweep_id = _sweep(other, rows, backend="ray")

    app = make_app(insult_model_dir, tmp_path)
    app.STORE_POLL = 0.2
    async with app.run_test(size=(160, 40)) as pilot:
        await wait_loaded(pilot)
        view = app.query_one(SweepsView)
        # Nothing chosen: the Sweeps tab shows the newest sweep in the store.
        await wait_for(pilot, lambda: view.run_id == sweep_id and view.row_count == 4, 20, "the sweep")
        await pilot.press("7")
        assert app.query_one("TabbedContent").active == "sweeps"
        assert app.focused is view
        first = _cells(view, "e000")
        assert first["label"] == "memit L1,2" and first["state"] == "finished" and first["worker"] == "local"
        assert first["elapsed"] == "12.5s" and first["layers"] == "1,2"
        assert first["result"].startswith(f"{metrics['share_detoxified']:.0%} [")
        assert first["after"] == f"{metrics['after_mean']:.3f}"
        # Labels and errors from the store are plain text: markup shows as typed, escapes are made visible.
        assert _cells(view, "e001")["label"] == "memit L2 [bold]x[/bold]"
        assert _cells(view, "e001")["state"] == "running" and _cells(view, "e001")["worker"] == "ray:1"
        assert _cells(view, "e002")["state"] == "pending" and _cells(view, "e002")["result"] == ""
        failed = _cells(view, "e003")
        assert failed["state"] == "failed" and failed["attempts"] == "2"
        assert failed["error"] == "[red]CUDA out of memory\\x1b[0m"
        summary = str(app.query_one("#sweep-summary").render())
        assert f"sweep {sweep_id} running" in summary and "1/4 finished, 1 running, 1 failed" in summary

        # The Ablation tab draws the finished experiments' bars, keyed by their labels.
        chart = app.query_one(AblationChart)
        assert list(chart.rows_by_key) == ["memit L1,2"]

        # The headless driver finishes e001: the row changes state in place (the row count does not change).
        done = dict(rows[1], state="finished", elapsed_s=3725.0, **{**metrics, "share_detoxified": 1.0})
        done["key"] = done["label"]
        other.add_row(sweep_id, "sweep", "e001", done)
        await wait_for(pilot, lambda: _cells(view, "e001")["state"] == "finished", 10, "e001 to finish")
        assert _cells(view, "e001")["elapsed"] == "1h02m"
        assert _cells(view, "e001")["result"].startswith("100% [")
        assert "2/4 finished" in str(app.query_one("#sweep-summary").render())
        assert "best 100% detoxified: memit L2 [bold]x[/bold]" in str(
            app.query_one("#sweep-summary").render()
        )
        await wait_for(pilot, lambda: len(chart.rows_by_key) == 2, 10, "the second bar")

        other.set_status(
            sweep_id,
            "finished",
            summary={
                "n_experiments": 4,
                "n_finished": 2,
                "n_failed": 1,
                "best": done["label"],
                "best_share_detoxified": 1.0,
            },
        )
        await wait_for(pilot, lambda: app.sweep["status"] == "finished", 10, "the sweep to finish")
        assert any(sweep_id in n and "finished" in n for n in _notes(app))

        # Enter on an experiment without a run says why nothing opens; on one with a run, it opens that run.
        view.move_cursor(row=view.get_row_index("e002"))
        await pilot.press("enter")
        assert any("memit L3 is pending and has no run yet" in n for n in _notes(app))
        view.move_cursor(row=view.get_row_index("e000"))
        await pilot.press("enter")
        await wait_for(
            pilot,
            lambda: app.views.get("results", {}).get("run_id") == child_store["run_id"],
            10,
            "the child run",
        )
        assert app.query_one("TabbedContent").active == "results"
        assert app.query_one(ResultsTable).row_count == 1


async def test_a_sweep_opened_from_the_runs_tab_stays_chosen_and_fills_the_ablation_bars(
    insult_model_dir, child_store, tmp_path
):
    other = _store_with_child(child_store)
    metrics = child_store["metrics"]
    older = _sweep(other, [_experiment(0, "older L1", [1], state="finished", elapsed_s=2.0, **metrics)])
    newer = _sweep(other, [_experiment(0, "newer L2", [2], state="running", worker="local")])
    other.set_status(older, "finished")

    app = make_app(insult_model_dir, tmp_path)
    app.STORE_POLL = 0.2
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_loaded(pilot)
        view = app.query_one(SweepsView)
        await wait_for(pilot, lambda: view.run_id == newer, 20, "the newest sweep")
        # The newest sweep has nothing finished: no bars; the Ablation tab held nothing, so it is the sweep's now.
        assert app.query_one(AblationChart).rows_by_key == {}

        await pilot.press("6")
        browser = app.query_one(RunsBrowser)
        await wait_for(pilot, lambda: any(r["id"] == older for r in browser.runs), 10, "the runs list")
        browser.move_cursor(row=[r["id"] for r in browser.runs].index(older))
        await pilot.press("enter")
        await wait_for(pilot, lambda: view.run_id == older, 10, "the older sweep to open")
        assert app.query_one("TabbedContent").active == "sweeps"
        assert _cells(view, "e000")["label"] == "older L1"
        assert list(app.query_one(AblationChart).rows_by_key) == ["older L1"]

        # A sweep started later does not take the place of the one the user opened.
        newest = _sweep(other, [_experiment(0, "newest L3", [3])])
        await wait_for(
            pilot, lambda: any(r["id"] == newest for r in browser.runs), 10, "the new sweep listed"
        )
        await pilot.pause(0.5)
        assert view.run_id == older and app.sweep["id"] == older and app.sweep["chosen"]

        # The help screen lists the Sweeps tab's own keys.
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        title, keys = app.screen.sections[0]
        assert title == "Sweeps tab" and ("⏎", "Open the experiment's run") in keys, keys
        await pilot.press("escape")

        # x on the Sweeps tab exports the sweep's table under its run id.
        kind, exported = app._export_rows()
        assert kind == "sweep" and [r["label"] for r in exported] == ["older L1"]
        assert app.views["sweeps"]["run_id"] == older
