"""The app's dialogs (help, confirm, settings) and its status bar, each in a tiny App; no model is loaded."""

from __future__ import annotations

from dataclasses import replace

import pytest
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.geometry import Region
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Button, Input, Label, Select

from detox_tui.config import EVAL_PROTOCOLS
from detox_tui.widgets.confirm_dialog import ConfirmDialog
from detox_tui.widgets.help_screen import HelpScreen, binding_rows
from detox_tui.widgets.settings_dialog import DTYPES, Settings, SettingsDialog, settings_changes
from detox_tui.widgets.status_bar import GIB, StatusBar

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


SIZES = [(80, 24), (120, 40)]
SCORERS = ["detoxify", "detoxify:original", "detoxify:unbiased", "detoxify:multilingual", "profanity"]
CURRENT = Settings("detoxify", "auto", "auto", 1.0, 0.9, 0, None)


class Host(App):
    """Pushes one modal screen and records what it was dismissed with."""

    def __init__(self, make_screen) -> None:
        super().__init__()
        self.make_screen = make_screen
        self.results: list = []

    def on_mount(self) -> None:
        self.push_screen(self.make_screen(), self.results.append)


def shown(widget: Widget) -> str:
    """The text a widget renders at its current size, lines joined with newlines."""
    width, height = widget.region.size
    return "\n".join(strip.text for strip in widget.render_lines(Region(0, 0, width, height)))


def inside(widget: Widget, screen: Screen) -> bool:
    return screen.region.contains_region(widget.region)


async def type_into(pilot, field: Input, value: str) -> None:
    """Replace an Input's text by typing, as a user would."""
    field.focus()
    await pilot.pause()
    await pilot.press("end", *["backspace"] * len(field.value), *list(value))
    assert field.value == value


# ------------------------------------------------------------------------------------------------ help


HELP = [
    ("Results tab", [("s", "Sort menu"), ("enter", "Open the prompt's detail"), ("[bold]x[/]", "[red]y[/]")]),
    ("Everywhere", [(f"k{i}", f"action number {i}") for i in range(30)]),
]


@pytest.mark.parametrize("size", SIZES)
async def test_help_shows_every_key_in_a_box_that_fits(size):
    app = Host(lambda: HelpScreen(HELP))
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, HelpScreen)
        text = "\n".join(shown(w) for w in screen.query(".help-section-title, .help-table"))
        for title, rows in HELP:
            assert title in text
            for key, description in rows:
                assert key in text and description in text  # markup-looking keys shown literally
        box = screen.query_one("#help-box")
        assert inside(box, screen)
        # 33 rows do not fit in 24 lines: the box scrolls instead of running off the screen.
        if size == (80, 24):
            assert box.max_scroll_y > 0


@pytest.mark.parametrize("key", ["escape", "question_mark", "q", "f1"])
async def test_help_closes(key):
    app = Host(lambda: HelpScreen(HELP))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press(key)
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)
        assert app.results == [None]


def test_binding_rows_shows_keys_as_the_app_does_and_skips_repeats():
    app = App()
    bindings = [
        Binding("ctrl+x", "cancel", "Cancel"),
        Binding("slash", "focus_filter", "Filter"),
        Binding("b", "baseline", ""),
        Binding("b", "other", "Something else"),  # b is already listed
        ("q", "quit", "Quit"),  # tuples as written in BINDINGS
    ]
    rows = binding_rows(app, bindings)
    assert rows == [
        (app.get_key_display(bindings[0]), "Cancel"),
        (app.get_key_display(bindings[1]), "Filter"),
        (app.get_key_display(bindings[2]), "baseline"),
        ("q", "Quit"),
    ]
    assert rows[0][0] != "ctrl+x" and rows[1][0] != "slash"  # displayed, not raw key names


# ---------------------------------------------------------------------------------------------- confirm


def cancel_dialog() -> ConfirmDialog:
    return ConfirmDialog(
        "Cancel the running edit?",
        "The original weights are restored and the run is stored as cancelled.",
        yes="Cancel run",
        no="Keep running",
    )


