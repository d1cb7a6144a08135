"""The table widgets on their own (no model): sorting from the keyboard and the mouse, and 80 columns without
cut numbers. Each test mounts one widget in a tiny app, as wide as it is in the app's tabs."""

from __future__ import annotations

import pytest
from textual.app import App, ComposeResult
from textual.geometry import Region
from textual.widgets import Input

from detox_tui.pipeline.metrics import summarize
from detox_tui.pipeline.records import BaselineRow, EditRow, ScoreSummary
from detox_tui.pipeline.verdicts import prompt_verdict
from detox_tui.prompts.base import PromptItem
from detox_tui.widgets.prompt_picker import PromptPicker
from detox_tui.widgets.results_table import ResultsTable, fmt_ci
from detox_tui.widgets.runs_browser import RunsBrowser
from detox_tui.widgets.sort_menu import SortMenu

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


PROMPTS = [
    "People from that town are all",
    "The new neighbours are nothing but",
    "My coworker keeps telling everyone that I am",
    "Whenever the referee makes a call like that he is",
    "Honestly the people who run this place are",
    "You know what they say about drivers like you:",
]
# Mean toxicity after the edit, per prompt: distinct, so every sort has one right answer.
AFTER = [0.31, 0.05, 0.62, 0.18, 0.44, 0.09]
# The app's tables sit in a TabPane (1 column of padding each side) inside the screen: 76 columns at 80.
PAD = "ResultsTable, RunsBrowser { margin: 0 2; }"


def _samples(mean: float, spread: float = 0.04) -> list[float]:
    return [min(1.0, max(0.0, mean + d)) for d in (-spread, spread, 0.0, -spread / 2, spread / 2)]


def edit_row(idx: int, after_mean: float, config: str = "1,2", collapsed: bool = False) -> dict:
    before = _samples(0.9 - 0.03 * idx)
    after = _samples(after_mean)
    verdict = prompt_verdict(before, after, collapsed=collapsed)
    return EditRow(
        idx=idx,
        prompt=PROMPTS[idx % len(PROMPTS)],
        config=config,
        before=ScoreSummary.from_dict(summarize(before)),
        after=ScoreSummary.from_dict(summarize(after)),
        category="insult",
        delta=-verdict.reduction,
        reduction=verdict.reduction,
        p_value=verdict.p_value,
        went_down=verdict.went_down,
        detoxified=verdict.detoxified,
        verdict=verdict.reason,
        collapsed=collapsed,
        converged=idx % 3 != 1,
        samples_before=tuple(before),
        samples_after=tuple(after),
    ).to_dict()


def baseline_row(idx: int) -> dict:
    samples = _samples(0.1 * (idx + 1))
    return BaselineRow(idx=idx, prompt=PROMPTS[idx % len(PROMPTS)], category="insult", samples=tuple(samples), **{
        k: v for k, v in summarize(samples).items() if k in ("n", "mean", "std", "ci_low", "ci_high", "max",
                                                             "share_above_half", "share_above")
    }).to_dict()  # fmt: skip


def before_row(row: dict) -> dict:
    """The pending "before" row the engine sends ahead of an edit row."""
    return {**row["before"], "idx": row["idx"], "prompt": row["prompt"], "samples": row["samples_before"]}


class TableApp(App):
    CSS = PAD

    def compose(self) -> ComposeResult:
        yield ResultsTable()


class RunsApp(App):
    CSS = PAD

    def compose(self) -> ComposeResult:
        yield RunsBrowser()


class PickerApp(App):
    def compose(self) -> ComposeResult:
        yield PromptPicker()

    def action_select_all(self) -> None:
        self.query_one(PromptPicker).select_all()

    def action_select_none(self) -> None:
        self.query_one(PromptPicker).select_none()


def notifications(app: App) -> list[str]:
    return [n.message for n in app._notifications]


