"""Live results table: baseline rows or before/after edit rows, filled as rows arrive, sortable by any column,
fitted to the width (the numbers that matter are never cut)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

from detox_tui.text import visible
from detox_tui.widgets.sort_menu import (
    SORT_BINDINGS,
    ColumnFit,
    SortableTable,
    ellipsize,
    fit_columns,
    header,
)

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
    if math.isnan(summary["mean"]):
        return Text("n/a", style="dim")
    mean, lo, hi = summary.get("mean"), summary.get("ci_low"), summary.get("ci_high")
    text = Text(f"{mean:.2f}", style=score_style(mean))
    if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
        text.append(f" [{lo:.2f},{hi:.2f}]", style="dim")
    return text


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


# Which columns give way at narrow widths, as ColumnFit.drop (tier, order): tier 1 goes before the prompt
# shrinks below its comfortable width, tier 2 only once it is at its minimum. Missing: never gives way.
BASELINE_DROP = {"samples": (1, 0), "category": (1, 1), "share": (2, 0), "max": (2, 1), "idx": (2, 2)}
EDIT_DROP = {"samples": (1, 0), "config": (1, 1), "reduction": (2, 0), "idx": (2, 1)}
EDIT_DROP_CONFIG_VARIES = (2, 2)  # the layers column tells an ablation's rows apart: it goes last
PROMPT_MIN, PROMPT_COMFORTABLE, PROMPT_MAX = 10, 24, 60
HELD_OUT = " (held out)"

_VERDICT_ORDER = {"yes": 0, "no": 1, "COLLAPSED": 2}


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, str):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _config_order(config: str) -> tuple[int, Any]:
    """Layer configurations in numeric order ("2,3" before "10,11"); anything else after, by text."""
    try:
        return (0, tuple(int(part) for part in config.split(",")))
    except ValueError:
        return (1, config.lower())


def _sort_value(row: dict[str, Any], column: str) -> Any:
    """The value a row sorts by in ``column``; None sorts last in both directions."""
    if row.get("pending") and column not in ("idx", "prompt"):
        return None
    if column in ("before", "after"):
        return _number((row.get(column) or {}).get("mean"))
    if column == "detoxified":
        return _VERDICT_ORDER[_verdict(row).plain]
    if column == "converged":
        value = row.get("converged")
        return None if value is None else (0 if value else 1)
    if column == "samples":
        samples = [
            v for v in (row.get("samples_after") or row.get("samples") or []) if _number(v) is not None
        ]
        return max(samples) if samples else None
    if column == "share":
        return _number(row.get("share_above"))
    if column == "config":
        return _config_order(str(row.get("config") or "preset"))
    if column in ("prompt", "category"):
        value = row.get(column)
        return None if not value else str(value).lower()
    if column in ("idx", "mean", "max", "reduction"):
        return _number(row.get(column))
    return None


def sort_keys(rows: Sequence[tuple[str, dict[str, Any]]], column: str, reverse: bool) -> list[str]:
    """Row keys sorted by ``column`` (ties keep their order; rows without a value last either way)."""
    have = [(key, _sort_value(row, column)) for key, row in rows]
    present = sorted((kv for kv in have if kv[1] is not None), key=lambda kv: kv[1], reverse=reverse)
    return [key for key, _ in present] + [key for key, value in have if value is None]


class _KeyedText(Text):
    """A row's first cell, carrying its row key so the table can reorder rows without rebuilding them."""

    row_key: str = ""


