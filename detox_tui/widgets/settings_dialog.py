"""Settings dialog: scorer, device, dtype and sampling (or an evaluation protocol that fixes the sampling)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.validation import ValidationResult, Validator
from textual.widgets import Button, Input, Label, Select

from detox_tui.config import EVAL_PROTOCOLS
from detox_tui.text import plain

# What backends.models.resolve_dtype accepts (kept here so the dialog does not import torch).
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
DEVICE_SUGGESTIONS: tuple[str, ...] = ("auto", "cpu", "mps", "cuda", "cuda:0", "cuda:1")
CUSTOM = "custom"
SAMPLING_FIELDS: tuple[str, ...] = ("temperature", "top_p", "top_k")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Settings:
    scorer: str  # a scorer spec (see backends/scorers/registry.py)
    device: str  # auto | cpu | mps | cuda | cuda:N
    dtype: str  # auto | float32 | float16 | bfloat16
    temperature: float  # > 0
    top_p: float  # (0, 1]
    top_k: int  # >= 0 (0 = off)
    eval_protocol: str | None = None  # None (custom sampling) or a key of EVAL_PROTOCOLS
    chat_template: str = "auto"  # auto (wrap prompts in the tokenizer's chat template when it has one) | none
    rect: float | None = None  # RECT: keep this percent of each edited weight's entries; None = off


def settings_changes(old: Settings, new: Settings) -> set[str]:
    """Which of "model" (device or dtype), "scorer" and "sampling" differ between ``old`` and ``new``."""
    changes: set[str] = set()
    if (old.device, old.dtype) != (new.device, new.dtype):
        changes.add("model")
    if old.scorer != new.scorer:
        changes.add("scorer")
    sampling = ("temperature", "top_p", "top_k", "eval_protocol")
    if any(getattr(old, name) != getattr(new, name) for name in sampling):
        changes.add("sampling")
    if (old.chat_template, old.rect) != (new.chat_template, new.rect):
        changes.add("runs")
    return changes


# ------------------------------------------------------------------------------ checks: one sentence or None


def scorer_problem(text: str) -> str | None:
    """The scorer spec's form (the registry checks variants and loads it later)."""
    spec = text.strip()
    if not spec:
        return "Type a scorer, e.g. detoxify, hf:<model id>[#label] or profanity."
    scheme, sep, rest = spec.partition(":")
    scheme = scheme.lower()
    if scheme == "detoxify":
        return None
    if scheme == "hf":
        if not sep or not rest.partition("#")[0].strip():
            return "An hf scorer names its model: hf:<model id or path>[#<toxic label>]."
        return None
    if scheme == "profanity" and not sep:
        return None
    return f"Unknown scorer '{spec}'; use detoxify[:variant|:/file.ckpt], hf:<model id>[#label] or profanity."


def device_problem(text: str) -> str | None:
    if _DEVICE.match(text.strip().lower()):
        return None
    return "The device is one of auto, cpu, mps, cuda or cuda:N (N a GPU number)."