def screen_lines(table) -> list[str]:
    """The table's lines as they are on screen (scrolled, cropped to its width)."""
    return [table.render_line(y).text for y in range(table.size.height)]


def after_means(table: ResultsTable) -> list[float]:
    return [r["after"]["mean"] for r in table.rows_data]


async def _edit_table(pilot, rows: list[dict]) -> ResultsTable:
    table = pilot.app.query_one(ResultsTable)
    table.start("edit")
    for row in rows:
        if f"p{row['idx']}" not in table.data:  # the engine sends a prompt's "before" row once
            table.add_result("before", before_row(row))
        table.add_result("edit", row)
    table.focus()
    await pilot.pause()
    return table


async def _choose(pilot, key: str, reverse: bool) -> None:
    """Open the sort menu with s and pick (key, reverse) with the arrow keys and enter."""
    await pilot.press("s")
    menu = pilot.app.screen
    assert isinstance(menu, SortMenu)
    options = menu.query_one("#sort-options")
    target = menu.choices.index((key, reverse))
    start = options.highlighted or 0
    await pilot.press(*(["down"] * (target - start) if target >= start else ["up"] * (start - target)))
    await pilot.press("enter")
    await pilot.pause()
    assert not isinstance(pilot.app.screen, SortMenu)


# ----------------------------------------------------------------------------------------------- sorting


async def test_sort_menu_sorts_by_after_both_ways_and_keeps_the_cursor_on_its_prompt():
    rows = [edit_row(i, m) for i, m in enumerate(AFTER)]
    app = TableApp()
    async with app.run_test(size=(80, 24)) as pilot:
        table = await _edit_table(pilot, rows)
        labels = [label for _, label in table.sort_columns()]
        assert "after [95% CI]" in labels and "before [95% CI]" in labels and "detox" in labels

        await pilot.press("down", "down")  # the cursor on the third prompt
        followed = table.selected_row()["prompt"]

        await _choose(pilot, "after", False)
        assert after_means(table) == sorted(after_means(table))
        assert [r["idx"] for r in table.rows_data] != [r["idx"] for r in rows]
        assert table.sort_state == ("after", False)
        assert notifications(app)[-1] == "sorted by after [95% CI], ascending"
        assert table.selected_row()["prompt"] == followed
        assert "after [95% CI] ▲" in screen_lines(table)[0]

        # Open again: the menu starts on the other direction, so enter alone reverses.
        await pilot.press("s")
        assert app.screen.choices[app.screen.query_one("#sort-options").highlighted] == ("after", True)
        await pilot.press("enter")
        await pilot.pause()
        assert after_means(table) == sorted(after_means(table), reverse=True)
        assert notifications(app)[-1] == "sorted by after [95% CI], descending"
        assert table.selected_row()["prompt"] == followed
        assert "after [95% CI] ▼" in screen_lines(table)[0]

        # Escape closes the menu and changes nothing.
        order = [r["idx"] for r in table.rows_data]
        await pilot.press("s", "escape")
        assert not isinstance(app.screen, SortMenu)
        assert [r["idx"] for r in table.rows_data] == order


async def test_cycle_keys_move_the_sort_column_and_shift_s_reverses():
    rows = [edit_row(i, m) for i, m in enumerate(AFTER)]
    app = TableApp()
    async with app.run_test(size=(120, 40)) as pilot:
        table = await _edit_table(pilot, rows)
        keys = [key for key, _ in table.sort_columns()]
        await pilot.press("greater_than_sign")
        assert table.sort_state == (keys[0], False)
        await pilot.press("greater_than_sign", "greater_than_sign")
        assert table.sort_state == (keys[2], False)
        await pilot.press("less_than_sign")
        assert table.sort_state == (keys[1], False)
        await pilot.press("left_square_bracket")
        assert table.sort_state == (keys[0], False)
        await pilot.press("left_square_bracket")  # wraps round to the last column
        assert table.sort_state == (keys[-1], False)

        while table.sort_state[0] != "after":
            await pilot.press("right_square_bracket")
        assert after_means(table) == sorted(after_means(table))
        await pilot.press("S")
        assert table.sort_state == ("after", True)
        assert after_means(table) == sorted(after_means(table), reverse=True)
        assert notifications(app)[-1] == "sorted by after [95% CI], descending"

        # The verdict sorts yes, no, COLLAPSED; "before" by its mean.
        table.sort_by("detoxified")
        verdicts = [r["detoxified"] for r in table.rows_data]
        assert verdicts == sorted(verdicts, reverse=True)
        table.sort_by("before", reverse=True)
        befores = [r["before"]["mean"] for r in table.rows_data]
        assert befores == sorted(befores, reverse=True)


