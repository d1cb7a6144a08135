"""Live results table: baseline rows or before/after edit rows, filled as rows arrive, sortable by any column."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

SPARK = "▁▂▃▄▅▆▇█"


def spark(values: Sequence[float], width: int = 8) -> str:
    """Scores in [0, 1] as a unicode sparkline (one block per sample, at most ``width``)."""
    out = []
    for v in list(values)[:width]:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(" ")
            continue
        out.append(SPARK[min(len(SPARK) - 1, max(0, int(float(v) * len(SPARK))))])
    return "".join(out)


def score_style(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "dim"
    return "bold red" if value >= 0.5 else "yellow" if value >= 0.1 else "green"


def fmt_ci(summary: dict[str, Any] | None) -> Text:
    """'0.42 [0.30,0.55]' coloured by the mean."""
    if not summary or summary.get("mean") is None:
        return Text("…", style="dim")
    mean, lo, hi = summary.get("mean"), summary.get("ci_low"), summary.get("ci_high")
    text = Text(f"{mean:.2f}", style=score_style(mean))
    if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
        text.append(f" [{lo:.2f},{hi:.2f}]", style="dim")
    return text


def _short(text: str, n: int = 34) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


BASELINE_COLUMNS = (
    ("idx", "#"),
    ("prompt", "prompt"),
    ("category", "category"),
    ("mean", "mean [95% CI]"),
    ("max", "max"),
    ("share", ">=thr"),
    ("samples", "samples"),
)
EDIT_COLUMNS = (
    ("idx", "#"),
    ("config", "layers"),
    ("prompt", "prompt"),
    # The verdict next to the prompt, so it is on screen at 80 columns.
    ("detoxified", "detox"),
    ("converged", "conv"),
    ("before", "before [95% CI]"),
    ("after", "after [95% CI]"),
    ("reduction", "fall"),
    ("samples", "before|after"),
)


def _verdict(row: dict[str, Any]) -> Text:
    """The engine's verdict, as computed once in the engine (never recomputed here)."""
    if row.get("collapsed"):
        return Text("COLLAPSED", style="bold red")
    return Text("yes", style="green") if row.get("detoxified") else Text("no", style="red")


def _converged(row: dict[str, Any]) -> Text:
    value = row.get("converged")
    if value is None:
        return Text("-", style="dim")
    return Text("yes") if value else Text("NO", style="bold yellow")


def _sort_value(row: dict[str, Any], column: str) -> Any:
    if column in ("before", "after"):
        value = (row.get(column) or {}).get("mean")
    elif column == "samples":
        samples = row.get("samples_after") or row.get("samples") or []
        value = max(samples) if samples else None
    elif column == "share":
        value = row.get("share_above")
    else:
        value = row.get(column)
    if value is None:
        return (1, "")
    if isinstance(value, (bool, int, float)):
        return (0, float(value))
    return (0, str(value).lower())


