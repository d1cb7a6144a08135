"""The app's footer: the keys that work now, on one line that repaints without a layout.

Textual's Footer mounts a widget per key and rebuilds them on every focus change: a tab switch rebuilt it twice,
each rebuild a full layout of the screen, and it kept its old keys alive (Textualize/textual#6666). This one is a
single line of text: a focus change repaints one row.
"""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.widgets import Static


class AppFooter(Static):
    """The shown bindings of the focused widget, its ancestors and the app (focused first), then the palette key."""

    COMPONENT_CLASSES = {"app-footer--key", "app-footer--dim"}
    DEFAULT_CSS = """
    AppFooter {
        height: 1;
        dock: bottom;
        background: $footer-background;
        color: $footer-foreground;
    }
    AppFooter > .app-footer--key {
        color: $footer-key-foreground;
        text-style: bold;
    }
    AppFooter > .app-footer--dim {
        text-style: dim;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.spans: list[tuple[int, int, str]] = []  # (start, end, key) of each shown key, for clicks

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)
        self._bindings_changed(self.screen)

    def _bindings_changed(self, _screen: object) -> None:
        text, self.spans = self.keys_text()
        self.update(text, layout=False)  # one row, fixed size: a repaint, never a layout

    def keys_text(self) -> tuple[Text, list[tuple[int, int, str]]]:
        key = self.get_component_rich_style("app-footer--key", partial=True)
        dim = self.get_component_rich_style("app-footer--dim", partial=True)
        text = Text(no_wrap=True, overflow="ellipsis")
        spans: list[tuple[int, int, str]] = []
        seen: set[str] = set()
        for active in self.screen.active_bindings.values():
            binding = active.binding
            if not binding.show or binding.action in seen:
                continue
            seen.add(binding.action)
            start = len(text)
            text.append(self.app.get_key_display(binding), style=key if active.enabled else dim)
            text.append(f" {binding.description} ", style="" if active.enabled else dim)
            spans.append((start, len(text), binding.key.split(",")[0]))
        if self.app.ENABLE_COMMAND_PALETTE:
            shown = self.app.get_key_display(Binding(self.app.COMMAND_PALETTE_BINDING, "command_palette"))
            palette = Text.assemble(("▏", dim), (shown, key), " palette")
            pad = max(1, self.size.width - len(text) - len(palette)) if self.size.width else 1
            text.append(" " * pad)
            text.append_text(palette)
        return text, spans

    def on_resize(self) -> None:
        self._bindings_changed(self.screen)

    def on_click(self, event: events.Click) -> None:
        for start, end, key in self.spans:
            if start <= event.x < end:
                self.app.simulate_key(key)
                return
