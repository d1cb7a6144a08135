"""Ablation view: one row per layer configuration with its share of prompts detoxified drawn as a bar."""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from detox_tui.widgets.score_bars import bar


def _f(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, fmt)


class AblationChart(DataTable):
    """Rows arrive one per configuration (RowReady "ablation"); the bar is the engine's share detoxified."""

    BAR_WIDTH = 16

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.rows_by_key: dict[str, dict[str, Any]] = {}

    def on_mount(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rows_by_key = {}
        self.clear(columns=True)
        for key, label in (
            ("key", "layers"),
            ("bar", "detoxified"),
            ("success", "% [95% CI]"),
            ("defense", "defense"),
            ("nc", "not conv."),
            ("reduction", "mean red. [95% CI]"),
            ("p", "p"),
            ("ppl", "ppl before->after"),
            ("collapsed", "collapsed"),
        ):
            self.add_column(label, key=key)

    def add_config(self, row: dict[str, Any]) -> None:
        key = str(row.get("key") or ",".join(map(str, row.get("layers", []))))
        success = row.get("share_detoxified")
        style = "green" if (success or 0) >= 0.5 else "yellow" if (success or 0) > 0 else "red"
        cells = [
            f"({key})",
            bar(success, self.BAR_WIDTH, style),
            f"{_f(success, '.0%')} [{_f(row.get('share_detoxified_ci_low'), '.0%')},"
            f"{_f(row.get('share_detoxified_ci_high'), '.0%')}]",
            _f(row.get("defense_success"), ".0%"),
            str(row.get("n_not_converged", "")),
            f"{_f(row.get('mean_reduction'), '.3f')} [{_f(row.get('ci_low'), '.2f')},{_f(row.get('ci_high'), '.2f')}]",
            _f(row.get("wilcoxon_p"), ".3g"),
            f"{_f(row.get('ppl_before'), '.1f')}->{_f(row.get('ppl_after'), '.1f')}",
            Text("COLLAPSED", style="bold red") if row.get("collapsed") else Text("no"),
        ]
        if key in self.rows_by_key:
            for col, cell in zip(self.columns, cells):
                self.update_cell(key, col, cell, update_width=True)
        else:
            self.add_row(*cells, key=key)
        self.rows_by_key[key] = row
