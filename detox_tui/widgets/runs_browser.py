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

from detox_tui.text import plain, visible
from detox_tui.widgets.sort_menu import (
    SORT_BINDINGS,
    ColumnFit,
    SortableTable,
    ellipsize,
    fit_columns,
    header,
)
from detox_tui.widgets.summary_strip import summary_text


def _headline_value(summary: dict[str, Any]) -> float | None:
    """The number the result column shows (and sorts by): share detoxified, best share, or mean toxicity."""
    for key in ("share_detoxified", "best_share_detoxified", "mean"):
        value = summary.get(key)
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            return float(value)
    return None


def _headline(summary: dict[str, Any]) -> str:
    """The run's result, its number first so that a narrow column cuts only what follows it."""
    if summary.get("share_detoxified") is not None:
        return f"detoxified {summary['share_detoxified']:.0%}"
    if "best_share_detoxified" in summary:
        best = summary.get("best")
        return (
            f"best {summary['best_share_detoxified']:.0%} at {visible(best)}" if best else "none detoxified"
        )
    if "mean" in summary and summary["mean"] is not None:
        return f"mean {summary['mean']:.3f}"
    return ""


COLUMNS = (
    ("mark", " "),
    ("id", "run"),
    ("kind", "kind"),
    ("status", "status"),
    ("model", "model"),
    ("n", "prompts"),
    ("headline", "result"),
)
SORTABLE = ("id", "kind", "status", "model", "n", "headline")
# The model and the prompt count give way at narrow widths; the result shrinks to what is left.
DROP = {"model": (1, 0), "n": (1, 1)}
RESULT_MIN, RESULT_COMFORTABLE, RESULT_MAX = 12, 18, 40


def _sort_value(run: dict[str, Any], column: str) -> Any:
    if column == "n":
        value = run.get("n_prompts")
        return None if value is None else int(value)
    if column == "headline":
        return _headline_value(run.get("summary") or {})
    if column == "model":
        return _model_name(run).lower() or None
    value = run.get(column)
    return None if value in (None, "") else str(value).lower()


def _model_name(run: dict[str, Any]) -> str:
    return visible(str(run.get("model") or "")).rstrip("/").rsplit("/", 1)[-1]


