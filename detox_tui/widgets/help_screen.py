"""Help screen: the keys of each part of the app as two-column tables in a centred, scrollable box."""

from __future__ import annotations

from collections.abc import Iterable

from rich.cells import cell_len
from rich.table import Table
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from detox_tui.text import visible

Section = tuple[str, list[tuple[str, str]]]


def _action_name(action: str) -> str:
    """``app.show_tab('results')`` -> ``show tab results``: a readable stand-in for an empty description."""
    name, _, args = action.partition("(")
    name = name.rpartition(".")[2].replace("_", " ")
    args = args.rstrip(")").replace("'", "").replace('"', "").replace(",", " ").strip()
    return f"{name} {args}".strip()


def binding_rows(app: App, bindings: Iterable[Binding | tuple]) -> list[tuple[str, str]]:
    """(key as the app displays it, description) for each binding; a key already listed is skipped.

    The description falls back to the action's name when empty. Tuples as written in BINDINGS
    (``("q", "quit", "Quit")``) are accepted too. The first binding of a key wins.
    """
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in bindings:
        binding = item if isinstance(item, Binding) else Binding(*item)
        if binding.action == "help_quit":  # Textual's ctrl+c hint, not a key of ours
            continue
        # "greater_than_sign,right_square_bracket" is two keys: show both as the app displays them.
        key = " ".join(
            app.get_key_display(Binding(k.strip(), binding.action, binding.description))
            for k in binding.key.split(",")
        )
        if key in seen:
            continue
        seen.add(key)
        rows.append((key, binding.description or _action_name(binding.action)))
    return rows


def section_table(rows: list[tuple[str, str]], key_width: int = 8) -> Table:
    """Keys on the left (bold), descriptions on the right; both as plain text, never markup."""
    table = Table.grid(padding=(0, 2), expand=False)
    table.add_column("key", no_wrap=True, style="bold", min_width=key_width)
    table.add_column("description", overflow="fold")
    for key, description in rows:
        table.add_row(Text(visible(key)), Text(visible(description)))
    return table


class HelpScreen(ModalScreen[None]):
    """Lists keys by section; escape, q, ? or F1 closes it."""

    DEFAULT_CSS = """
    HelpScreen {
        align: center middle;
    }
    HelpScreen #help-box {
        width: 90;
        max-width: 95%;
        height: auto;
        max-height: 90%;
        border: thick $primary;
        border-title-align: center;
        border-subtitle-align: center;
        border-subtitle-color: $text-muted;
        background: $surface;
        padding: 0 1;
    }
    HelpScreen .help-section-title {
        text-style: bold;
        color: $accent;
        margin-top: 1;
    }
    HelpScreen .help-table {
        height: auto;
        padding-left: 2;
    }
    """

    BINDINGS = [Binding("escape,q,question_mark,f1", "close", "Close")]

    def __init__(self, sections: list[Section]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box") as box:
            box.border_title = "Keys"
            box.border_subtitle = "escape, q or ? closes; arrows scroll"
            # One key column width for every section, so the descriptions line up down the screen.
            key_width = max((cell_len(visible(k)) for _, rows in self.sections for k, _ in rows), default=8)
            for title, rows in self.sections:
                yield Label(Text(visible(title)), classes="help-section-title")
                yield Static(section_table(rows, min(key_width, 24)), classes="help-table")

    def on_mount(self) -> None:
        self.query_one("#help-box", VerticalScroll).focus()

    def action_close(self) -> None:
        self.dismiss(None)