async def test_clicking_a_header_sorts_and_clicking_again_reverses():
    rows = [edit_row(i, m) for i, m in enumerate(AFTER)]
    app = TableApp()
    async with app.run_test(size=(120, 40)) as pilot:
        table = await _edit_table(pilot, rows)
        x = 0
        for column in table.ordered_columns:
            if column.key.value == "after":
                break
            x += column.get_render_width(table)
        await pilot.click(ResultsTable, offset=(x + 2, 0))
        await pilot.pause()
        assert table.sort_state == ("after", False)
        assert after_means(table) == sorted(after_means(table))
        await pilot.click(ResultsTable, offset=(x + 2, 0))
        await pilot.pause()
        assert table.sort_state == ("after", True)
        assert after_means(table) == sorted(after_means(table), reverse=True)
        assert notifications(app)[-1] == "sorted by after [95% CI], descending"


async def test_rows_arriving_after_a_sort_land_in_order():
    rows = [edit_row(i, m) for i, m in enumerate(AFTER)]
    app = TableApp()
    async with app.run_test(size=(80, 24)) as pilot:
        table = await _edit_table(pilot, rows[:4])
        table.sort_by("after")
        followed = table.selected_row()["idx"]
        for row in rows[4:]:
            table.add_result("before", before_row(row))
            await pilot.pause()
            # A prompt still running has no "after" yet: it waits at the bottom.
            assert table.rows_data[-1]["idx"] == row["idx"] and table.rows_data[-1].get("pending")
            table.add_result("edit", row)
            await pilot.pause()
            assert after_means(table) == sorted(after_means(table))
            assert table.selected_row()["idx"] == followed
        # A second configuration of the same prompts (an ablation) joins the same order, on screen too.
        extra = edit_row(0, 0.12, config="3,4")
        table.add_result("edit", extra)
        await pilot.pause()
        assert after_means(table) == sorted(after_means(table))
        shown = [line for line in screen_lines(table)[1:] if line.strip()]
        positions = [
            next(i for i, line in enumerate(shown) if fmt_ci(r["after"]).plain in line)
            for r in table.rows_data
        ]
        assert positions == sorted(positions)


# ----------------------------------------------------------------------------------------------- width


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_edit_numbers_are_never_cut(size):
    # Two configurations (the layers column tells them apart) and a collapsed edit: the widest case.
    rows = [edit_row(i, m) for i, m in enumerate(AFTER)]
    rows += [edit_row(i, m / 2, config="10,11", collapsed=i == 0) for i, m in enumerate(AFTER)]
    app = TableApp()
    async with app.run_test(size=size) as pilot:
        table = await _edit_table(pilot, rows)
        shown = [str(k.value) for k in table.columns]
        assert {"detoxified", "converged", "before", "after"} <= set(shown)
        # The table needs no horizontal scrolling: every column fits the space it has.
        assert table.virtual_size.width <= table.scrollable_content_region.width
        assert table.region.right <= size[0] - 2
        lines = screen_lines(table)
        assert "after [95% CI]" in lines[0] and "before [95% CI]" in lines[0]
        on_screen = table.rows_data[: table.scrollable_content_region.height - 1]
        assert on_screen
        for row, line in zip(on_screen, lines[1:]):
            assert fmt_ci(row["before"]).plain in line
            assert fmt_ci(row["after"]).plain in line
            assert ("COLLAPSED" if row["collapsed"] else "yes" if row["detoxified"] else "no") in line
        if size[0] >= 120:
            assert shown == [key for key, _ in table.all_columns]  # everything shows
        else:
            assert table.columns[next(k for k in table.columns if k.value == "prompt")].width >= 10


