"""Run log pane: engine Log events and run milestones, timestamped."""

from __future__ import annotations

import time

from rich.text import Text
from textual.cache import LRUCache
from textual.widgets import RichLog

from detox_tui.text import visible

LEVEL_STYLES = {"info": "", "warning": "yellow", "error": "bold red", "debug": "dim"}

# Rows (after wrapping) the log keeps. Every row is a Strip that holds ~30 objects the garbage collector tracks
# (its segments and seven small caches), and every row drawn adds a cached crop of ~15 more: 2000 rows and
# RichLog's 1024-entry line cache came to ~74,000 tracked objects, which every full collection scans while the
# UI waits. 500 rows and a 256-entry cache (several screens) keep it at ~21,000.
MAX_LINES = 500
LINE_CACHE = 256


class RunLog(RichLog):
    """Append-only log of what the engine reported (the last ``MAX_LINES`` rows)."""

    def __init__(self, *, id: str | None = None, timestamps: bool = True) -> None:
        super().__init__(id=id, wrap=True, markup=False, highlight=False, max_lines=MAX_LINES)
        self._line_cache: LRUCache = LRUCache(LINE_CACHE)
        self.timestamps = timestamps
        self.lines_written: list[str] = []  # the messages, newest last (at most 2 x MAX_LINES)

    def log_message(self, message: str, level: str = "info") -> None:
        text = Text()
        if self.timestamps:
            text.append(time.strftime("%H:%M:%S "), style="dim")
        # Messages can quote prompts, generations and file names: plain text, escapes visible (newlines kept).
        text.append(visible(message, one_line=False), style=LEVEL_STYLES.get(level, ""))
        self.lines_written.append(message)
        if len(self.lines_written) > 2 * MAX_LINES:
            del self.lines_written[:-MAX_LINES]
        self.write(text)