class ResultsTable(SortableTable, DataTable):
    """Per-prompt rows; ``mode`` is "baseline" or "edit".

    s opens the sort menu, < and > sort by the previous / next column, S reverses; a header click sorts by its
    column. Columns fit the width: the less important ones give way and the prompt shrinks first.
    """

    DEFAULT_CSS = """
    ResultsTable {
        height: 1fr;
        scrollbar-size-vertical: 1;
    }
    """

    BINDINGS = [
        *SORT_BINDINGS,
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
        self._order: list[str] = []  # row keys in display order
        self._cells: dict[str, dict[str, Text]] = {}  # every column's cell, the prompt in full
        self._widest: dict[str, int] = {}  # each column's widest cell so far
        self._configs: set[str] = set()  # the layer configurations of the result rows
        self._loading = False
        self._layout: dict[str, int] | None = None  # the shown columns and their widths

    def on_mount(self) -> None:
        self.start("baseline")

    # ------------------------------------------------------------------ public API

    def start(self, mode: str, threshold: float | None = None) -> None:
        """Empty the table and set its columns for a new run of kind ``mode`` ("baseline" or "edit")."""
        self.mode = "edit" if mode in ("edit", "ablation") else "baseline"
        if threshold is not None:
            self.threshold = threshold
        self.data = {}
        self._order = []
        self._cells = {}
        self._widest = {}
        self._configs = set()
        self.sort_state = None
        self._rebuild()

    @property
    def all_columns(self) -> tuple[tuple[str, str], ...]:
        """Every column of the current mode as (key, label), shown or not."""
        return BASELINE_COLUMNS if self.mode == "baseline" else EDIT_COLUMNS

    @property
    def rows_data(self) -> list[dict[str, Any]]:
        """The rows in display order."""
        return [self.data[key] for key in self._order]

    def add_result(self, table: str, row: dict[str, Any]) -> None:
        """Take one RowReady row: "baseline" rows, "before" rows (an edit's pending row) or "edit" rows."""
        if self.mode == "baseline" and table == "baseline":
            self._put(f"b{row['idx']}", row)
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
            self._put(f"p{row['idx']}", pending)
        elif self.mode == "edit" and table == "edit":
            pending_key = f"p{row['idx']}"
            if self.data.get(pending_key, {}).get("pending"):
                # The first result for a prompt fills its pending row in place (rows keep their order).
                self._put(pending_key, row)
            else:
                self._put(f"{row.get('config', '')}|{row['idx']}", row)

    def stop_pending(self, label: str) -> None:
        """The run ended before these prompts were measured after the edit: say so ("cancelled", "failed")."""
        for key in [k for k, row in self.data.items() if row.get("pending")]:
            self._put(key, {**self.data[key], "pending_label": label})

    def load_rows(self, mode: str, rows: Sequence[dict[str, Any]], threshold: float | None = None) -> None:
        """Show the stored rows of a finished run."""
        self.start(mode, threshold)
        table = "edit" if self.mode == "edit" else "baseline"
        self._loading = True  # one layout and one pass over the rows at the end, not one per row
        try:
            for row in rows:
                self.add_result(table, row)
        finally:
            self._loading = False
        if self.sort_state:
            self._order = sort_keys([(k, self.data[k]) for k in self._order], *self.sort_state)
        self._rebuild()

    def selected_row(self) -> dict[str, Any] | None:
        key = self._cursor_key()
        return None if key is None else self.data.get(key)

    def sort_columns(self) -> list[tuple[str, str]]:
        """The shown columns as (key, label), in screen order: what the sort menu and < > offer."""
        shown = self._layout or {}
        return [(key, label) for key, label in self.all_columns if key in shown]

    def sort_by(self, column_key: str, reverse: bool = False) -> None:
        """Sort the rows by ``column_key``'s values (pending rows and missing values last); stays in force as
        rows arrive. The cursor stays on its row."""
        if column_key not in dict(self.all_columns):
            raise ValueError(f"no column {column_key!r} in the {self.mode} table")
        self.sort_state = (column_key, reverse)
        self._order = sort_keys([(k, self.data[k]) for k in self._order], column_key, reverse)
        self._rebuild()  # the header's arrow moves

    def action_open_detail(self) -> None:
        row = self.selected_row()
        if row is not None:
            self.post_message(self.OpenDetail(row))

    # ------------------------------------------------------------------ rows

    def _put(self, key: str, row: dict[str, Any]) -> None:
        new = key not in self.data
        self.data[key] = row
        cells = self._baseline_cells(row) if self.mode == "baseline" else self._edit_cells(row)
        self._cells[key] = cells
        for column, cell in cells.items():
            self._widest[column] = max(self._widest.get(column, 0), cell.cell_len)
        if not row.get("pending"):
            self._configs.add(str(row.get("config") or "preset"))
        if new:
            self._order.append(key)
        if self._loading:
            return
        if self.sort_state:
            self._order = sort_keys([(k, self.data[k]) for k in self._order], *self.sort_state)
        if self._fit() != self._layout:
            self._rebuild()
        elif new:
            self.add_row(*self._shown_cells(key), key=key)
            if self.sort_state:
                self._apply_order()
        else:
            for column, cell in zip(self._layout or {}, self._shown_cells(key)):
                self.update_cell(key, column, cell)
            if self.sort_state:
                self._apply_order()
        if not new and self._cursor_key() == key:
            # A pending row filled in under the cursor: refresh the views that follow the highlighted row.
            self.post_message(self.RowHighlightedData(row))

    def _baseline_cells(self, row: dict[str, Any]) -> dict[str, Text]:
        share = row.get("share_above")
        top = _number(row.get("max"))
        return {
            "idx": Text(str(row["idx"])),
            "prompt": Text(" ".join(visible(str(row["prompt"])).split())),
            "category": Text(visible(str(row.get("category") or ""))),
            "mean": fmt_ci(row),
            "max": Text("n/a", style="dim") if top is None else Text(f"{top:.2f}", style=score_style(top)),
            "share": Text(f"{share:.0%}" if _number(share) is not None else ""),
            "samples": Text(spark(row.get("samples") or []), style=score_style(_number(row.get("mean")))),
        }

    def _edit_cells(self, row: dict[str, Any]) -> dict[str, Text]:
        pending = row.get("pending", False)
        fall = _number(row.get("reduction"))
        before_spark = spark(row.get("samples_before") or [], 5)
        after_spark = spark(row.get("samples_after") or [], 5)
        prompt = " ".join(visible(str(row["prompt"])).split())
        return {
            "idx": Text(str(row["idx"])),
            "config": Text(visible(str(row.get("config") or ("" if pending else "preset")))),
            "prompt": Text(prompt + (HELD_OUT if row.get("heldout") else "")),
            "detoxified": Text("") if pending else _verdict(row),
            "converged": Text("") if pending else _converged(row),
            "before": fmt_ci(row.get("before")),
            "after": Text(row.get("pending_label", "running…"), style="dim")
            if pending
            else fmt_ci(row.get("after")),
            "reduction": Text("")
            if fall is None
            else Text(f"{fall:+.2f}", style="green" if fall > 0 else "red"),
            "samples": Text(f"{before_spark}|{after_spark}"),
        }

    def _shown_cells(self, key: str) -> list[Text]:
        cells = []
        for column, width in (self._layout or {}).items():
            cell = self._cells[key][column]
            if column == "prompt" and cell.cell_len > width:
                plain = cell.plain
                if plain.endswith(HELD_OUT) and width >= len(HELD_OUT) + 4:
                    cell = ellipsize(plain[: -len(HELD_OUT)], width - len(HELD_OUT))
                    cell.append(HELD_OUT, style="dim")
                else:
                    cell = ellipsize(plain, width)
            cells.append(cell)
        if cells:
            first = _KeyedText(cells[0].plain, style=cells[0].style, spans=list(cells[0].spans))
            first.row_key = key
            cells[0] = first
        return cells

    # ------------------------------------------------------------------ layout

    def _available(self) -> int:
        """Cells the columns may use: the content width less the vertical scrollbar when rows overflow."""
        region = self.content_region
        if region.width <= 0:
            return 0
        overflow = len(self.data) + self.header_height > region.height
        return region.width - (self.styles.scrollbar_size_vertical if overflow else 0)

    def _fit(self) -> dict[str, int]:
        specs = []
        drops = BASELINE_DROP if self.mode == "baseline" else EDIT_DROP
        for key, label in self.all_columns:
            width = max(header(label, key, self.sort_state).cell_len, self._widest.get(key, 0))
            drop = drops.get(key)
            if key == "config" and len(self._configs) > 1:
                drop = EDIT_DROP_CONFIG_VARIES
            if key == "prompt":
                specs.append(ColumnFit(key, min(width, PROMPT_MAX), None, PROMPT_MIN, PROMPT_COMFORTABLE))
            else:
                specs.append(ColumnFit(key, width, drop))
        return fit_columns(specs, self._available(), self.cell_padding)

    def _rebuild(self) -> None:
        """Show the fitted columns and every row in display order; the cursor stays on its row."""
        current = self._cursor_key()
        self._layout = self._fit()
        labels = dict(self.all_columns)
        self.clear(columns=True)
        for key, width in self._layout.items():
            self.add_column(header(labels[key], key, self.sort_state), width=width, key=key)
        for key in self._order:
            self.add_row(*self._shown_cells(key), key=key)
        self._restore_cursor(current)

    def _apply_order(self) -> None:
        """Put the rows in ``_order`` without rebuilding them."""
        current = self._cursor_key()
        rank = {key: i for i, key in enumerate(self._order)}
        first = next(iter(self._layout or {}), None)
        if first is not None:
            self.sort(first, key=lambda cell: rank[cell.row_key])
        self._restore_cursor(current)

    def _cursor_key(self) -> str | None:
        if not self.row_count or not self.columns:
            return None
        return str(self.coordinate_to_cell_key((self.cursor_row, 0)).row_key.value)

    def _restore_cursor(self, key: str | None) -> None:
        if key is not None and key in self.data and self.row_count:
            row = self.get_row_index(key)
            if row != self.cursor_row:
                self.move_cursor(row=row, animate=False)

    def on_resize(self) -> None:
        if self._layout is not None and self._fit() != self._layout:
            self._rebuild()

    # ------------------------------------------------------------------ events

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        row = self.data.get(str(event.row_key.value)) if event.row_key is not None else None
        if row is not None:
            self.post_message(self.RowHighlightedData(row))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        row = self.data.get(str(event.row_key.value))
        if row is not None:
            self.post_message(self.OpenDetail(row))