@pytest.mark.parametrize(("keys", "answer"), [(["escape"], False), (["y"], True), (["n"], False)])
async def test_confirm_keys(keys, answer):
    app = Host(cancel_dialog)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press(*keys)
        await pilot.pause()
        assert app.results == [answer]


@pytest.mark.parametrize("size", SIZES)
async def test_confirm_focuses_the_safe_answer(size):
    app = Host(cancel_dialog)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        focused = app.focused
        assert isinstance(focused, Button) and "Keep running" in str(focused.label)
        assert inside(app.screen.query_one("#confirm-box"), app.screen)
        await pilot.press("enter")
        await pilot.pause()
        assert app.results == [False]


async def test_confirm_yes_button():
    app = Host(cancel_dialog)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.click("#confirm-yes")
        await pilot.pause()
        assert app.results == [True]


async def test_confirm_shows_markup_literally():
    app = Host(lambda: ConfirmDialog("Delete [bold]x[/]?", "prompt: [red]y[/]\x1b", yes="[b]go[/b]"))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert "Delete [bold]x[/]?" in shown(screen.query_one("#confirm-question"))
        detail = shown(screen.query_one("#confirm-detail"))
        assert "prompt: [red]y[/]" in detail and "\\x1b" in detail  # the control character made visible
        assert "[b]go[/b]" in shown(screen.query_one("#confirm-yes"))


# --------------------------------------------------------------------------------------------- settings


def settings_app(current: Settings = CURRENT) -> Host:
    return Host(lambda: SettingsDialog(current, SCORERS))


@pytest.mark.parametrize("size", SIZES)
async def test_settings_refuses_an_invalid_top_p_and_says_why(size):
    app = settings_app()
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        screen = app.screen
        assert inside(screen.query_one("#settings-box"), screen)
        await type_into(pilot, screen.query_one("#settings-top_p", Input), "1.5")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.results == [] and app.screen is screen
        error = screen.query_one("#settings-top_p-error", Label)
        assert error.display and "top-p" in shown(error) and "at most 1" in shown(error)
        await type_into(pilot, screen.query_one("#settings-top_p", Input), "0.8")
        await pilot.pause()
        assert not error.display
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.results == [replace(CURRENT, top_p=0.8)]


async def test_settings_returns_what_was_typed():
    app = settings_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        await type_into(pilot, screen.query_one("#settings-scorer", Input), "hf:unitary/toxic-bert#toxic")
        await type_into(pilot, screen.query_one("#settings-device", Input), "cuda:1")
        await type_into(pilot, screen.query_one("#settings-temperature", Input), "0.7")
        await type_into(pilot, screen.query_one("#settings-top_k", Input), "40")
        screen.query_one("#settings-dtype", Select).value = "bfloat16"
        await pilot.pause()
        await pilot.click("#settings-save")
        await pilot.pause()
        assert app.results == [
            Settings("hf:unitary/toxic-bert#toxic", "cuda:1", "bfloat16", 0.7, 0.9, 40, None)
        ]


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("device", "gpu", "auto, cpu, mps, cuda or cuda:N"),
        ("scorer", "hf:", "hf:<model id or path>"),
        ("scorer", "perspective", "Unknown scorer"),
        ("temperature", "0", "above 0"),
        ("top_k", "-3", "0 or more"),
        ("rect", "150", "at most 100"),
    ],
)
async def test_settings_invalid_fields(field, value, says):
    app = settings_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        await type_into(pilot, screen.query_one(f"#settings-{field}", Input), value)
        await pilot.click("#settings-save")
        await pilot.pause()
        assert app.results == []
        error = screen.query_one(f"#settings-{field}-error", Label)
        assert error.display and says in str(error.render())
        await pilot.press("escape")
        await pilot.pause()
        assert app.results == [None]


async def test_settings_scorer_suggests_the_registry_names():
    app = settings_app(Settings("", "auto", "auto", 1.0, 0.9, 0, None))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        field = app.screen.query_one("#settings-scorer", Input)
        await type_into(pilot, field, "prof")
        await pilot.press("right")  # accept the suggestion
        await pilot.pause()
        assert field.value == "profanity"


