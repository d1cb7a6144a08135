"""Ablation view: one row per layer configuration with its share of prompts detoxified drawn as a bar."""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from detox_tui.text import visible
from detox_tui.widgets.score_bars import bar
from detox_tui.widgets.sort_menu import SORT_BINDINGS, ColumnFit, SortableTable, fit_columns


def _f(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, fmt)


# (column key, label, the row field it sorts by)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("key", "layers", "layers"),
    ("bar", "detoxified", "share_detoxified"),
    ("success", "% [95% CI]", "share_detoxified"),
    ("defense", "defense", "defense_success"),
    ("nc", "not conv.", "n_not_converged"),
    ("reduction", "mean red. [95% CI]", "mean_reduction"),
    ("p", "p", "wilcoxon_p"),
    ("ppl", "ppl before->after", "ppl_after"),
    ("collapsed", "collapsed", "collapsed"),
)


# Which columns give way first when the table is narrower than its rows (the share with its CI, convergence,
# the mean fall with its CI and collapse never do): p first, then ppl, the bar (it repeats the share), defense.
DROP_ORDER = {"p": (1, 0), "ppl": (1, 1), "bar": (1, 2), "defense": (1, 3)}


def _sort_value(row: dict[str, Any], field: str) -> tuple:
    value = row.get(field)
    if field == "layers":
        return (0, tuple(row.get("layers") or []))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (1, 0.0)  # missing values last in both directions (see sort_by)
    return (0, float(value))


class AblationChart(SortableTable, DataTable):
    """Rows arrive one per configuration (RowReady "ablation"); the bar is the engine's share detoxified.

    Sortable like the results table: s opens the sort menu, < > cycle the column, S reverses.
    """

    BINDINGS = SORT_BINDINGS
    BAR_WIDTH = 16

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.rows_by_key: dict[str, dict[str, Any]] = {}
        self.sort_state: tuple[str, bool] | None = None

    def on_mount(self) -> None:
        self._shown: list[str] = []
        self.reset()

    def reset(self) -> None:
        self.rows_by_key = {}
        self.sort_state = None
        self._shown = []
        self._rebuild()

    def on_resize(self) -> None:
        if self._fit() != self._shown:
            self._rebuild()

    def _fit(self) -> list[str]:
        """The columns that fit the table's width without cutting a number (see DROP_ORDER)."""
        cells = [self._cells(r) for r in self.rows_by_key.values()]
        specs = []
        for i, (key, label, _field) in enumerate(COLUMNS):
            width = max([len(label)] + [c[i].cell_len for c in cells])
            specs.append(ColumnFit(key, width, drop=DROP_ORDER.get(key)))
        return list(fit_columns(specs, self.size.width - 2, padding=self.cell_padding))

    def _rebuild(self) -> None:
        """Columns for the current width, then every row again in the current order."""
        self._shown = self._fit()
        self.clear(columns=True)
        for key, label, _field in COLUMNS:
            if key in self._shown:
                self.add_column(label, key=key)
        order = list(self.rows_by_key)
        if self.sort_state:
            order = self._sorted_keys(*self.sort_state)
        for key in order:
            self.add_row(*self._shown_cells(self.rows_by_key[key]), key=key)

    def _shown_cells(self, row: dict[str, Any]) -> list[Any]:
        return [c for (key, _l, _f), c in zip(COLUMNS, self._cells(row)) if key in self._shown]

    def sort_columns(self) -> list[tuple[str, str]]:
        return [(key, label) for key, label, _field in COLUMNS if key != "bar"]

    def sort_by(self, column_key: str, reverse: bool = False) -> None:
        fields = {key: field for key, _label, field in COLUMNS}
        if column_key not in fields:
            raise ValueError(f"unknown column {column_key!r}")
        self.sort_state = (column_key, reverse)
        order = self._sorted_keys(column_key, reverse)
        current = self.coordinate_to_cell_key((self.cursor_row, 0)).row_key.value if self.row_count else None
        self.clear(columns=False)
        for key in order:
            self.add_row(*self._shown_cells(self.rows_by_key[key]), key=key)
        if current is not None:
            self.move_cursor(row=order.index(current))

    def _sorted_keys(self, column_key: str, reverse: bool) -> list[str]:
        field = {key: field for key, _label, field in COLUMNS}[column_key]
        present = [k for k, r in self.rows_by_key.items() if _sort_value(r, field)[0] == 0]
        missing = [k for k in self.rows_by_key if k not in present]
        present.sort(key=lambda k: _sort_value(self.rows_by_key[k], field), reverse=reverse)
        return present + missing

    def add_config(self, row: dict[str, Any]) -> None:
        key = str(row.get("key") or ",".join(map(str, row.get("layers", []))))
        known = key in self.rows_by_key
        self.rows_by_key[key] = row
        if self._fit() != self._shown:
            self._rebuild()
            return
        cells = self._shown_cells(row)
        if known:
            for col, cell in zip(self.columns, cells):
                self.update_cell(key, col, cell, update_width=True)
        else:
            self.add_row(*cells, key=key)
        if self.sort_state:
            self.sort_by(*self.sort_state)

    def _cells(self, row: dict[str, Any]) -> list[Any]:
        key = str(row.get("key") or ",".join(map(str, row.get("layers", []))))
        success = row.get("share_detoxified")
        style = "green" if (success or 0) >= 0.5 else "yellow" if (success or 0) > 0 else "red"
        return [
            Text(f"({visible(key)})"),
            bar(success, self.BAR_WIDTH, style),
            Text(
                f"{_f(success, '.0%')} [{_f(row.get('share_detoxified_ci_low'), '.0%')},"
                f"{_f(row.get('share_detoxified_ci_high'), '.0%')}]"
            ),
            Text(_f(row.get("defense_success"), ".0%")),
            Text(str(row.get("n_not_converged", ""))),
            Text(
                f"{_f(row.get('mean_reduction'), '.3f')} [{_f(row.get('ci_low'), '.2f')},"
                f"{_f(row.get('ci_high'), '.2f')}]"
            ),
            Text(_f(row.get("wilcoxon_p"), ".3g")),
            Text(f"{_f(row.get('ppl_before'), '.1f')}->{_f(row.get('ppl_after'), '.1f')}"),
            Text("COLLAPSED", style="bold red") if row.get("collapsed") else Text("no"),
        ]