def _float(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def temperature_problem(text: str) -> str | None:
    value = _float(text)
    if value is None or value <= 0:
        return "The temperature is a number above 0 (1 samples the model as is)."
    return None


def top_p_problem(text: str) -> str | None:
    value = _float(text)
    if value is None or not 0 < value <= 1:
        return "top-p is a number above 0 and at most 1 (1 turns nucleus sampling off)."
    return None


def rect_problem(text: str) -> str | None:
    if not text.strip():
        return None  # off
    value = _float(text)
    if value is None or not 0 < value <= 100:
        return "RECT keeps a percentage above 0 and at most 100 of each edited weight (the paper keeps 20); empty: off."
    return None


def top_k_problem(text: str) -> str | None:
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        return "top-k is a whole number, 0 or more (0 turns it off)."
    return None


class Check(Validator):
    """A validator from a function that returns a one-sentence problem or None."""

    def __init__(self, problem: Callable[[str], str | None]) -> None:
        super().__init__()
        self.problem = problem

    def validate(self, value: str) -> ValidationResult:
        problem = self.problem(value)
        return self.success() if problem is None else self.failure(problem, value)


def number(value: float) -> str:
    """1.0 -> "1", 0.9 -> "0.9": how a number is typed."""
    return f"{value:g}"


def protocol_note(name: str) -> str:
    """One line: what the protocol fixes, e.g. "rtp fixes 25 samples x 20 tokens, top-p 0.9, temperature 1"."""
    gen = EVAL_PROTOCOLS[name].get("generation", {})
    parts = []
    if "samples" in gen or "max_new_tokens" in gen:
        parts.append(f"{gen.get('samples', '?')} samples x {gen.get('max_new_tokens', '?')} tokens")
    if "top_p" in gen:
        parts.append(f"top-p {number(float(gen['top_p']))}")
    if "temperature" in gen:
        parts.append(f"temperature {number(float(gen['temperature']))}")
    if gen.get("top_k"):
        parts.append(f"top-k {gen['top_k']}")
    return f"{name} fixes {', '.join(parts)}"


FIELDS: dict[str, tuple[str, Callable[[str], str | None]]] = {
    "scorer": ("scorer", scorer_problem),
    "device": ("device", device_problem),
    "temperature": ("temperature", temperature_problem),
    "top_p": ("top-p", top_p_problem),
    "top_k": ("top-k", top_k_problem),
    "rect": ("RECT keep %", rect_problem),
}
CHAT_TEMPLATES = (("auto: the tokenizer's template", "auto"), ("none: raw prompts", "none"))


class SettingsDialog(ModalScreen[Settings | None]):
    """Returns the Settings typed (ctrl+s or Save) or None (escape or Cancel). Save refuses invalid fields."""

    DEFAULT_CSS = """
    SettingsDialog {
        align: center middle;
    }
    SettingsDialog #settings-box {
        width: 72;
        max-width: 95%;
        height: auto;
        max-height: 95%;
        padding: 0 1;
        border: thick $primary;
        border-title-align: center;
        background: $surface;
    }
    SettingsDialog .settings-row {
        height: auto;
    }
    SettingsDialog .settings-row.-first {
        margin-top: 1;
    }
    SettingsDialog .settings-label {
        width: 13;
        padding-right: 1;
    }
    SettingsDialog .settings-row Input, SettingsDialog .settings-row Select {
        width: 1fr;
    }
    SettingsDialog .settings-hint, SettingsDialog .settings-error {
        padding-left: 13;
        width: 100%;
        height: auto;
    }
    SettingsDialog .settings-hint {
        color: $text-muted;
    }
    SettingsDialog .settings-error {
        color: $error;
        display: none;
    }
    SettingsDialog .settings-error.-shown {
        display: block;
    }
    SettingsDialog #settings-buttons {
        height: auto;
        margin-top: 1;
    }
    SettingsDialog #settings-buttons Button {
        margin-right: 2;
    }
    SettingsDialog Input.-textual-compact:focus,
    SettingsDialog Select.-textual-compact:focus > SelectCurrent {
        background: $accent 30%;
    }
    SettingsDialog Input.-textual-compact.-invalid {
        background: $error 20%;
    }
    """

    BINDINGS = [
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, current: Settings, scorers: Sequence[str]) -> None:
        super().__init__()
        self.current = current
        self.scorers = list(scorers)
        protocol = current.eval_protocol if current.eval_protocol in EVAL_PROTOCOLS else None
        self._protocol: str | None = protocol
        # The custom sampling values typed, restored when the protocol goes back to "custom".
        self._custom = {
            "temperature": number(current.temperature),
            "top_p": number(current.top_p),
            "top_k": str(current.top_k),
        }

    # ------------------------------------------------------------------------------------------ layout

    def _row(self, name: str, field, first: bool = False) -> ComposeResult:
        """A labelled field, its error line below it; ``first`` starts a group with a blank line."""
        with Horizontal(classes="settings-row -first" if first else "settings-row"):
            yield Label(FIELDS[name][0] if name in FIELDS else name, classes="settings-label")
            yield field
        yield Label("", id=f"{field.id}-error", classes="settings-error")

    def compose(self) -> ComposeResult:
        cur = self.current
        with VerticalScroll(id="settings-box") as box:
            box.border_title = "Settings"
            box.border_subtitle = "ctrl+s saves, escape cancels"
            yield from self._row(
                "scorer",
                Input(
                    cur.scorer,
                    id="settings-scorer",
                    placeholder="detoxify, hf:<model id>[#label], profanity…",
                    suggester=SuggestFromList(self.scorers, case_sensitive=False),
                    validators=[Check(scorer_problem)],
                    compact=True,
                ),
                first=True,
            )
            yield Label("any scorer spec; → accepts a suggestion", classes="settings-hint")
            yield from self._row(
                "device",
                Input(
                    cur.device,
                    id="settings-device",
                    placeholder="auto, cpu, mps, cuda or cuda:N",
                    suggester=SuggestFromList(DEVICE_SUGGESTIONS, case_sensitive=False),
                    validators=[Check(device_problem)],
                    compact=True,
                ),
                first=True,
            )
            yield from self._row(
                "dtype",
                Select(
                    [(d, d) for d in DTYPES],
                    value=cur.dtype if cur.dtype in DTYPES else "auto",
                    allow_blank=False,
                    id="settings-dtype",
                    compact=True,
                ),
            )
            yield from self._row(
                "protocol",
                Select(
                    [("custom sampling", CUSTOM)] + [(name, name) for name in EVAL_PROTOCOLS],
                    value=self._protocol or CUSTOM,
                    allow_blank=False,
                    id="settings-protocol",
                    compact=True,
                ),
                first=True,
            )
            yield Label("", id="settings-protocol-note", classes="settings-hint")
            for name in SAMPLING_FIELDS:
                yield from self._row(
                    name,
                    Input(
                        self._custom[name],
                        id=f"settings-{name}",
                        type="integer" if name == "top_k" else "number",
                        validators=[Check(FIELDS[name][1])],
                        compact=True,
                    ),
                )
            yield from self._row(
                "chat prompts",
                Select(
                    CHAT_TEMPLATES,
                    value=cur.chat_template if cur.chat_template in ("auto", "none") else "auto",
                    allow_blank=False,
                    id="settings-chat",
                    compact=True,
                ),
                first=True,
            )
            yield from self._row(
                "rect",
                Input(
                    "" if cur.rect is None else number(cur.rect),
                    id="settings-rect",
                    placeholder="off (e.g. 20)",
                    validators=[Check(rect_problem)],
                    compact=True,
                ),
            )
            with Horizontal(id="settings-buttons"):
                yield Button("Save", id="settings-save", variant="primary")
                yield Button("Cancel", id="settings-cancel")

    def on_mount(self) -> None:
        self._apply_protocol(self._protocol)
        for name in ("scorer", "device", "rect", *SAMPLING_FIELDS):
            field = self.query_one(f"#settings-{name}", Input)
            if not field.disabled:
                self._show(field, field.validate(field.value))
        self.query_one("#settings-scorer", Input).focus()

    # ------------------------------------------------------------------------------------------ events

    def _show(self, field: Input, result: ValidationResult | None) -> None:
        label = self.query_one(f"#{field.id}-error", Label)
        problem = None if result is None or result.is_valid else result.failure_descriptions[0]
        label.update(plain(problem or ""))  # may quote what was typed: plain text
        label.set_class(problem is not None, "-shown")

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        if event.input.id and event.input.id.startswith("settings-"):
            self._show(event.input, event.validation_result)

    @on(Select.Changed, "#settings-protocol")
    def _protocol_changed(self, event: Select.Changed) -> None:
        name = None if event.value in (CUSTOM, Select.NULL) else str(event.value)
        if name != self._protocol:
            self._apply_protocol(name)

    def _apply_protocol(self, name: str | None) -> None:
        """A protocol shows its sampling values in disabled fields; custom restores what was typed."""
        fields = {n: self.query_one(f"#settings-{n}", Input) for n in SAMPLING_FIELDS}
        if self._protocol is None and name is not None:
            self._custom = {n: f.value for n, f in fields.items()}
        self._protocol = name
        note = self.query_one("#settings-protocol-note", Label)
        if name is None:
            for n, field in fields.items():
                field.disabled = False
                field.value = self._custom[n]
            note.update("")
            note.display = False
            return
        gen = EVAL_PROTOCOLS[name].get("generation", {})
        for n, field in fields.items():
            field.value = str(int(gen[n])) if n == "top_k" else number(float(gen[n]))
            field.disabled = True
            self._show(field, None)
        note.update(Text(protocol_note(name)))
        note.display = True

    # ------------------------------------------------------------------------------------------ answers

    def result(self) -> Settings | None:
        """The Settings typed, or None (with every problem shown inline) while any field is invalid."""
        names = ["scorer", "device", "rect"] + ([] if self._protocol else list(SAMPLING_FIELDS))
        first_bad: Input | None = None
        for name in names:
            field = self.query_one(f"#settings-{name}", Input)
            outcome = field.validate(field.value)
            self._show(field, outcome)
            if outcome is not None and not outcome.is_valid and first_bad is None:
                first_bad = field
        if first_bad is not None:
            first_bad.focus()
            return None
        value = {n: self.query_one(f"#settings-{n}", Input).value.strip() for n in FIELDS}
        return Settings(
            scorer=value["scorer"],
            device=value["device"].lower(),
            dtype=str(self.query_one("#settings-dtype", Select).value),
            temperature=float(value["temperature"]),
            top_p=float(value["top_p"]),
            top_k=int(value["top_k"]),
            eval_protocol=self._protocol,
            chat_template=str(self.query_one("#settings-chat", Select).value),
            rect=float(value["rect"]) if value["rect"] else None,
        )

    @on(Input.Submitted)
    @on(Button.Pressed, "#settings-save")
    def action_save(self) -> None:
        settings = self.result()
        if settings is None:
            self.notify("Fix the fields marked in red before saving.", severity="error")
            return
        self.dismiss(settings)

    @on(Button.Pressed, "#settings-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
