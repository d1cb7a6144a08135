"""Run log pane: engine Log events and run milestones, timestamped."""

from __future__ import annotations

import time

from rich.text import Text
from textual.widgets import RichLog

LEVEL_STYLES = {"info": "", "warning": "yellow", "error": "bold red", "debug": "dim"}


class RunLog(RichLog):
    """Append-only log of what the engine reported."""

    def __init__(self, *, id: str | None = None, timestamps: bool = True) -> None:
        super().__init__(id=id, wrap=True, markup=False, highlight=False, max_lines=2000)
        self.timestamps = timestamps
        self.lines_written: list[str] = []

    def log_message(self, message: str, level: str = "info") -> None:
        text = Text()
        if self.timestamps:
            text.append(time.strftime("%H:%M:%S "), style="dim")
        text.append(message, style=LEVEL_STYLES.get(level, ""))
        self.lines_written.append(message)
        self.write(text)
