"""Layer picker: one toggle per block, presets (method default, seed ablation set, trace peak), ablation list."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Button, Label, OptionList, Select

PRESET_DEFAULT = "default"
PRESET_TRACE = "trace"


def config_key(layers: Sequence[int]) -> str:
    """[4, 5, 6] -> "4,5,6"."""
    return ",".join(str(x) for x in sorted(set(layers)))


def seed_configs(n_layers: int) -> list[list[int]]:
    """The engine's default ablation configurations for this depth (the same as `ablate` without --configs)."""
    from detox_tui.backends.editing.presets import default_ablation_configs

    return default_ablation_configs(n_layers)


class LayerToggles(Widget, can_focus=True):
    """A compact row of toggles, one per block: left/right to move, space to toggle."""

    BINDINGS = [
        Binding("left", "move(-1)", "Prev layer", show=False),
        Binding("right", "move(1)", "Next layer", show=False),
        Binding("space", "toggle", "Toggle"),
        Binding("enter", "toggle", "Toggle layer", show=False),
    ]

    cursor = reactive(0)

    class Changed(Message):
        def __init__(self, layers: list[int]) -> None:
            super().__init__()
            self.layers = layers

    def __init__(self, n_layers: int = 0, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.n_layers = n_layers
        self.selected: set[int] = set()

    def set_layers(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.selected = {x for x in self.selected if x < n_layers}
        self.cursor = min(self.cursor, max(0, n_layers - 1))
        self.refresh(layout=True)

    def set_selected(self, layers: Sequence[int]) -> None:
        self.selected = {int(x) for x in layers if 0 <= int(x) < self.n_layers}
        self.refresh()
        self.post_message(self.Changed(sorted(self.selected)))

    def toggle(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            return
        self.selected ^= {layer}
        self.refresh()
        self.post_message(self.Changed(sorted(self.selected)))

    def action_move(self, step: int) -> None:
        if self.n_layers:
            self.cursor = (self.cursor + step) % self.n_layers

    def action_toggle(self) -> None:
        self.toggle(self.cursor)

    def watch_cursor(self) -> None:
        self.refresh()

    def _cell_width(self) -> int:
        return len(str(max(0, self.n_layers - 1))) + 2

    def render(self) -> Text:
        if not self.n_layers:
            return Text("(the model is loading: layers appear when it is ready)", style="dim")
        text = Text()
        width = max(1, self.size.width or 80)
        cell = self._cell_width() + 1
        per_line = max(1, width // cell)
        for layer in range(self.n_layers):
            if layer and layer % per_line == 0:
                text.append("\n")
            on_ = layer in self.selected
            label = f"{layer:>{cell - 3}}"
            style = "bold black on green" if on_ else "dim"
            if layer == self.cursor and self.has_focus:
                style += " reverse"
            text.append(f"[{label}]" if on_ else f" {label} ", style=style)
            text.append(" ")
        return text

    def get_content_height(self, container, viewport, width: int) -> int:
        if not self.n_layers:
            return 1
        per_line = max(1, width // (self._cell_width() + 1))
        return -(-self.n_layers // per_line)

    def on_click(self, event) -> None:
        cell = self._cell_width() + 1
        per_line = max(1, self.size.width // cell)
        layer = event.y * per_line + event.x // cell
        if 0 <= layer < self.n_layers:
            self.cursor = layer
            self.toggle(layer)

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()


class LayerPicker(Vertical):
    """Layers to edit (toggles + presets) and the list of layer configurations for an ablation."""

    class Changed(Message):
        def __init__(self, layers: list[int]) -> None:
            super().__init__()
            self.layers = layers

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.n_layers = 0
        self.default_layers: list[int] = []
        self.trace_peak: list[int] = []
        self.configs: list[list[int]] = []

    def compose(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Label("Layers", classes="field-label")
            yield Select(self._preset_options(), prompt="preset", id="layer-preset", compact=True)
            yield Label("", id="layer-summary")
        yield LayerToggles(id="layer-toggles")
        with Horizontal(classes="row"):
            yield Label("Ablation", classes="field-label")
            yield Button("Add selection", id="abl-add", compact=True)
            yield Button("Remove", id="abl-remove", compact=True)
            yield Button("Seed set", id="abl-seed", compact=True)
        yield OptionList(id="abl-list")

    def _preset_options(self) -> list[tuple[str, str]]:
        opts = [("method default", PRESET_DEFAULT)]
        opts += [(f"({config_key(c)})", config_key(c)) for c in seed_configs(self.n_layers or 48)]
        if self.trace_peak:
            opts.append((f"peak of causal trace ({config_key(self.trace_peak)})", PRESET_TRACE))
        return opts

    # ------------------------------------------------------------------ public API

    @property
    def selected_layers(self) -> list[int]:
        return sorted(self.query_one(LayerToggles).selected)

    def set_model(self, n_layers: int, default_layers: Sequence[int]) -> None:
        """Called once the model is loaded: one toggle per block, the method's default selected."""
        self.n_layers = n_layers
        self.query_one(LayerToggles).set_layers(n_layers)
        self.set_default(default_layers, select=True)
        self._refresh_presets()
        if not self.configs:
            self.configs = seed_configs(n_layers)
            self._refresh_configs()

    def set_default(self, layers: Sequence[int], select: bool = False) -> None:
        self.default_layers = sorted({int(x) for x in layers})
        if select:
            self.set_layers(self.default_layers)

    def set_layers(self, layers: Sequence[int]) -> None:
        self.query_one(LayerToggles).set_selected(layers)

    def toggle(self, layer: int) -> None:
        self.query_one(LayerToggles).toggle(layer)

    def set_trace_peak(self, layers: Sequence[int]) -> None:
        self.trace_peak = sorted(int(x) for x in layers)
        self._refresh_presets()

    def apply_preset(self, value: str) -> None:
        if value == PRESET_DEFAULT:
            self.set_layers(self.default_layers)
        elif value == PRESET_TRACE:
            self.set_layers(self.trace_peak)
        else:
            self.set_layers([int(x) for x in value.split(",")])

    def add_config(self, layers: Sequence[int] | None = None) -> bool:
        cfg = sorted(set(self.selected_layers if layers is None else layers))
        if not cfg or cfg in self.configs:
            return False
        self.configs.append(cfg)
        self._refresh_configs()
        return True

    def set_configs(self, configs: Sequence[Sequence[int]]) -> None:
        """Replace the ablation list (layers outside the model are dropped, as are configurations left empty)."""
        self.configs = []
        for cfg in configs:
            kept = sorted({int(x) for x in cfg if 0 <= int(x) < self.n_layers})
            if kept and kept not in self.configs:
                self.configs.append(kept)
        self._refresh_configs()

    def remove_config(self, index: int | None = None) -> bool:
        lst = self.query_one("#abl-list", OptionList)
        index = lst.highlighted if index is None else index
        if index is None or not 0 <= index < len(self.configs):
            return False
        del self.configs[index]
        self._refresh_configs()
        return True

    # ------------------------------------------------------------------ internals

    def _refresh_presets(self) -> None:
        self.query_one("#layer-preset", Select).set_options(self._preset_options())

    def _refresh_configs(self) -> None:
        lst = self.query_one("#abl-list", OptionList)
        lst.clear_options()
        lst.add_options([f"({config_key(c)})" for c in self.configs])
        self.query_one("#abl-remove", Button).disabled = not self.configs

    @on(LayerToggles.Changed)
    def _toggled(self, event: LayerToggles.Changed) -> None:
        event.stop()
        label = f"selected: {config_key(event.layers)}" if event.layers else "no layer selected"
        self.query_one("#layer-summary", Label).update(label)
        self.post_message(self.Changed(event.layers))

    @on(Select.Changed, "#layer-preset")
    def _preset(self, event: Select.Changed) -> None:
        if event.value is not Select.NULL:
            self.apply_preset(str(event.value))

    @on(Button.Pressed, "#abl-add")
    def _add(self) -> None:
        if not self.add_config():
            self.notify("Select layers not already in the ablation list first.", severity="warning")

    @on(Button.Pressed, "#abl-remove")
    def _remove(self) -> None:
        self.remove_config()

    @on(Button.Pressed, "#abl-seed")
    def _seed(self) -> None:
        for cfg in seed_configs(self.n_layers):
            if cfg not in self.configs:
                self.configs.append(cfg)
        self._refresh_configs()
