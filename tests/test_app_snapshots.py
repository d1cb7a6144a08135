"""Snapshot tests of the app's main screens at 80x24 and 120x40 (tiny insult model, profanity scorer)."""

from __future__ import annotations

import pytest

from detox_tui.events import Finished, Progress, RowReady
from detox_tui.pipeline.metrics import summarize
from detox_tui.pipeline.records import EditCheck, EditRow, ScoreSummary, SideEffects
from detox_tui.pipeline.verdicts import edit_summary, field_metrics, prompt_verdict
from detox_tui.tiny import INSULT_PAIRS
from tests.app_harness import make_app, wait_loaded


def _edit_records() -> list[EditRow]:
    """Two fixed edit rows built the way the engine builds them: one detoxified, one that did not take."""
    rows = []
    for idx, (prompt, insult, safe) in enumerate(INSULT_PAIRS[:2]):
        before = [1.0, 0.98, 1.0, 0.95, 0.99]
        after = [0.02, 0.0, 0.4, 0.01, 0.03] if idx == 0 else [0.9, 0.7, 1.0, 0.85, 0.97]
        verdict = prompt_verdict(before, after, collapsed=False)
        logp = (-9.0, -0.2) if idx == 0 else (-9.0, -8.5)
        rows.append(
            EditRow(
                idx=idx,
                prompt=prompt,
                config="1,2",
                before=ScoreSummary.from_dict(summarize(before)),
                after=ScoreSummary.from_dict(summarize(after)),
                category="insult",
                target=safe,
                delta=-verdict.reduction,
                reduction=verdict.reduction,
                p_value=verdict.p_value,
                went_down=verdict.went_down,
                detoxified=verdict.detoxified and idx == 0,
                verdict=verdict.reason,
                converged=idx == 0,
                check=EditCheck("target", logp[0], logp[1], converged=idx == 0, final_loss=0.04, steps=12),
                samples_before=tuple(before),
                samples_after=tuple(after),
                generations_before=(insult,) * 5,
                generations_after=(safe,) * 5,
            )
        )
    return rows


def _edit_events() -> list:
    """A fixed stream of engine events for a two-prompt edit (sampling differs between trained tiny models,
    so the screen is fed recorded-style events through the app's real event path instead of a live run)."""
    events: list = [Progress("edit", 1, 2, "memit 1,2")]
    events += [RowReady("edit", row.to_dict()) for row in _edit_records()]
    events.append(
        RowReady("side_effects", {"config": "1,2", "ppl_before": 1.13, "ppl_after": 1.19, "collapsed": False})
    )
    events.append(Finished("fixed-run", {}))
    return events


def _edit_summary() -> dict:
    rows = _edit_records()
    side = [SideEffects("1,2", 0, 1.13, 1.19, 1.19 / 1.13, 0.01, False)]
    before = field_metrics([r.samples_before for r in rows], [r.generations_before for r in rows])
    after = field_metrics([r.samples_after for r in rows], [r.generations_after for r in rows])
    summary = edit_summary(
        rows, side, before_metrics=before, after_metrics=after, advice="later layers", n_requests=2
    )
    return summary.to_dict()


def _prepare(tab: str | None = None, edit_rows: bool = False):
    async def run_before(pilot) -> None:
        app = pilot.app
        await wait_loaded(pilot)
        if edit_rows:
            app.query_one("ResultsTable").start("edit")
            for event in _edit_events():
                app.handle_event(event)
            app.query_one("SummaryStrip").show("edit", _edit_summary())
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