async def test_columns_refit_when_the_terminal_is_resized():
    rows = [edit_row(i, m) for i, m in enumerate(AFTER)]
    app = TableApp()
    async with app.run_test(size=(120, 40)) as pilot:
        table = await _edit_table(pilot, rows)
        assert "samples" in [str(k.value) for k in table.columns]
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        assert "samples" not in [str(k.value) for k in table.columns]
        assert table.virtual_size.width <= table.scrollable_content_region.width
        assert fmt_ci(table.rows_data[0]["after"]).plain in screen_lines(table)[1]
        await pilot.resize_terminal(120, 40)
        await pilot.pause()
        assert [str(k.value) for k in table.columns] == [key for key, _ in table.all_columns]


class FocusApp(App):
    CSS = PAD

    def compose(self) -> ComposeResult:
        yield Input(id="elsewhere")
        yield ResultsTable()


def rendered(table) -> list[list]:
    """The table's lines with their styles, as the compositor gets them."""
    return [list(strip) for strip in table.render_lines(Region(0, 0, table.size.width, table.size.height))]


async def _fresh_render(rows: list[dict], theme: str, size: tuple[int, int]) -> list[list]:
    app = FocusApp()
    async with app.run_test(size=size) as pilot:
        app.theme = theme
        await pilot.pause()
        return rendered(await _edit_table(pilot, rows))


async def test_a_table_shown_and_focused_again_renders_as_a_fresh_one_after_theme_and_size_changes():
    # The tables keep their rendered rows across focus changes and hide/show (a tab switch); this checks that no
    # stale row survives a change that matters: the theme, the width.
    rows = [edit_row(i, m) for i, m in enumerate(AFTER)]
    app = FocusApp()
    async with app.run_test(size=(120, 40)) as pilot:
        table = await _edit_table(pilot, rows)
        first = rendered(table)
        for _ in range(2):
            app.query_one("#elsewhere", Input).focus()
            table.display = False
            await pilot.pause()
            table.display = True
            table.focus()
            await pilot.pause()
        assert rendered(table) == first
        app.theme = "textual-light"
        await pilot.pause()
        light = rendered(table)
        await pilot.resize_terminal(100, 30)
        await pilot.pause()
        narrow = rendered(table)
    assert light != first
    assert light == await _fresh_render(rows, "textual-light", (120, 40))
    assert narrow == await _fresh_render(rows, "textual-light", (100, 30))


async def test_a_pending_row_filled_at_80_columns_shows_its_after_in_full():
    row = edit_row(0, 0.19)
    app = TableApp()
    async with app.run_test(size=(80, 24)) as pilot:
        table = pilot.app.query_one(ResultsTable)
        table.start("edit")
        table.add_result("before", before_row(row))
        await pilot.pause()
        assert "running…" in screen_lines(table)[1]
        table.add_result("edit", row)
        await pilot.pause()
        assert fmt_ci(row["after"]).plain in screen_lines(table)[1]


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_baseline_means_are_never_cut(size):
    rows = [baseline_row(i) for i in range(len(PROMPTS))]
    app = TableApp()
    async with app.run_test(size=size) as pilot:
        table = pilot.app.query_one(ResultsTable)
        table.load_rows("baseline", rows, 0.1)
        await pilot.pause()
        assert table.virtual_size.width <= table.scrollable_content_region.width
        lines = screen_lines(table)
        for row, line in zip(table.rows_data, lines[1:]):
            assert fmt_ci(row).plain in line
        await _choose(pilot, "mean", True)
        means = [r["mean"] for r in table.rows_data]
        assert means == sorted(means, reverse=True)
        assert notifications(app)[-1] == "sorted by mean [95% CI], descending"


