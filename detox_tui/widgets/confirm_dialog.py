"""Yes/no confirmation: the safe answer (no) has the focus; y says yes, n or escape says no."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label

from detox_tui.text import visible


def _plain(text: str) -> Text:
    """Plain text with control characters shown as escapes; newlines kept (the detail may have several lines)."""
    return Text("\n".join(visible(line) for line in text.split("\n")))


class ConfirmDialog(ModalScreen[bool]):
    """Returns True for yes, False for no. The question and detail are shown as plain text, never markup."""

    DEFAULT_CSS = """
    ConfirmDialog {
        align: center middle;
    }
    ConfirmDialog #confirm-box {
        width: 64;
        max-width: 95%;
        height: auto;
        max-height: 90%;
        padding: 1 2;
        border: thick $warning;
        background: $surface;
    }
    ConfirmDialog #confirm-question {
        text-style: bold;
        width: 100%;
    }
    ConfirmDialog #confirm-detail {
        color: $text-muted;
        width: 100%;
        margin-top: 1;
    }
    ConfirmDialog #confirm-buttons {
        height: auto;
        margin-top: 1;
        align-horizontal: right;
    }
    ConfirmDialog #confirm-buttons Button {
        margin-left: 2;
    }
    """

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, detail: str = "", yes: str = "Yes", no: str = "No") -> None:
        super().__init__()
        self.question = question
        self.detail = detail
        self.yes = yes
        self.no = no

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Label(_plain(self.question), id="confirm-question")
            if self.detail:
                yield Label(_plain(self.detail), id="confirm-detail")
            with Horizontal(id="confirm-buttons"):
                # Button labels are plain Text too: a caller may build them from a run's name.
                yield Button(_plain(self.yes), id="confirm-yes", variant="warning")
                yield Button(_plain(self.no), id="confirm-no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#confirm-no", Button).focus()

    @on(Button.Pressed, "#confirm-yes")
    def _yes(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#confirm-no")
    def _no(self) -> None:
        self.dismiss(False)

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
