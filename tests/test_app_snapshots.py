"""Snapshot tests of the app's main screens at 80x24 and 120x40 (tiny insult model, profanity scorer)."""

from __future__ import annotations

import pytest

from detox_tui.pipeline.events import Finished, Progress, RowReady
from detox_tui.tiny import INSULT_PAIRS
from tests.app_harness import make_app, wait_loaded


def _edit_events() -> list:
    """A fixed stream of engine events for a two-prompt edit (sampling differs between trained tiny models,
    so the screen is fed recorded-style events through the app's real event path instead of a live run)."""
    events: list = [Progress("edit", 1, 2, "memit 1,2")]
    for idx, (prompt, insult, safe) in enumerate(INSULT_PAIRS[:2]):
        before = [1.0, 0.98, 1.0, 0.95]
        after = [0.02, 0.0, 0.4, 0.01] if idx == 0 else [0.9, 0.7, 1.0, 0.85]
        summary = lambda xs: {"n": len(xs), "mean": sum(xs) / len(xs), "ci_low": min(xs), "ci_high": max(xs)}  # noqa: E731
        events.append(
            RowReady(
                "edit",
                {
                    "idx": idx,
                    "prompt": prompt,
                    "category": "insult",
                    "target": safe,
                    "heldout": False,
                    "config": "1,2",
                    "before": summary(before),
                    "after": summary(after),
                    "delta": summary(after)["mean"] - summary(before)["mean"],
                    "reduced": True,
                    "collapsed": False,
                    "samples_before": before,
                    "samples_after": after,
                    "generations_before": [insult] * 4,
                    "generations_after": [safe] * 4,
                },
            )
        )
    events.append(
        RowReady("side_effects", {"config": "1,2", "ppl_before": 1.13, "ppl_after": 1.19, "collapsed": False})
    )
    events.append(Finished("fixed-run", {}))
    return events


def _prepare(tab: str | None = None, edit_rows: bool = False):
    async def run_before(pilot) -> None:
        app = pilot.app
        await wait_loaded(pilot)
        if edit_rows:
            app.query_one("ResultsTable").start("edit")
            for event in _edit_events():
                app.handle_event(event)
            app.query_one("SummaryStrip").show(
                "edit",
                {
                    "share_reduced": 1.0,
                    "mean_reduction": 0.39,
                    "ci_low": 0.1,
                    "ci_high": 0.68,
                    "wilcoxon_p": 0.5,
                    "ppl_before": 1.13,
                    "ppl_after": 1.19,
                    "collapsed": False,
                },
            )
        if tab:
            app.action_show_tab(tab)
        app.clear_notifications()  # toasts name the run id, which changes every run
        await pilot.pause()

    return run_before


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_prompts_screen(snap_compare, insult_model_dir, tmp_path, size):
    assert snap_compare(make_app(insult_model_dir, tmp_path), terminal_size=size, run_before=_prepare())


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_layers_and_method_screen(snap_compare, insult_model_dir, tmp_path, size):
    app = make_app(insult_model_dir, tmp_path)
    assert snap_compare(app, terminal_size=size, run_before=_prepare("setup"))


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_results_of_an_edit(snap_compare, insult_model_dir, tmp_path, size):
    app = make_app(insult_model_dir, tmp_path)
    assert snap_compare(app, terminal_size=size, run_before=_prepare("results", edit_rows=True))
