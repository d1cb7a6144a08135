"""Runs browser: runs from the store, open one, mark two and compare them side by side."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Static

from detox_tui.widgets.summary_strip import summary_text


def _headline(summary: dict[str, Any]) -> str:
    if summary.get("share_detoxified") is not None:
        return f"detoxified {summary['share_detoxified']:.0%}"
    if "best_share_detoxified" in summary:
        best = summary.get("best")
        return f"best {best} {summary['best_share_detoxified']:.0%}" if best else "none detoxified"
    if "mean" in summary and summary["mean"] is not None:
        return f"mean {summary['mean']:.3f}"
    return ""


class RunsBrowser(DataTable):
    """Enter opens a run; space marks it; c compares the two marked runs; r reloads the list."""

    BINDINGS = [
        Binding("enter", "open_run", "Open run"),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare 2"),
        Binding("r", "reload", "Reload", show=False),
    ]

    class Open(Message):
        def __init__(self, run_id: str) -> None:
            super().__init__()
            self.run_id = run_id

    class Compare(Message):
        def __init__(self, first: str, second: str) -> None:
            super().__init__()
            self.first, self.second = first, second

    class Reload(Message):
        pass

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.runs: list[dict[str, Any]] = []
        self.marked: list[str] = []

    def on_mount(self) -> None:
        for key, label in (
            ("mark", " "),
            ("id", "run"),
            ("kind", "kind"),
            ("status", "status"),
            ("model", "model"),
            ("n", "prompts"),
            ("headline", "result"),
        ):
            self.add_column(label, key=key)

    def set_runs(self, runs: list[dict[str, Any]]) -> None:
        self.runs = list(runs)
        self.marked = [m for m in self.marked if any(r["id"] == m for r in self.runs)]
        self.clear(columns=False)
        for run in self.runs:
            self.add_row(*self._cells(run), key=run["id"])

    def _cells(self, run: dict[str, Any]) -> list[Any]:
        status = run.get("status") or ""
        style = {"finished": "green", "failed": "red", "cancelled": "yellow"}.get(status, "")
        return [
            Text("*", style="bold cyan") if run["id"] in self.marked else "",
            run["id"],
            run.get("kind") or "",
            Text(status, style=style),
            str(run.get("model") or "").rstrip("/").rsplit("/", 1)[-1][:18],
            str(run.get("n_prompts") or ""),
            _headline(run.get("summary") or {}),
        ]

    def current_id(self) -> str | None:
        if not self.row_count:
            return None
        return str(self.coordinate_to_cell_key((self.cursor_row, 0)).row_key.value)

    def action_open_run(self) -> None:
        rid = self.current_id()
        if rid:
            self.post_message(self.Open(rid))

    def action_mark(self) -> None:
        rid = self.current_id()
        if not rid:
            return
        if rid in self.marked:
            self.marked.remove(rid)
        else:
            self.marked = (self.marked + [rid])[-2:]
        for run in self.runs:
            self.update_cell(
                run["id"], "mark", Text("*", style="bold cyan") if run["id"] in self.marked else ""
            )

    def action_compare(self) -> None:
        if len(self.marked) != 2:
            self.notify("Mark two runs with space first.", severity="warning")
            return
        self.post_message(self.Compare(*self.marked))

    def action_reload(self) -> None:
        self.post_message(self.Reload())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def run_panel(run: dict[str, Any]) -> Table:
    """A run's summary and the config values that define it."""
    table = Table(title=f"{run['kind']} {run['id']}", expand=True, title_justify="left")
    table.add_column("", style="dim", no_wrap=True)
    table.add_column("value", ratio=1)
    table.add_row("status", str(run.get("status")))
    table.add_row("model", str(run.get("model")))
    table.add_row("prompts", str(len(run.get("prompts") or [])))
    summary = run.get("summary") or {}
    table.add_row("summary", summary_text(run["kind"], summary))
    config = run.get("config") or {}
    if config.get("method"):
        for key in ("method", "layers", "mode", "protocol"):
            if config.get(key) not in (None, [], ""):
                table.add_row(key, _fmt(config[key]))
        for key, value in sorted((config.get("hparams") or {}).items()):
            table.add_row(f"  {key}", _fmt(value))
    gen = config.get("generation") or {}
    if gen:
        table.add_row(
            "samples", f"{gen.get('samples')} x {gen.get('max_new_tokens')} tokens, seed {gen.get('seed')}"
        )
    for key in (
        "share_detoxified",
        "defense_success",
        "n_not_converged",
        "share_went_down",
        "mean_reduction",
        "wilcoxon_p",
        "ppl_before",
        "ppl_after",
        "mean",
        "best",
    ):
        if key in summary:
            table.add_row(key, _fmt(summary[key]))
    return table


class CompareRuns(ModalScreen[None]):
    """Two runs side by side."""

    BINDINGS = [Binding("escape", "dismiss", "Close"), Binding("q", "dismiss", "Close", show=False)]

    def __init__(self, first: dict[str, Any], second: dict[str, Any]) -> None:
        super().__init__()
        self.first, self.second = first, second

    def compose(self) -> ComposeResult:
        with Horizontal(id="compare-box"):
            with VerticalScroll():
                yield Static(run_panel(self.first), id="compare-left")
            with VerticalScroll():
                yield Static(run_panel(self.second), id="compare-right")
        yield Footer()

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