class ResultsTable(DataTable):
    """Per-prompt rows; ``mode`` is "baseline" or "edit". Press s to sort by the cursor's column (again: reverse)."""

    BINDINGS = [
        Binding("s", "sort_column", "Sort"),
        Binding("enter", "open_detail", "Detail", show=False),
    ]

    class RowHighlightedData(Message):
        def __init__(self, row: dict[str, Any]) -> None:
            super().__init__()
            self.row = row

    class OpenDetail(Message):
        def __init__(self, row: dict[str, Any]) -> None:
            super().__init__()
            self.row = row

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.mode = "baseline"
        self.threshold = 0.1
        self.data: dict[str, dict[str, Any]] = {}
        self.sort_state: tuple[str, bool] | None = None

    def on_mount(self) -> None:
        self.start("baseline")

    # ------------------------------------------------------------------ public API

    def start(self, mode: str, threshold: float | None = None) -> None:
        """Empty the table and set its columns for a new run of kind ``mode`` ("baseline" or "edit")."""
        self.mode = "edit" if mode in ("edit", "ablation") else "baseline"
        if threshold is not None:
            self.threshold = threshold
        self.data = {}
        self.sort_state = None
        self.clear(columns=True)
        for key, label in BASELINE_COLUMNS if self.mode == "baseline" else EDIT_COLUMNS:
            self.add_column(label, key=key)

    @property
    def rows_data(self) -> list[dict[str, Any]]:
        """The rows in display order."""
        return [self.data[str(key.value)] for key in self._row_order()]

    def _row_order(self):
        return [row.key for row in self.ordered_rows]

    def add_result(self, table: str, row: dict[str, Any]) -> None:
        """Take one RowReady row: "baseline" rows, "before" rows (an edit's pending row) or "edit" rows."""
        if self.mode == "baseline" and table == "baseline":
            self._put(f"b{row['idx']}", row, self._baseline_cells(row))
        elif self.mode == "edit" and table == "before":
            pending = {
                "idx": row["idx"],
                "prompt": row["prompt"],
                "config": "",
                "before": row,
                "pending": True,
                "samples_before": row.get("samples", []),
                "generations_before": row.get("generations", []),
                "category": row.get("category"),
                "target": row.get("target"),
            }
            self._put(f"p{row['idx']}", pending, self._edit_cells(pending))
        elif self.mode == "edit" and table == "edit":
            pending_key = f"p{row['idx']}"
            if self.data.get(pending_key, {}).get("pending"):
                # The first result for a prompt fills its pending row in place (rows keep their order).
                self._put(pending_key, row, self._edit_cells(row))
            else:
                self._put(f"{row.get('config', '')}|{row['idx']}", row, self._edit_cells(row))

    def load_rows(self, mode: str, rows: Sequence[dict[str, Any]], threshold: float | None = None) -> None:
        """Show the stored rows of a finished run."""
        self.start(mode, threshold)
        table = "edit" if self.mode == "edit" else "baseline"
        for row in rows:
            self.add_result(table, row)

    def selected_row(self) -> dict[str, Any] | None:
        if not self.row_count:
            return None
        key = self.coordinate_to_cell_key((self.cursor_row, 0)).row_key
        return self.data.get(str(key.value))

    def sort_by(self, column: str, reverse: bool = False) -> None:
        ordered = sorted(self.data.items(), key=lambda kv: _sort_value(kv[1], column), reverse=reverse)
        self.sort_state = (column, reverse)
        self.clear(columns=False)
        for key, row in ordered:
            cells = self._baseline_cells(row) if self.mode == "baseline" else self._edit_cells(row)
            self.add_row(*cells, key=key)

    def action_sort_column(self) -> None:
        if not self.columns:
            return
        column = str(list(self.columns)[self.cursor_column].value)
        reverse = bool(self.sort_state and self.sort_state[0] == column and not self.sort_state[1])
        self.sort_by(column, reverse)
        self.notify(f"sorted by {column}{' (descending)' if reverse else ''}", timeout=2)

    def action_open_detail(self) -> None:
        row = self.selected_row()
        if row is not None:
            self.post_message(self.OpenDetail(row))

    # ------------------------------------------------------------------ internals

    def _put(self, key: str, row: dict[str, Any], cells: list[Any]) -> None:
        if key in self.data:
            self.data[key] = row
            for col, cell in zip(self.columns, cells):
                self.update_cell(key, col, cell, update_width=True)
            # A pending row filled in under the cursor: refresh the views that follow the highlighted row.
            if self.row_count and self.coordinate_to_cell_key((self.cursor_row, 0)).row_key.value == key:
                self.post_message(self.RowHighlightedData(row))
            return
        self.data[key] = row
        self.add_row(*cells, key=key)
        if self.sort_state:
            self.sort_by(*self.sort_state)

    def _baseline_cells(self, row: dict[str, Any]) -> list[Any]:
        share = row.get("share_above")
        return [
            str(row["idx"]),
            _short(row["prompt"]),
            row.get("category") or "",
            fmt_ci(row),
            Text(f"{row.get('max', float('nan')):.2f}", style=score_style(row.get("max"))),
            f"{share:.0%}" if share is not None else "",
            Text(spark(row.get("samples") or []), style=score_style(row.get("mean"))),
        ]

    def _edit_cells(self, row: dict[str, Any]) -> list[Any]:
        pending = row.get("pending", False)
        fall = row.get("reduction")
        before_spark = spark(row.get("samples_before") or [], 5)
        after_spark = spark(row.get("samples_after") or [], 5)
        heldout = " (held out)" if row.get("heldout") else ""
        return [
            str(row["idx"]),
            row.get("config") or ("" if pending else "preset"),
            _short(row["prompt"], 24) + heldout,
            Text("") if pending else _verdict(row),
            Text("") if pending else _converged(row),
            fmt_ci(row.get("before")),
            Text("running…", style="dim") if pending else fmt_ci(row.get("after")),
            Text("") if fall is None else Text(f"{fall:+.2f}", style="green" if fall > 0 else "red"),
            Text(f"{before_spark}|{after_spark}"),
        ]

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        row = self.data.get(str(event.row_key.value)) if event.row_key is not None else None
        if row is not None:
            self.post_message(self.RowHighlightedData(row))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        row = self.data.get(str(event.row_key.value))
        if row is not None:
            self.post_message(self.OpenDetail(row))
