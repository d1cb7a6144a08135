"""Sweeps view: a sweep's experiments as rows (state, worker, elapsed, headline result); enter opens one's run."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

from detox_tui.pipeline.tables import visible
from detox_tui.widgets.sort_menu import (
    SORT_BINDINGS,
    ColumnFit,
    SortableTable,
    ellipsize,
    fit_columns,
    header,
)

STATES = ("pending", "running", "finished", "failed", "cancelled")
STATE_STYLES = {"running": "bold cyan", "finished": "green", "failed": "bold red", "cancelled": "yellow"}

COLUMNS: tuple[tuple[str, str], ...] = (
    ("label", "experiment"),
    ("model", "model"),
    ("method", "method"),
    ("layers", "layers"),
    ("state", "state"),
    ("worker", "worker"),
    ("attempts", "tries"),
    ("elapsed", "elapsed"),
    ("result", "detoxified"),  # the share with its 95% CI, as the summary strip shows it
    ("after", "after mean"),
    ("error", "error"),
)
# What gives way when the table is narrower than its rows: the tries first, then what the label already says
# (model, method, layers), the worker, then the after mean and the elapsed time once the label is at its minimum.
# The state and the headline result never do; the label and the error shrink to what is left.
DROP = {
    "attempts": (1, 0),
    "model": (1, 1),
    "method": (1, 2),
    "layers": (1, 3),
    "worker": (1, 4),
    "after": (2, 0),
    "elapsed": (2, 1),
}
FLEXIBLE = {"label": (20, 28, 48), "error": (8, 16, 60)}  # column: (minimum, comfortable, most)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if isinstance(value, float) and math.isnan(value) else float(value)


def _pct(value: Any) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:.0%}"


def elapsed_text(seconds: float | None) -> str:
    """12.3s, 4m05s, 1h02m: an experiment's time at a glance ("" when unknown)."""
    if seconds is None or seconds < 0:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _started_at(row: dict[str, Any]) -> float | None:
    started = row.get("started")
    if not isinstance(started, str):
        return None
    try:
        return time.mktime(time.strptime(started, "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        return None


def elapsed_of(row: dict[str, Any], now: float | None = None) -> float | None:
    """The stored elapsed time, or for a running experiment the time since it started (the store's local time)."""
    stored = _number(row.get("elapsed_s"))
    if stored is not None:
        return stored
    if row.get("state") == "running":
        started = _started_at(row)
        if started is not None:
            return max(0.0, (time.time() if now is None else now) - started)
    return None


def _layers(row: dict[str, Any]) -> str:
    layers = row.get("layers")
    if isinstance(layers, (list, tuple)):
        return ",".join(map(str, layers)) if layers else "none"
    return "auto" if layers is None else visible(str(layers))


def _model_name(value: Any) -> str:
    return visible(str(value or "")).rstrip("/").rsplit("/", 1)[-1]


def _sort_value(row: dict[str, Any], column: str) -> Any:
    """What a column sorts by; None sorts last in both directions."""
    if column == "state":
        state = row.get("state")
        return STATES.index(state) if state in STATES else None
    if column == "layers":
        layers = row.get("layers")
        return tuple(layers) if isinstance(layers, (list, tuple)) else None
    if column == "attempts":
        return _number(row.get("attempts"))
    if column == "elapsed":
        return elapsed_of(row)
    if column == "result":
        return _number(row.get("share_detoxified"))
    if column == "after":
        return _number(row.get("after_mean"))
    if column == "model":
        return _model_name(row.get("model")).lower() or None
    value = row.get(column)
    return None if value in (None, "") else visible(str(value)).lower()


def sweep_summary(run: dict[str, Any] | None, rows: list[dict[str, Any]]) -> Text:
    """One line above the table: which sweep, its status, how many experiments are in each state, the best so far."""
    if run is None:
        return Text(
            "No sweep in the run store yet. Start one with `detox-tui sweep GRID` (here or in another "
            "terminal): it shows here as it runs."
        )
    status = str(run.get("status") or "")
    config = run.get("config") or {}
    n = max(len(rows), len(config.get("experiments") or []))
    counts = {state: sum(1 for r in rows if r.get("state") == state) for state in STATES}
    text = Text()
    text.append(f"sweep {visible(str(run.get('id')))} ", style="bold")
    text.append(visible(status), style=STATE_STYLES.get(status, ""))
    backend = config.get("backend")
    if backend:
        text.append(f" · {visible(str(backend))}")
    text.append(f" · {counts['finished']}/{n} finished")
    for state in ("running", "failed", "cancelled"):
        if counts[state]:
            text.append(f", {counts[state]} {state}", style=STATE_STYLES[state])
    finished = [
        r for r in rows if r.get("state") == "finished" and _number(r.get("share_detoxified")) is not None
    ]
    if finished:
        best = max(finished, key=lambda r: _number(r.get("share_detoxified")) or 0.0)
        if _number(best.get("share_detoxified")):
            label = visible(str(best.get("label") or ""))
            text.append(f" · best {_pct(best.get('share_detoxified'))} detoxified: {label}")
        else:
            text.append(" · none detoxified" + (" yet" if status == "running" else ""))
    if status in ("failed", "cancelled") and run.get("error"):
        text.append(f" · {visible(str(run['error']))}", style="red")
    return text


class SweepsView(SortableTable, DataTable):
    """One row per experiment of a sweep, refreshed in place as the store's rows change; enter opens its run.

    s opens the sort menu, < and > sort by the previous / next column, S reverses; a header click sorts.
    """

    DEFAULT_CSS = """
    SweepsView {
        height: 1fr;
        scrollbar-size-vertical: 1;
    }
    """

    BINDINGS = [
        Binding("enter", "open_experiment", "Open the experiment's run", show=False),
        *SORT_BINDINGS,
    ]

    class OpenRun(Message):
        """Open the run of an experiment (``run_id``: its "edit" run in the same store)."""

        def __init__(self, run_id: str, label: str) -> None:
            super().__init__()
            self.run_id, self.label = run_id, label

    def __init__(self, *, id: str | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.clock = clock
        self.run_id: str | None = None
        self.rows_by_id: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.sort_state: tuple[str, bool] | None = None
        self._layout: dict[str, int] | None = None

    def on_mount(self) -> None:
        self._rebuild()

    # ------------------------------------------------------------------ data

    def show_sweep(self, run_id: str, rows: list[dict[str, Any]]) -> None:
        """Show a sweep's rows (as the store lists them); the same sweep again updates only the rows that changed."""
        new = {str(r.get("id")): dict(r) for r in rows}
        if run_id != self.run_id:
            self.run_id = run_id
            self.rows_by_id = new
            self._reorder()
            self._rebuild(keep_cursor=False)
            return
        changed = [k for k, r in new.items() if self.rows_by_id.get(k) != r]
        running = [k for k, r in new.items() if r.get("state") == "running"]  # their elapsed time moves on
        if set(new) != set(self.rows_by_id):
            self.rows_by_id = new
            self._reorder()
            self._rebuild()
            return
        self.rows_by_id = new
        if not changed and not running:
            return
        if self._fit() != self._layout:
            self._reorder()
            self._rebuild()
            return
        if changed and self.sort_state:
            self._reorder()
            if self._row_keys() != self.order:
                self._rebuild()
                return
        for key in dict.fromkeys(changed + running):
            cells = self._shown_cells(self.rows_by_id[key])
            for column, cell in cells.items():
                self.update_cell(key, column, cell)

    def clear_sweep(self) -> None:
        self.run_id = None
        self.rows_by_id = {}
        self.order = []
        self._rebuild(keep_cursor=False)

    def current_row(self) -> dict[str, Any] | None:
        if not self.row_count or not self.columns:
            return None
        key = self.coordinate_to_cell_key((self.cursor_row, 0)).row_key.value
        return self.rows_by_id.get(str(key))

    # ------------------------------------------------------------------ sorting

    def sort_columns(self) -> list[tuple[str, str]]:
        shown = self._layout or {}
        return [(key, label) for key, label in COLUMNS if key in shown and key != "error"]

    def sort_by(self, column_key: str, reverse: bool = False) -> None:
        if column_key not in dict(COLUMNS) or column_key == "error":
            raise ValueError(f"no sortable column {column_key!r} in the sweeps view")
        self.sort_state = (column_key, reverse)
        self._reorder()
        self._rebuild()

    def _reorder(self) -> None:
        """Experiment order (e000, e001, ...) or the chosen sort, experiments without a value last."""
        keys = sorted(self.rows_by_id)
        if self.sort_state:
            column, reverse = self.sort_state
            have = [(k, _sort_value(self.rows_by_id[k], column)) for k in keys]
            present = sorted((kv for kv in have if kv[1] is not None), key=lambda kv: kv[1], reverse=reverse)
            keys = [k for k, _ in present] + [k for k, v in have if v is None]
        self.order = keys

    def _row_keys(self) -> list[str]:
        return [str(row.key.value) for row in self.ordered_rows]

    # ------------------------------------------------------------------ cells and layout

    def _cells(self, row: dict[str, Any]) -> dict[str, Text]:
        """Every cell of a row as plain text (labels, models and errors come from the store: never markup)."""
        state = str(row.get("state") or "")
        share = _number(row.get("share_detoxified"))
        result = Text("")
        if share is not None:
            style = "green" if share >= 0.5 else "yellow" if share > 0 else "red"
            result = Text(
                f"{share:.0%} [{_pct(row.get('share_detoxified_ci_low'))},"
                f"{_pct(row.get('share_detoxified_ci_high'))}]",
                style=style,
            )
            if row.get("collapsed"):
                result.append(" collapsed", style="bold red")
        after = _number(row.get("after_mean"))
        attempts = row.get("attempts")
        return {
            "label": Text(visible(str(row.get("label") or row.get("id") or ""))),
            "model": Text(_model_name(row.get("model"))[:24]),
            "method": Text(visible(str(row.get("method") or ""))),
            "layers": Text(_layers(row)),
            "state": Text(visible(state), style=STATE_STYLES.get(state, "dim")),
            "worker": Text(visible(str(row.get("worker") or ""))),
            "attempts": Text(str(attempts) if isinstance(attempts, int) and attempts else ""),
            "elapsed": Text(elapsed_text(elapsed_of(row, self.clock()))),
            "result": result,
            "after": Text("" if after is None else f"{after:.3f}"),
            "error": Text(visible(str(row.get("error") or "")), style="red"),
        }

    def _shown_cells(self, row: dict[str, Any]) -> dict[str, Text]:
        cells = self._cells(row)
        shown = {}
        for key, width in (self._layout or {}).items():
            cell = cells[key]
            if key in FLEXIBLE and cell.cell_len > width:
                cut = ellipsize(cell.plain, width)
                cut.stylize(cell.style)
                cell = cut
            shown[key] = cell
        return shown

    def _fit(self) -> dict[str, int]:
        cells = [self._cells(row) for row in self.rows_by_id.values()]
        specs = []
        for key, label in COLUMNS:
            width = max([header(label, key, self.sort_state).cell_len] + [c[key].cell_len for c in cells])
            if key in FLEXIBLE:
                low, comfortable, most = FLEXIBLE[key]
                specs.append(ColumnFit(key, min(width, most), None, min(low, width), comfortable))
            else:
                specs.append(ColumnFit(key, width, DROP.get(key)))
        region = self.content_region
        available = 0
        if region.width > 0:
            overflow = len(self.rows_by_id) + self.header_height > region.height
            available = region.width - (self.styles.scrollbar_size_vertical if overflow else 0)
        return fit_columns(specs, available, self.cell_padding)

    def _rebuild(self, keep_cursor: bool = True) -> None:
        current = self.current_row() if keep_cursor else None
        self._layout = self._fit()
        labels = dict(COLUMNS)
        self.clear(columns=True)
        for key, width in self._layout.items():
            self.add_column(header(labels[key], key, self.sort_state), width=width, key=key)
        for key in self.order:
            self.add_row(*self._shown_cells(self.rows_by_id[key]).values(), key=key)
        if current is not None and str(current.get("id")) in self.rows_by_id:
            self.move_cursor(row=self.get_row_index(str(current.get("id"))), animate=False)

    def on_resize(self) -> None:
        if self._layout is not None and self._fit() != self._layout:
            self._rebuild()

    # ------------------------------------------------------------------ actions

    def action_open_experiment(self) -> None:
        row = self.current_row()
        if row is None:
            return
        label = visible(str(row.get("label") or row.get("id") or ""))
        run_id = row.get("run_id")
        if run_id:
            self.post_message(self.OpenRun(str(run_id), label))
            return
        state = visible(str(row.get("state") or "pending"))
        error = row.get("error")
        if error:
            self.notify(f"{label} {state}: {visible(str(error))}", severity="error", timeout=10, markup=False)
        else:
            self.notify(f"{label} is {state} and has no run yet.", severity="warning", markup=False)
