"""Heatmap of a causal trace: layers x prompt tokens, shaded cells and a legend; works without true colour."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.text import Text
from textual.widget import Widget

from detox_tui.text import visible

# Shades from low to high; each has a character so the map reads even in monochrome terminals.
RAMP: tuple[tuple[str, str], ...] = (
    (" ", "on grey11"),
    ("░", "blue on grey11"),
    ("▒", "cyan on grey11"),
    ("▓", "yellow on grey11"),
    ("█", "red on grey11"),
)


def shade(value: float, low: float, high: float) -> tuple[str, str]:
    """The ramp entry for ``value`` scaled into [low, high]."""
    if not np.isfinite(value) or high <= low:
        return RAMP[0]
    pos = (value - low) / (high - low)
    return RAMP[min(len(RAMP) - 1, max(0, int(pos * len(RAMP))))]


class Heatmap(Widget):
    """Rows are prompt tokens, columns are layers (so long prompts scroll down, not off the side)."""

    DEFAULT_CSS = "Heatmap { height: auto; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.tokens: list[str] = []
        self.scores: np.ndarray = np.zeros((0, 0))
        self.title = ""

    def set_trace(self, tokens: list[str], scores: Any, title: str = "") -> None:
        """``scores`` is layers x tokens (as TraceResult.scores)."""
        # Tokens and the title quote the prompt (untrusted): one line each, controls shown as escapes.
        self.tokens = [visible(t) for t in tokens]
        self.scores = np.asarray(scores, dtype=float)
        self.title = visible(title)
        self.refresh(layout=True)

    def render(self) -> Text:
        if self.scores.size == 0:
            return Text("No trace yet: pick a prompt and press t.", style="dim")
        n_layers, n_tokens = self.scores.shape
        low, high = float(np.nanmin(self.scores)), float(np.nanmax(self.scores))
        label_w = min(14, max(len(t) for t in self.tokens) + 1) if self.tokens else 4
        cell_w = 3 if n_layers <= 24 else 2
        text = Text()
        if self.title:
            text.append(self.title + "\n", style="bold")
        text.append(" " * label_w)
        for layer in range(n_layers):
            text.append(f"{layer:>{cell_w}}"[-cell_w:], style="dim")
        text.append("   layer\n")
        for t in range(n_tokens):
            token = self.tokens[t] if t < len(self.tokens) else "?"
            token = token.replace("Ġ", " ")
            text.append(f"{token[: label_w - 1]:>{label_w - 1}} ")
            for layer in range(n_layers):
                char, style = shade(float(self.scores[layer, t]), low, high)
                text.append(char * cell_w, style=style)
            text.append("\n")
        text.append("\n" + " " * label_w + "low ", style="dim")
        for char, style in RAMP:
            text.append(char * 2, style=style)
        text.append(f" high   effect {low:+.3f} .. {high:+.3f}", style="dim")
        return text

    def get_content_height(self, container, viewport, width: int) -> int:
        if self.scores.size == 0:
            return 1
        return self.scores.shape[1] + 3 + (1 if self.title else 0)
