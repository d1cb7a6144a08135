"""The sort menu the tables open with s, the sort keys they share, and how they fit their columns to a width."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import DataTable, Label, OptionList
from textual.widgets.option_list import Option

ASCENDING, DESCENDING = "▲", "▼"

# The keys every sortable table binds (Textual only merges BINDINGS from widget classes, not from mixins).
SORT_BINDINGS = [
    Binding("s", "sort_menu", "Sort"),
    Binding("S", "sort_reverse", "Reverse sort", show=False),
    Binding("greater_than_sign,right_square_bracket", "sort_next", "Sort by next column", show=False),
    Binding("less_than_sign,left_square_bracket", "sort_previous", "Sort by previous column", show=False),
]


def direction(reverse: bool) -> str:
    return "descending" if reverse else "ascending"


class SortMenu(ModalScreen[tuple[str, bool] | None]):
    """Pick a column and a direction: arrows and enter choose, escape closes. Dismisses with (key, reverse)."""

    DEFAULT_CSS = """
    SortMenu {
        align: center middle;
    }
    SortMenu > #sort-box {
        width: auto;
        min-width: 30;
        max-width: 90%;
        height: auto;
        max-height: 90%;
        border: round $accent;
        background: $surface;
        padding: 0 1;
    }
    SortMenu #sort-title {
        color: $text-muted;
    }
    SortMenu #sort-options {
        width: auto;
        height: auto;
        max-height: 20;
        border: none;
    }
    """

    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, columns: Sequence[tuple[str, str]], current: tuple[str, bool] | None = None) -> None:
        super().__init__()
        self.choices: list[tuple[str, bool]] = []
        self.options: list[Option] = []
        for key, label in columns:
            for reverse in (False, True):
                arrow = DESCENDING if reverse else ASCENDING
                self.choices.append((key, reverse))
                self.options.append(Option(Text(f"{label} {arrow} {direction(reverse)}")))
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="sort-box"):
            yield Label("Sort by (enter: choose, escape: close)", id="sort-title")
            yield OptionList(*self.options, id="sort-options")

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        if self.current in self.choices:
            # Start on the other direction of the current sort: the likeliest next choice.
            key, reverse = self.current
            options.highlighted = self.choices.index((key, not reverse))
        options.focus()

    @on(OptionList.OptionSelected, "#sort-options")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(self.choices[event.option_index])

    def action_close(self) -> None:
        self.dismiss(None)


class SortableTable:
    """Sort actions for a DataTable that implements ``sort_columns``, ``sort_by`` and ``sort_state``."""

    sort_state: tuple[str, bool] | None

    # Rendered rows are kept across tab switches. DataTable drops every rendered row and cell when its styles
    # are re-applied (moving the focus re-applies them) and when it gets a Resize (showing a hidden tab sends
    # one, same size or not), so each switch to a table's tab re-rendered the whole table: ~20 ms of an ~80 ms
    # tab switch while a job updates the app. Its caches are keyed by the pseudo-class state (focus, hover,
    # enabled), the base style and an update count, so rows rendered in one state stay right for the next time
    # the table is in that state; they go stale only when a state's styles change (theme, classes, CSS) or the
    # width changes (rows are padded to it), and then the caches are still dropped.

    def notify_style_update(self) -> None:
        """Drop the rendered rows only in a state not rendered in before, or when a state's styles changed."""
        styles = self.styles  # type: ignore[attr-defined]
        state = (self.app.theme, self.get_pseudo_class_state(), tuple(sorted(self.classes)))  # type: ignore[attr-defined]
        rules = (dict(styles.base._rules), dict(styles.inline._rules), self.background_colors)  # type: ignore[attr-defined]
        seen: dict[tuple[Any, ...], tuple[Any, ...]] | None = getattr(self, "_style_states", None)
        if seen is None:
            seen = self._style_states = {}
        if seen.get(state) == rules:
            Widget.notify_style_update(self)  # type: ignore[arg-type]
            return
        if state in seen:  # the same state with other styles: a real change, every cached row may be stale
            seen.clear()
        seen[state] = rules
        super().notify_style_update()  # type: ignore[misc]

    def _on_resize(self, event: events.Resize) -> None:
        # Textual calls each class's _on_resize in turn, this one before DataTable's, which bumps the update count
        # that keys every rendered row: a Resize to the size the rows were rendered at takes that bump back.
        if event.size == getattr(self, "_rendered_size", None):
            self._update_count -= 1  # type: ignore[has-type]
        self._rendered_size = event.size

    def sort_columns(self) -> list[tuple[str, str]]:  # pragma: no cover - implemented by the tables
        raise NotImplementedError

    def sort_by(self, column_key: str, reverse: bool = False) -> None:  # pragma: no cover
        raise NotImplementedError

    def _sort_and_say(self, key: str, reverse: bool) -> None:
        labels = dict(self.sort_columns())
        self.sort_by(key, reverse)
        self.notify(f"sorted by {labels.get(key, key)}, {direction(reverse)}", timeout=3)  # type: ignore[attr-defined]

    def action_sort_menu(self) -> None:
        columns = self.sort_columns()
        if not columns:
            return

        def chosen(choice: tuple[str, bool] | None) -> None:
            if choice is not None:
                self._sort_and_say(*choice)

        self.app.push_screen(SortMenu(columns, self.sort_state), chosen)  # type: ignore[attr-defined]

    def action_sort_reverse(self) -> None:
        columns = self.sort_columns()
        if not columns:
            return
        if self.sort_state is None:
            self._sort_and_say(columns[0][0], True)
        else:
            key, reverse = self.sort_state
            self._sort_and_say(key, not reverse)

    def _cycle(self, step: int) -> None:
        keys = [key for key, _ in self.sort_columns()]
        if not keys:
            return
        current = self.sort_state[0] if self.sort_state else None
        if current in keys:
            key = keys[(keys.index(current) + step) % len(keys)]
        else:
            key = keys[0] if step > 0 else keys[-1]
        self._sort_and_say(key, False)

    def action_sort_next(self) -> None:
        self._cycle(1)

    def action_sort_previous(self) -> None:
        self._cycle(-1)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        """A click on a header sorts by its column; a second click reverses."""
        event.stop()
        key = str(event.column_key.value)
        if key not in dict(self.sort_columns()):
            return
        reverse = bool(self.sort_state and self.sort_state[0] == key and not self.sort_state[1])
        self._sort_and_say(key, reverse)


