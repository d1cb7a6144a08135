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


def _ablation_rows() -> list[dict]:
    """Two fixed ablation rows in the engine's AblationRow shape."""
    return [
        {
            "key": "1",
            "layers": [1],
            "share_detoxified": 0.5,
            "share_detoxified_ci_low": 0.1,
            "share_detoxified_ci_high": 0.9,
            "defense_success": 0.5,
            "n_not_converged": 1,
            "mean_reduction": 0.41,
            "ci_low": 0.02,
            "ci_high": 0.8,
            "wilcoxon_p": 0.031,
            "ppl_before": 1.13,
            "ppl_after": 1.2,
            "collapsed": False,
        },
        {
            "key": "1,2",
            "layers": [1, 2],
            "share_detoxified": 1.0,
            "share_detoxified_ci_low": 0.34,
            "share_detoxified_ci_high": 1.0,
            "defense_success": 1.0,
            "n_not_converged": 0,
            "mean_reduction": 0.93,
            "ci_low": 0.9,
            "ci_high": 0.96,
            "wilcoxon_p": 0.031,
            "ppl_before": 1.13,
            "ppl_after": 1.19,
            "collapsed": False,
        },
    ]


def _trace():
    import numpy as np

    from detox_tui.backends.tracing import TraceResult

    tokens = ["People", " from", " that", " town", " are", " all"]
    scores = np.array([[0.05 * (t + 1) * (4 - abs(layer - 2)) / 4 for t in range(6)] for layer in range(4)])
    return TraceResult(tokens, 4, scores, 0.97, 0.01, " stupid idiots", "mlp", 3, 0.46)


def _runs() -> list[dict]:
    base = {"model": "tiny-insult", "created": "2026-11-23 12:00:00", "note": "", "error": None}
    return [
        {
            **base,
            "id": "20261123-120300-c3c3",
            "kind": "edit",
            "status": "running",
            "n_prompts": 6,
            "n_rows": 2,
            "summary": {},
        },
        {
            **base,
            "id": "20261123-120200-b2b2",
            "kind": "trace",
            "status": "finished",
            "n_prompts": 1,
            "n_rows": 4,
            "summary": {"p_clean": 0.97},
        },
        {
            **base,
            "id": "20261123-120100-a1a1",
            "kind": "edit",
            "status": "finished",
            "n_prompts": 6,
            "n_rows": 6,
            "summary": {"share_detoxified": 1.0},
        },
        {
            **base,
            "id": "20261123-120000-a0a0",
            "kind": "baseline",
            "status": "cancelled",
            "n_prompts": 7,
            "n_rows": 3,
            "summary": {},
        },
    ]


def _prepare(tab: str | None = None, edit_rows: bool = False, extra=None):
    async def run_before(pilot) -> None:
        app = pilot.app
        await wait_loaded(pilot)
        # A stopped clock: the status bar's times never differ between runs.
        bar = app.query_one("StatusBar")
        bar.clock = lambda: 0.0
        bar.job_started()
        bar.job_ended("loaded")
        if extra is not None:
            extra(app)
        if edit_rows:
            app.query_one("ResultsTable").start("edit")
            app._apply(_edit_events())
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


def _fixed_app(insult_model_dir, tmp_path):
    app = make_app(insult_model_dir, tmp_path)
    app.STORE_POLL = 3600  # the runs list is fed fixed runs (real ones carry the time in their ids)
    return app


def _fill_ablation(app) -> None:
    from detox_tui.events import RowReady

    app._apply([RowReady("ablation", row) for row in _ablation_rows()])


def _fill_trace(app) -> None:
    app._show_trace(_trace())


def _fill_runs(app) -> None:
    app.query_one("RunsBrowser").set_runs(_runs())


def _fill_log(app) -> None:
    log = app.query_one("RunLog")
    log.clear()
    log.timestamps = False
    log.log_message("loaded tiny-insult: 4 layers, d_model 64, on cpu")
    log.log_message("edit run 20261123-120100-a1a1 started")
    log.log_message("1 of 6 edits did not take: prompt 3; try later layers", "warning")
    log.log_message("The scorer 'detoxify' did not load: no network.", "error")


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize(
    "tab,fill",
    [("ablation", _fill_ablation), ("trace", _fill_trace), ("runs", _fill_runs), ("log", _fill_log)],
    ids=["ablation", "trace", "runs", "log"],
)
def test_every_other_tab(snap_compare, insult_model_dir, tmp_path, size, tab, fill):
    app = _fixed_app(insult_model_dir, tmp_path)
    assert snap_compare(app, terminal_size=size, run_before=_prepare(tab, extra=fill))


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_help_on_the_results_tab(snap_compare, insult_model_dir, tmp_path, size):
    async def run_before(pilot) -> None:
        await _prepare("results", edit_rows=True)(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(_fixed_app(insult_model_dir, tmp_path), terminal_size=size, run_before=run_before)