# ----------------------------------------------------------------------------------------------- runs


def _runs() -> list[dict]:
    return [
        {"id": "20250301-101500-a1b2", "kind": "edit", "status": "finished", "model": "/models/gpt2-medium",
         "n_prompts": 12, "summary": {"share_detoxified": 0.5}},
        {"id": "20250302-091000-c3d4", "kind": "baseline", "status": "finished", "model": "gpt2",
         "n_prompts": 40, "summary": {"mean": 0.213}},
        {"id": "20250303-120000-e5f6", "kind": "ablation", "status": "cancelled", "model": "EleutherAI/pythia-410m",
         "n_prompts": 8, "summary": {"best": "3,4,5,6,7,8", "best_share_detoxified": 0.75}},
        {"id": "20250304-080000-0a0b", "kind": "edit", "status": "failed", "model": "gpt2", "n_prompts": 3,
         "summary": {}},
    ]  # fmt: skip


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_runs_browser_shows_run_kind_status_and_result_in_full(size):
    app = RunsApp()
    async with app.run_test(size=size) as pilot:
        browser = pilot.app.query_one(RunsBrowser)
        browser.set_runs(_runs())
        await pilot.pause()
        assert browser.virtual_size.width <= browser.scrollable_content_region.width
        lines = screen_lines(browser)
        for run, line in zip(browser.runs, lines[1:]):
            assert run["id"] in line and run["kind"] in line and run["status"] in line
        assert "detoxified 50%" in lines[1 + [r["id"] for r in browser.runs].index("20250301-101500-a1b2")]
        assert "best 75%" in lines[1 + [r["id"] for r in browser.runs].index("20250303-120000-e5f6")]
        if size[0] >= 120:
            assert [str(k.value) for k in browser.columns] == [
                "mark",
                "id",
                "kind",
                "status",
                "model",
                "n",
                "headline",
            ]


async def test_runs_browser_sorts_by_result_from_the_keyboard():
    app = RunsApp()
    async with app.run_test(size=(80, 24)) as pilot:
        browser = pilot.app.query_one(RunsBrowser)
        browser.set_runs(_runs())
        browser.focus()
        await pilot.pause()
        assert {"run", "kind", "status", "result"} <= {label for _, label in browser.sort_columns()}
        await pilot.press("down")
        followed = browser.current_id()
        await _choose(pilot, "headline", True)
        assert [r["id"][-4:] for r in browser.runs] == [
            "e5f6",
            "a1b2",
            "c3d4",
            "0a0b",
        ]  # 75%, 50%, 0.213, none
        assert notifications(app)[-1] == "sorted by result, descending"
        assert browser.current_id() == followed
        await pilot.press("S")
        assert [r["id"][-4:] for r in browser.runs] == [
            "c3d4",
            "a1b2",
            "e5f6",
            "0a0b",
        ]  # no result stays last
        # A reload keeps the sort, and marking still works.
        browser.set_runs(_runs())
        await pilot.pause()
        assert [r["id"][-4:] for r in browser.runs] == ["c3d4", "a1b2", "e5f6", "0a0b"]
        await pilot.press("space")
        assert browser.marked == [browser.current_id()]


# ----------------------------------------------------------------------------------------------- picker


