"""Export dialog: path (prefilled) and format; asks before overwriting an existing file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select

FORMATS = ("csv", "json", "md")


@dataclass
class ExportRequest:
    path: str
    fmt: str


def with_format(path: str, fmt: str) -> str:
    """``path`` with its suffix switched to ``fmt`` (results.csv + json -> results.json)."""
    p = Path(path)
    return str(p.with_suffix("." + fmt)) if p.suffix.lstrip(".") in FORMATS or not p.suffix else path


class ExportDialog(ModalScreen[ExportRequest | None]):
    """Returns an ExportRequest (the caller writes the file) or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, default_path: str, fmt: str = "csv") -> None:
        super().__init__()
        self.default_path = default_path
        self.fmt = fmt
        self._confirm_for: str | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="export-box"):
            yield Label("Export the current table", classes="dialog-title")
            with Horizontal(classes="row"):
                yield Label("format", classes="field-label")
                yield Select(
                    [(f, f) for f in FORMATS],
                    value=self.fmt,
                    allow_blank=False,
                    id="export-format",
                    compact=True,
                )
            yield Input(
                self.default_path, id="export-path", placeholder="path of the file to write", compact=True
            )
            yield Label("", id="export-warning")
            with Horizontal(classes="buttons"):
                yield Button("Export", id="export-ok", variant="primary")
                yield Button("Cancel", id="export-cancel")

    def on_mount(self) -> None:
        self.query_one("#export-path", Input).focus()

    @on(Select.Changed, "#export-format")
    def _format(self, event: Select.Changed) -> None:
        field = self.query_one("#export-path", Input)
        field.value = with_format(field.value, str(event.value))
        self._confirm_for = None

    @on(Input.Changed, "#export-path")
    def _path_changed(self) -> None:
        self._confirm_for = None
        self.query_one("#export-warning", Label).update("")
        self.query_one("#export-ok", Button).label = "Export"

    @on(Input.Submitted, "#export-path")
    @on(Button.Pressed, "#export-ok")
    def _ok(self) -> None:
        path = self.query_one("#export-path", Input).value.strip()
        fmt = str(self.query_one("#export-format", Select).value)
        if not path:
            self.query_one("#export-warning", Label).update("Type a path first.")
            return
        target = Path(path).expanduser()
        if target.is_dir():
            self.query_one("#export-warning", Label).update(f"{target} is a folder; type a file name.")
            return
        if target.exists() and self._confirm_for != str(target):
            self._confirm_for = str(target)
            self.query_one("#export-warning", Label).update(
                f"{target.name} exists: press Enter (or Overwrite) again to replace it."
            )
            self.query_one("#export-ok", Button).label = "Overwrite"
            return
        self.dismiss(ExportRequest(str(target), fmt))

    @on(Button.Pressed, "#export-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