async def test_settings_protocol_fixes_the_sampling():
    rtp = EVAL_PROTOCOLS["rtp"]["generation"]
    app = settings_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        await type_into(pilot, screen.query_one("#settings-temperature", Input), "0.7")
        screen.query_one("#settings-protocol", Select).value = "rtp"
        await pilot.pause()
        fields = {n: screen.query_one(f"#settings-{n}", Input) for n in ("temperature", "top_p", "top_k")}
        assert all(f.disabled for f in fields.values())
        assert float(fields["temperature"].value) == rtp["temperature"]
        assert float(fields["top_p"].value) == rtp["top_p"]
        note = str(screen.query_one("#settings-protocol-note", Label).render())
        assert (
            note.startswith("rtp fixes")
            and f"{rtp['samples']} samples x {rtp['max_new_tokens']} tokens" in note
        )
        # Back to custom: the values typed come back, editable.
        screen.query_one("#settings-protocol", Select).value = "custom"
        await pilot.pause()
        assert fields["temperature"].value == "0.7" and not fields["temperature"].disabled
        screen.query_one("#settings-protocol", Select).value = "rtp"
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
    (saved,) = app.results
    assert saved.eval_protocol == "rtp"
    assert (saved.temperature, saved.top_p, saved.top_k) == (rtp["temperature"], rtp["top_p"], rtp["top_k"])


async def test_settings_opened_on_a_protocol_keeps_it():
    current = Settings("detoxify", "cpu", "float32", 1.0, 0.9, 0, "rtp")
    app = settings_app(current)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert app.screen.query_one("#settings-top_p", Input).disabled
        await pilot.press("ctrl+s")
        await pilot.pause()
    assert app.results == [current]


async def test_settings_chat_template_and_rect_reach_the_settings():
    app = settings_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        screen.query_one("#settings-chat", Select).value = "none"
        await type_into(pilot, screen.query_one("#settings-rect", Input), "20")
        await pilot.press("ctrl+s")
        await pilot.pause()
    assert app.results == [replace(CURRENT, chat_template="none", rect=20.0)]
    assert settings_changes(CURRENT, app.results[0]) == {"runs"}


def test_settings_changes():
    assert settings_changes(CURRENT, CURRENT) == set()
    changed = Settings("profanity", "cpu", "auto", 1.0, 0.9, 0, None)
    assert settings_changes(CURRENT, changed) == {"model", "scorer"}
    assert settings_changes(CURRENT, Settings("detoxify", "auto", "float16", 1.0, 0.9, 0, None)) == {"model"}
    assert settings_changes(CURRENT, Settings("detoxify", "auto", "auto", 0.7, 0.9, 0, None)) == {"sampling"}
    assert settings_changes(CURRENT, Settings("detoxify", "auto", "auto", 1.0, 0.9, 0, "rtp")) == {"sampling"}


def test_settings_dtypes_are_the_ones_the_model_loader_accepts():
    from detox_tui.backends.models import _DTYPES

    assert set(DTYPES) == {"auto", *_DTYPES}


# ------------------------------------------------------------------------------------------- status bar


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class BarApp(App):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()

    def compose(self) -> ComposeResult:
        yield StatusBar("gpt2-medium ready", clock=self.clock)


def timing(bar: StatusBar) -> str:
    return str(bar.query_one("#timing", Label).render())