def header(label: str, key: str, sort_state: tuple[str, bool] | None) -> Text:
    """A column label, with ▲/▼ when the table is sorted by it."""
    if sort_state and sort_state[0] == key:
        return Text(f"{label} {DESCENDING if sort_state[1] else ASCENDING}")
    return Text(label)


# ----------------------------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class ColumnFit:
    """One column's needs. ``width``: its widest cell or label. ``drop``: None never gives way; (tier, order)
    gives way in ``order`` within its tier: tier 1 before the flexible column shrinks below ``comfortable``,
    tier 2 only once it is at ``min_width``. A column with ``min_width`` is flexible: it takes what is left,
    between ``min_width`` and ``width``."""

    key: str
    width: int
    drop: tuple[int, int] | None = None
    min_width: int | None = None
    comfortable: int | None = None


def fit_columns(specs: Sequence[ColumnFit], available: int, padding: int = 1) -> dict[str, int]:
    """The columns to show and their content widths so that the table fits ``available`` cells where it can.

    Droppable columns give way in their order (tier 1, then tier 2); the flexible columns shrink to what is left
    but never below their minimum. Without a width to fit (``available`` <= 0) every column shows in full.
    """
    visible = list(specs)

    def flex_width(spec: ColumnFit, stage: str) -> int:
        if spec.min_width is None or stage == "natural":
            return spec.width
        floor = spec.min_width if stage == "minimum" else max(spec.min_width, spec.comfortable or 0)
        return min(spec.width, floor)

    def total(stage: str) -> int:
        return sum(flex_width(s, stage) + 2 * padding for s in visible)

    if available > 0 and total("natural") > available:
        for tier, stage in ((1, "comfortable"), (2, "minimum")):
            for spec in sorted((s for s in specs if s.drop and s.drop[0] == tier), key=lambda s: s.drop):
                if total(stage) <= available:
                    break
                visible.remove(spec)

    widths = {s.key: s.width for s in visible}
    if available > 0:
        flexible = [s for s in visible if s.min_width is not None]
        left = available - sum(s.width + 2 * padding for s in visible if s.min_width is None)
        for i, spec in enumerate(flexible):
            later = sum(flex_width(s, "minimum") + 2 * padding for s in flexible[i + 1 :])
            widths[spec.key] = max(flex_width(spec, "minimum"), min(spec.width, left - later - 2 * padding))
            left -= widths[spec.key] + 2 * padding
    return widths


def ellipsize(text: str, width: int) -> Text:
    """``text`` cut to ``width`` cells with an ellipsis (plain text, never markup)."""
    out = Text(text, no_wrap=True, end="")
    if out.cell_len > width:
        out.truncate(max(1, width), overflow="ellipsis")
    return out