class RunsBrowser(SortableTable, DataTable):
    """Enter opens a run; space marks it; c compares the two marked runs; r reloads the list.

    s opens the sort menu, < and > sort by the previous / next column, S reverses; a header click sorts.
    """

    DEFAULT_CSS = """
    RunsBrowser {
        height: 1fr;
        scrollbar-size-vertical: 1;
    }
    """

    BINDINGS = [
        Binding("enter", "open_run", "Open run", show=False),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare"),
        Binding("r", "reload", "Reload", show=False),
        *SORT_BINDINGS,
    ]

    class Open(Message):
        """Open a run (``kind``: its kind, so a sweep opens in the Sweeps tab)."""

        def __init__(self, run_id: str, kind: str | None = None) -> None:
            super().__init__()
            self.run_id, self.kind = run_id, kind

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
        self.sort_state: tuple[str, bool] | None = None
        self._layout: dict[str, int] | None = None

    def on_mount(self) -> None:
        self._rebuild()

    def set_runs(self, runs: list[dict[str, Any]]) -> None:
        """Show ``runs`` (newest first, as the store lists them; a sort stays in force)."""
        self.runs = list(runs)
        self.marked = [m for m in self.marked if any(r["id"] == m for r in self.runs)]
        if self.sort_state:
            self.runs = self._sorted(*self.sort_state)
        self._rebuild()

    def sort_columns(self) -> list[tuple[str, str]]:
        """The shown sortable columns as (key, label), in screen order."""
        shown = self._layout or {}
        return [(key, label) for key, label in COLUMNS if key in shown and key in SORTABLE]

    def sort_by(self, column_key: str, reverse: bool = False) -> None:
        """Sort the runs by ``column_key`` (runs without a value last); the cursor stays on its run."""
        if column_key not in SORTABLE:
            raise ValueError(f"no sortable column {column_key!r} in the runs browser")
        self.sort_state = (column_key, reverse)
        self.runs = self._sorted(column_key, reverse)
        self._rebuild()

    def _sorted(self, column: str, reverse: bool) -> list[dict[str, Any]]:
        have = [(run, _sort_value(run, column)) for run in self.runs]
        present = sorted((rv for rv in have if rv[1] is not None), key=lambda rv: rv[1], reverse=reverse)
        return [run for run, _ in present] + [run for run, value in have if value is None]

    def _cells(self, run: dict[str, Any]) -> dict[str, Text]:
        status = run.get("status") or ""
        style = {"finished": "green", "failed": "red", "cancelled": "yellow"}.get(status, "")
        return {
            "mark": Text("*", style="bold cyan") if run["id"] in self.marked else Text(""),
            "id": Text(visible(str(run["id"]))),
            "kind": Text(visible(str(run.get("kind") or ""))),
            "status": Text(visible(str(status)), style=style),
            "model": Text(_model_name(run)[:24]),
            "n": Text(str(run.get("n_prompts") or "")),
            "headline": Text(_headline(run.get("summary") or {})),
        }

    def _fit(self) -> dict[str, int]:
        cells = [self._cells(run) for run in self.runs]
        specs = []
        for key, label in COLUMNS:
            width = max([header(label, key, self.sort_state).cell_len] + [c[key].cell_len for c in cells])
            if key == "headline":
                specs.append(ColumnFit(key, min(width, RESULT_MAX), None, RESULT_MIN, RESULT_COMFORTABLE))
            else:
                specs.append(ColumnFit(key, width, DROP.get(key)))
        region = self.content_region
        available = 0
        if region.width > 0:
            overflow = len(self.runs) + self.header_height > region.height
            available = region.width - (self.styles.scrollbar_size_vertical if overflow else 0)
        return fit_columns(specs, available, self.cell_padding)

    def _rebuild(self) -> None:
        current = self.current_id()
        self._layout = self._fit()
        labels = dict(COLUMNS)
        self.clear(columns=True)
        for key, width in self._layout.items():
            self.add_column(header(labels[key], key, self.sort_state), width=width, key=key)
        for run in self.runs:
            cells = self._cells(run)
            self.add_row(
                *(
                    ellipsize(cells[k].plain, w) if k == "headline" else cells[k]
                    for k, w in self._layout.items()
                ),
                key=run["id"],
            )
        if current is not None and any(r["id"] == current for r in self.runs):
            self.move_cursor(row=self.get_row_index(current), animate=False)

    def on_resize(self) -> None:
        if self._layout is not None and self._fit() != self._layout:
            self._rebuild()

    def current_id(self) -> str | None:
        if not self.row_count or not self.columns:
            return None
        return str(self.coordinate_to_cell_key((self.cursor_row, 0)).row_key.value)

    def action_open_run(self) -> None:
        rid = self.current_id()
        if rid:
            kind = next((r.get("kind") for r in self.runs if r["id"] == rid), None)
            self.post_message(self.Open(rid, kind))

    def action_mark(self) -> None:
        rid = self.current_id()
        if not rid:
            return
        if rid in self.marked:
            self.marked.remove(rid)
        else:
            self.marked = (self.marked + [rid])[-2:]
        if "mark" in (self._layout or {}):
            for run in self.runs:
                self.update_cell(run["id"], "mark", self._cells(run)["mark"])

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
    """A run's summary and the config values that define it (stored text: plain, never markup)."""
    table = Table(title=plain(f"{run['kind']} {run['id']}"), expand=True, title_justify="left")
    table.add_column("", style="dim", no_wrap=True)
    table.add_column("value", ratio=1)
    table.add_row("status", plain(run.get("status")))
    table.add_row("model", plain(run.get("model")))
    table.add_row("prompts", str(len(run.get("prompts") or [])))
    summary = run.get("summary") or {}
    table.add_row("summary", summary_text(run["kind"], summary))
    config = run.get("config") or {}
    if config.get("method"):
        for key in ("method", "layers", "mode", "protocol"):
            if config.get(key) not in (None, [], ""):
                table.add_row(key, plain(_fmt(config[key])))
        for key, value in sorted((config.get("hparams") or {}).items()):
            table.add_row(plain(f"  {key}"), plain(_fmt(value)))
    gen = config.get("generation") or {}
    if gen:
        table.add_row(
            "samples",
            plain(f"{gen.get('samples')} x {gen.get('max_new_tokens')} tokens, seed {gen.get('seed')}"),
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
            table.add_row(key, plain(_fmt(summary[key])))
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
