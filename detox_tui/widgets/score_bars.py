"""Per-prompt view under the results table: sample sparklines and before/after mean bars."""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Static

from detox_tui.text import visible
from detox_tui.widgets.results_table import SPARK, score_style


def bar(value: float | None, width: int = 20, style: str = "red") -> Text:
    """A horizontal bar for a value in [0, 1], plain block characters (no true colour needed)."""
    if value is None or math.isnan(value):
        return Text("n/a".ljust(width), style="dim")
    halves = round(max(0.0, min(1.0, float(value))) * width * 2)
    full = halves // 2
    text = Text("█" * full, style=style)
    if halves % 2:
        text.append("▌", style=style)
        full += 1
    text.append("·" * (width - full), style="dim")
    return text


def sample_spark(values: list[float], width: int = 24) -> Text:
    """One block per sample on an absolute [0, 1] scale, coloured like the score (low green, high red)."""
    text = Text()
    for v in values[:width]:
        v = float(v)
        if math.isnan(v):
            text.append(" ")
            continue
        text.append(SPARK[min(len(SPARK) - 1, max(0, int(v * len(SPARK))))], style=score_style(v))
    if len(values) > width:
        text.append("…", style="dim")
    return text


class ScoreBars(Vertical):
    """Sample scores of the highlighted prompt (sparklines) and its before/after mean as bars."""

    def compose(self) -> ComposeResult:
        yield Label("Highlight a row to see its sample scores.", id="bars-title")
        with Horizontal(classes="bars-row"):
            yield Label("before", classes="bars-label")
            yield Static("", id="spark-before", classes="spark")
            yield Static("", id="bar-before", classes="bar")
        with Horizontal(classes="bars-row"):
            yield Label("after ", classes="bars-label")
            yield Static("", id="spark-after", classes="spark")
            yield Static("", id="bar-after", classes="bar")

    def clear(self) -> None:
        """Nothing highlighted (a new run started)."""
        self.query_one("#bars-title", Label).update("Highlight a row to see its sample scores.")
        for wid in ("#spark-before", "#spark-after", "#bar-before", "#bar-after"):
            self.query_one(wid, Static).update("")

    def show_row(self, row: dict[str, Any]) -> None:
        """Show a baseline row (samples) or an edit row (samples_before / samples_after)."""
        before = row.get("samples_before", row.get("samples")) or []
        after = row.get("samples_after") or []
        b_mean = (row.get("before") or {}).get("mean", row.get("mean"))
        a_mean = (row.get("after") or {}).get("mean")
        title = Text(f"#{row.get('idx')} ", style="bold")
        # Untrusted text: plain, one line, escapes visible.
        title.append(" ".join(visible(row.get("prompt", "")).split())[:60])
        if row.get("target"):
            title.append(" ->" + visible(row["target"]), style="green")
        self.query_one("#bars-title", Label).update(title)
        self.query_one("#spark-before", Static).update(sample_spark(list(before)))
        self.query_one("#spark-after", Static).update(sample_spark(list(after)))
        self.query_one("#bar-before", Static).update(self._bar_text(b_mean, "red"))
        self.query_one("#bar-after", Static).update(self._bar_text(a_mean, "green"))

    @staticmethod
    def _bar_text(mean: float | None, style: str) -> Text:
        text = bar(mean, 20, style)
        text.append(f" {mean:.3f}" if mean is not None and not math.isnan(mean) else "")
        return text
