"""Export dialog: path (prefilled), format (follows the extension typed) and columns; asks before overwriting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select

from detox_tui.pipeline.results import FORMATS, suffix_format, summary_path
from detox_tui.pipeline.tables import COLUMN_CHOICES
from detox_tui.text import plain

COLUMN_LABELS = {"default": "for readers", "all": "every field"}


@dataclass
class ExportRequest:
    path: str
    fmt: str
    columns: str = "default"


def with_format(path: str, fmt: str) -> str:
    """``path`` with its suffix switched to ``fmt`` (results.csv + json -> results.json); other suffixes stay."""
    p = Path(path)
    if p.suffix.lstrip(".").lower() in FORMATS or not p.suffix:
        return str(p.with_suffix("." + fmt)) if p.name else path
    return path


def files_written(target: Path, fmt: str) -> list[Path]:
    """The files an export to ``target`` may write: the table, and for CSV its ``.summary.csv`` sidecar."""
    return [target, summary_path(target)] if fmt == "csv" else [target]


def clash(path: str, fmt: str) -> str | None:
    """One sentence when the file's extension names another format than ``fmt``, else None."""
    named = suffix_format(path)
    if named is not None and named != fmt:
        return f"{Path(path).name} is a .{named} file but the format is {fmt}; change one of them."
    return None


class ExportDialog(ModalScreen[ExportRequest | None]):
    """Returns an ExportRequest (the caller writes the file) or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, default_path: str, fmt: str | None = None, columns: str = "default") -> None:
        super().__init__()
        self.default_path = default_path
        self.fmt = fmt or suffix_format(default_path) or "csv"
        self.columns = columns
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
            with Horizontal(classes="row"):
                yield Label("columns", classes="field-label")
                yield Select(
                    [(COLUMN_LABELS.get(c, c), c) for c in COLUMN_CHOICES],
                    value=self.columns,
                    allow_blank=False,
                    id="export-columns",
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
    def _path_changed(self, event: Input.Changed) -> None:
        self._confirm_for = None
        self.query_one("#export-warning", Label).update("")
        self.query_one("#export-ok", Button).label = "Export"
        # The format follows the extension typed (table.md -> md), so a .md file never receives CSV.
        named = suffix_format(event.value.strip())
        select = self.query_one("#export-format", Select)
        if named is not None and select.value != named:
            select.value = named

    @on(Input.Submitted, "#export-path")
    @on(Button.Pressed, "#export-ok")
    def _ok(self) -> None:
        path = self.query_one("#export-path", Input).value.strip()
        fmt = str(self.query_one("#export-format", Select).value)
        columns = str(self.query_one("#export-columns", Select).value)
        warning = self.query_one("#export-warning", Label)
        if not path:
            warning.update("Type a path first.")
            return
        problem = clash(path, fmt)
        if problem:
            warning.update(plain(problem))
            self.notify(problem, severity="error")
            return
        target = Path(path).expanduser()
        if target.is_dir():
            warning.update(plain(f"{target} is a folder; type a file name."))
            return
        existing = [p for p in files_written(target, fmt) if p.exists()]
        if existing and self._confirm_for != str(target):
            self._confirm_for = str(target)
            names = " and ".join(p.name for p in existing)
            verb = "exist" if len(existing) > 1 else "exists"
            warning.update(plain(f"{names} {verb}: press Enter (or Overwrite) again to replace it."))
            self.query_one("#export-ok", Button).label = "Overwrite"
            return
        self.dismiss(ExportRequest(str(target), fmt, columns))

    @on(Button.Pressed, "#export-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