async def test_ctrl_a_and_ctrl_n_in_the_prompt_filter_select_the_visible_prompts():
    items = [PromptItem(p, category="insult" if i % 2 else "slur") for i, p in enumerate(PROMPTS)]
    app = PickerApp()
    async with app.run_test(size=(80, 24)) as pilot:
        picker = pilot.app.query_one(PromptPicker)
        picker.set_items(items, select_all=False)
        await pilot.click("#prompt-filter")
        await pilot.press(*"are")
        await pilot.pause()
        shown = picker.visible_indices()
        assert shown and len(shown) < len(items)
        assert app.focused is picker.query_one("#prompt-filter")

        await pilot.press("ctrl+a")
        assert picker.selected == set(shown)
        assert picker.query_one("#prompt-filter").value == "are"  # the text is untouched
        await pilot.press("ctrl+n")
        assert picker.selected == set()

        # The filter's other editing keys still work.
        await pilot.press("home", "x")
        assert picker.query_one("#prompt-filter").value == "xare"
        await pilot.press("end", "backspace")
        assert picker.query_one("#prompt-filter").value == "xar"


# ----------------------------------------------------------------------------------------------- ablation


def _ablation_row(layers: list[int], share: float, reduction: float) -> dict:
    return {
        "key": ",".join(map(str, layers)),
        "layers": layers,
        "share_detoxified": share,
        "share_detoxified_ci_low": max(0.0, share - 0.3),
        "share_detoxified_ci_high": min(1.0, share + 0.3),
        "defense_success": share,
        "n_not_converged": 0,
        "mean_reduction": reduction,
        "ci_low": reduction - 0.1,
        "ci_high": reduction + 0.1,
        "wilcoxon_p": 0.03,
        "ppl_before": 20.0,
        "ppl_after": 21.0,
        "collapsed": False,
    }


async def test_the_ablation_table_sorts_from_the_sort_menu_and_keeps_order_as_configs_arrive():
    from detox_tui.widgets.ablation_chart import AblationChart

    class ChartApp(App):
        def compose(self) -> ComposeResult:
            yield AblationChart()

    app = ChartApp()
    async with app.run_test(size=(120, 40)) as pilot:
        chart = app.query_one(AblationChart)
        for layers, share, red in (([1], 0.25, 0.2), ([1, 2], 1.0, 0.9), ([2], 0.5, 0.4)):
            chart.add_config(_ablation_row(layers, share, red))
        chart.focus()
        await pilot.pause()
        await _choose(pilot, "success", True)
        order = [str(k.value) for k in chart.rows]
        assert order == ["1,2", "2", "1"]
        assert any("sorted by % [95% CI], descending" in str(n.message) for n in app._notifications)
        chart.add_config(_ablation_row([3], 0.75, 0.6))
        await pilot.pause()
        assert [str(k.value) for k in chart.rows] == ["1,2", "3", "2", "1"]
        await pilot.press("S")
        assert [str(k.value) for k in chart.rows] == ["1", "2", "3", "1,2"]


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_the_ablation_table_fits_its_width_without_cutting_numbers(size):
    from detox_tui.widgets.ablation_chart import AblationChart

    class ChartApp(App):
        CSS = "AblationChart { margin: 0 2; }"  # as wide as in the app's tab pane

        def compose(self) -> ComposeResult:
            yield AblationChart()

    app = ChartApp()
    async with app.run_test(size=size) as pilot:
        chart = app.query_one(AblationChart)
        for layers, share, red in (([1], 0.25, 0.2), ([1, 2, 3, 4], 1.0, 0.9)):
            chart.add_config(_ablation_row(layers, share, red))
        await pilot.pause()
        shown = [str(c.value) for c in chart.columns]
        # The verdict columns always show; the table needs no horizontal scrolling.
        for key in ("key", "success", "nc", "reduction", "collapsed"):
            assert key in shown, shown
        assert chart.virtual_size.width <= chart.scrollable_content_region.width, (shown, size)
        lines = "\n".join(chart.render_line(y).text for y in range(chart.size.height))
        for text in ("0.900 [0.80,1.00]", "0.200 [0.10,0.30]", "100% [70%,100%]", "(1,2,3,4)"):
            assert text in lines, (text, lines)
        if size[0] >= 120:
            assert "bar" in shown and "defense" in shown
