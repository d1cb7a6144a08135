"""Prompt picker: filter-as-you-type, category filter, select all / none / flagged, selected count."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Input, Label, Select, SelectionList
from textual.widgets.selection_list import Selection

from detox_tui.prompts.base import PromptItem
from detox_tui.text import visible

ALL_CATEGORIES = "__all__"


def _label(item: PromptItem, mean: float | None) -> Text:
    text = Text()
    if mean is not None:
        text.append(
            f"{mean:4.2f} ", style="bold red" if mean >= 0.5 else "yellow" if mean >= 0.1 else "green"
        )
    # Prompts, categories and targets are untrusted: plain text on one line, escapes visible.
    if item.category:
        text.append(f"[{visible(item.category)}] ", style="dim")
    text.append(visible(item.prompt))
    if item.target:
        text.append(" ->", style="dim")
        text.append(visible(item.target), style="green")
    return text


class PromptFilter(Input):
    """The filter field: ctrl+a / ctrl+n select all / no prompts here too (Input's own ctrl+a would move the
    cursor to the start; home still does). Every other editing key is Input's."""

    BINDINGS = [
        Binding("ctrl+a", "app.select_all", "Select all prompts", show=False),
        Binding("ctrl+n", "app.select_none", "Select no prompts", show=False),
    ]


class PromptPicker(Vertical):
    """Choose the prompts a run uses; keeps the selection (by index) across filter changes."""

    class Changed(Message):
        """The selection changed; ``count`` prompts are selected."""

        def __init__(self, count: int) -> None:
            super().__init__()
            self.count = count

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.items: list[PromptItem] = []
        self.selected: set[int] = set()
        self.means: dict[int, float] = {}
        self.threshold: float = 0.1
        self._syncing = False

    def compose(self) -> ComposeResult:
        with Horizontal(id="prompt-filters"):
            yield PromptFilter(
                placeholder="filter prompts (type to filter)", id="prompt-filter", compact=True
            )
            yield Select(
                [("all categories", ALL_CATEGORIES)],
                value=ALL_CATEGORIES,
                allow_blank=False,
                id="prompt-category",
                compact=True,
            )
        yield SelectionList[int](id="prompt-list")
        with Horizontal(id="prompt-buttons"):
            yield Button("All", id="prompt-all", compact=True)
            yield Button("None", id="prompt-none", compact=True)
            yield Button("Flagged", id="prompt-flagged", compact=True, disabled=True)
            yield Label("0 of 0 selected", id="prompt-count")

    # ------------------------------------------------------------------ public API

    def set_items(self, items: Sequence[PromptItem], select_all: bool = True) -> None:
        """Show ``items`` (a new prompt set); all are selected unless ``select_all`` is False."""
        self.items = list(items)
        self.means = {}
        self.selected = set(range(len(self.items))) if select_all else set()
        cats = sorted({it.category for it in self.items if it.category})
        select = self.query_one("#prompt-category", Select)
        select.set_options([("all categories", ALL_CATEGORIES), *[(Text(visible(c)), c) for c in cats]])
        select.value = ALL_CATEGORIES
        self.query_one("#prompt-flagged", Button).disabled = True
        self.refresh_list()

    def selected_items(self) -> list[PromptItem]:
        """The selected prompts in their original order."""
        return [self.items[i] for i in sorted(self.selected)]

    def set_baseline(self, means: Mapping[str, float], threshold: float) -> None:
        """Record baseline means (by prompt text) so prompts can be flagged (mean >= threshold)."""
        self.threshold = threshold
        self.means = {i: float(means[it.prompt]) for i, it in enumerate(self.items) if it.prompt in means}
        self.query_one("#prompt-flagged", Button).disabled = not self.means
        self.refresh_list()

    def flagged(self) -> list[int]:
        return [i for i, m in self.means.items() if m >= self.threshold]

    def select_all(self) -> None:
        """Select every prompt the current filter shows."""
        self.selected |= set(self.visible_indices())
        self.refresh_list()

    def select_none(self) -> None:
        """Deselect every prompt the current filter shows."""
        self.selected -= set(self.visible_indices())
        self.refresh_list()

    def select_flagged(self) -> bool:
        """Select exactly the prompts whose baseline mean is at or above the threshold; False without a baseline."""
        if not self.means:
            return False
        self.selected = set(self.flagged())
        self.refresh_list()
        return True

    def visible_indices(self) -> list[int]:
        """Indices of the prompts that pass the text and category filters."""
        needle = self.query_one("#prompt-filter", Input).value.strip().lower()
        category = self.query_one("#prompt-category", Select).value
        out = []
        for i, it in enumerate(self.items):
            if category not in (ALL_CATEGORIES, Select.NULL) and it.category != category:
                continue
            hay = f"{it.prompt} {it.target or ''} {it.category or ''}".lower()
            if needle and needle not in hay:
                continue
            out.append(i)
        return out

    def refresh_list(self) -> None:
        lst = self.query_one("#prompt-list", SelectionList)
        highlighted = lst.highlighted
        self._syncing = True
        try:
            lst.clear_options()
            lst.add_options(
                [
                    Selection(_label(self.items[i], self.means.get(i)), i, i in self.selected)
                    for i in self.visible_indices()
                ]
            )
        finally:
            self._syncing = False
        if lst.option_count:
            lst.highlighted = min(highlighted or 0, lst.option_count - 1)
        self._update_count()

    # ------------------------------------------------------------------ events

    def _update_count(self) -> None:
        flagged = f", {len(self.flagged())} flagged" if self.means else ""
        self.query_one("#prompt-count", Label).update(
            f"{len(self.selected)} of {len(self.items)} selected{flagged}"
        )
        self.post_message(self.Changed(len(self.selected)))

    @on(Input.Changed, "#prompt-filter")
    @on(Select.Changed, "#prompt-category")
    def _filter_changed(self) -> None:
        if self.items:
            self.refresh_list()

    @on(SelectionList.SelectedChanged, "#prompt-list")
    def _selection_changed(self, event: SelectionList.SelectedChanged) -> None:
        if self._syncing:
            return
        shown = set(self.visible_indices())
        now = set(event.selection_list.selected)
        self.selected = (self.selected - shown) | now
        self._update_count()

    @on(Button.Pressed, "#prompt-all")
    def _all(self) -> None:
        self.select_all()

    @on(Button.Pressed, "#prompt-none")
    def _none(self) -> None:
        self.select_none()

    @on(Button.Pressed, "#prompt-flagged")
    def _flagged(self) -> None:
        self.select_flagged()