async def test_status_bar_eta_per_stage():
    app = BarApp()
    async with app.run_test(size=(120, 40)) as pilot:
        bar = app.query_one(StatusBar)
        bar.job_started()
        bar.stage("generate before", 0, 10)
        assert "ETA" not in timing(bar)  # nothing done yet
        app.clock.now += 4
        bar.stage("generate before", 2, 10)
        await pilot.pause()
        assert timing(bar) == "elapsed 4s ETA 16s"
        assert "generate before 2/10" in shown(bar.query_one("#stage"))
        # Between progress events the ETA counts down and the elapsed time goes on.
        app.clock.now += 5
        bar.update_timing()
        assert timing(bar) == "elapsed 9s ETA 11s"
        # A new stage has its own clock: 2 s for its first of 3 steps -> 4 s left, not generate's rate.
        bar.stage("score before", 0, 3)
        assert "ETA" not in timing(bar)
        app.clock.now += 2
        bar.stage("score before", 1, 3)
        assert timing(bar) == "elapsed 11s ETA 4s"
        # The label may change within a stage; stage_key keeps its clock.
        app.clock.now += 2
        bar.stage("score before (batch 2)", 2, 3, stage_key="score before")
        assert timing(bar) == "elapsed 13s ETA 2s"
        bar.stage("load model", 0, 1)
        app.clock.now += 1
        bar.stage("load model", 1, 1)
        assert timing(bar) == "elapsed 14s"  # one-step stages have no ETA


async def test_status_bar_job_end_stops_the_clock():
    app = BarApp()
    async with app.run_test(size=(120, 40)):
        bar = app.query_one(StatusBar)
        bar.job_started()
        app.clock.now += 64
        bar.stage("edit", 1, 4)
        bar.job_ended("cancelled")
        assert "cancelled" in timing(bar) and "1m04s" in timing(bar) and "ETA" not in timing(bar)
        app.clock.now += 30
        bar.update_timing()
        assert "1m04s" in timing(bar)
        # The next job starts from zero.
        bar.job_started()
        app.clock.now += 3
        bar.update_timing()
        assert timing(bar) == "elapsed 3s"


async def test_status_bar_refreshes_elapsed_every_second():
    app = BarApp()
    async with app.run_test(size=(120, 40)) as pilot:
        bar = app.query_one(StatusBar)
        bar.job_started()
        app.clock.now += 5
        await pilot.pause(1.2)
        assert timing(bar) == "elapsed 5s"


@pytest.mark.parametrize("width", [80, 120])
async def test_status_bar_memory(width):
    app = BarApp()
    async with app.run_test(size=(width, 24)) as pilot:
        bar = app.query_one(StatusBar)
        memory = bar.query_one("#memory", Label)
        assert not memory.display
        bar.set_memory({"allocated": 3.2 * GIB, "peak": 5.1 * GIB, "total": 79.6 * GIB, "utilisation": 87})
        await pilot.pause()
        text = shown(memory)
        assert memory.display and "GPU 3.2/79.6" in text and "87%" in text
        if width >= 120:
            assert text.rstrip() == "GPU 3.2/79.6 GiB peak 5.1 util 87%"
        bar.set_memory({"allocated": 1 * GIB, "peak": 2 * GIB, "total": 16 * GIB, "utilisation": None})
        await pilot.pause()
        assert "1.0/16.0" in shown(memory) and "%" not in shown(memory)
        bar.set_memory(None)
        await pilot.pause()
        assert not memory.display


async def test_status_bar_fits_80_columns_truncating_the_stage_not_the_timing():
    app = BarApp()
    async with app.run_test(size=(80, 24)) as pilot:
        bar = app.query_one(StatusBar)
        bar.set_model("gpt2-medium on cuda:0, float16, ready")
        bar.set_memory({"allocated": 3.2 * GIB, "peak": 5.1 * GIB, "total": 79.6 * GIB, "utilisation": 87})
        bar.job_started()
        bar.stage("generate before (greedy plus 25 samples of 20 tokens per prompt)", 0, 1000)
        app.clock.now += 64
        bar.stage("generate before (greedy plus 25 samples of 20 tokens per prompt)", 20, 1000)
        await pilot.pause()
        expected = timing(bar)
        assert "elapsed 1m04s" in expected and "ETA" in expected
        label = bar.query_one("#timing", Label)
        assert label.region.right <= 80 and shown(label) == expected
        stage = shown(bar.query_one("#stage"))
        assert "…" in stage and stage.rstrip().endswith("20/1000")  # the name gives way, the count stays
        assert bar.query_one("#memory", Label).region.right <= 80
