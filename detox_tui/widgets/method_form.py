"""Method form: editing method, hyperparameters prefilled from the model's preset and validated as typed."""

from __future__ import annotations

from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.validation import Function, Integer, Number, ValidationResult, Validator
from textual.widgets import Button, Input, Label, Select

from detox_tui.backends.editing.presets import CHOICES, LAYER_KEYS, METHODS
from detox_tui.errors import UserError

# Chosen in the layer picker, not typed here.
LAYER_FIELDS = ("layers", "layer")
TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")

# Run settings shown under the hyperparameters: key -> (label, default, kind).
RUN_FIELDS: dict[str, tuple[str, Any]] = {
    "samples": ("samples / prompt", 5),
    "max_new_tokens": ("max new tokens", 20),
    "threshold": ("toxic threshold", 0.1),
    "seed": ("seed", 0),
}


def validator_for(key: str, reference: Any, n_layers: int) -> list[Validator]:
    """Input validators matching how the engine checks ``key`` (see presets.validate_hparams)."""
    if isinstance(reference, bool):
        return [Function(lambda v: v.strip().lower() in TRUE + FALSE, "true or false")]
    if key in LAYER_KEYS:
        return [
            Integer(minimum=0, maximum=max(0, n_layers - 1), failure_description=f"a layer 0..{n_layers - 1}")
        ]
    if isinstance(reference, int):
        low = (
            1
            if key in ("v_num_grad_steps", "steps", "n_templates", "template_length", "max_sentences")
            else 0
        )
        return [Integer(minimum=low, failure_description=f"a whole number >= {low}")]
    if isinstance(reference, float):
        return [Number(minimum=0, failure_description="a number >= 0")]
    if isinstance(reference, str) and key in CHOICES:
        choices = CHOICES[key]
        return [Function(lambda v: v.strip() in choices, f"one of {', '.join(choices)}")]
    if isinstance(reference, str):
        return [Function(lambda v: bool(v.strip()), "not empty")]
    return []


def parse_value(text: str, reference: Any) -> Any:
    """The typed text as the preset value's type."""
    text = text.strip()
    if isinstance(reference, bool):
        return text.lower() in TRUE
    if isinstance(reference, int):
        return int(text)
    if isinstance(reference, float):
        return float(text)
    return text


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class MethodForm(Vertical):
    """Method, mode, protocol and the method's hyperparameters (prefilled from the preset for the loaded model)."""

    class MethodChanged(Message):
        def __init__(self, method: str) -> None:
            super().__init__()
            self.method = method

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.lm: Any = None
        self.preset: dict[str, Any] = {}
        self._inputs: dict[str, Input] = {}
        # Values that replace the preset's for a method (e.g. the demo's), kept across Reset and method changes.
        self.defaults: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Label("Method", classes="field-label")
            yield Select(
                [(m.upper(), m) for m in METHODS], value="memit", allow_blank=False, id="method", compact=True
            )
            yield Select(
                [("replace (safe target)", "replace"), ("erase (toxic text)", "erase")],
                value="replace",
                allow_blank=False,
                id="mode",
                compact=True,
            )
            yield Select(
                [("per-prompt", "per-prompt"), ("batch", "batch")],
                value="per-prompt",
                allow_blank=False,
                id="protocol",
                compact=True,
            )
        with Horizontal(classes="row"):
            yield Label("Hyperparameters (the model's preset)", classes="section")
            yield Button("Reset", id="hp-reset", compact=True)
        with Vertical(id="hp-fields"):
            yield Label("Hyperparameters appear when the model has loaded.", id="hp-empty", classes="dim")
            yield Vertical(id="hp-inputs")
            yield Label("Run settings", classes="section")
            with Vertical(id="run-inputs"):
                for key, (label, default) in RUN_FIELDS.items():
                    with Horizontal(classes="hp-row"):
                        yield Label(label, classes="hp-label")
                        yield Input(
                            _fmt(default),
                            id=f"run-{key}",
                            validators=validator_for(key, default, 0)
                            if key != "samples"
                            else [Integer(minimum=1)],
                            classes="hp-input",
                            compact=True,
                        )

    # ------------------------------------------------------------------ public API

    @property
    def method(self) -> str:
        return str(self.query_one("#method", Select).value)

    @property
    def mode(self) -> str:
        return str(self.query_one("#mode", Select).value)

    @property
    def protocol(self) -> str:
        return str(self.query_one("#protocol", Select).value)

    def set_model(self, lm: Any) -> None:
        """The model loaded: build the hyperparameter fields from its preset."""
        self.lm = lm
        self.reset()

    def set_method(self, method: str) -> None:
        self.query_one("#method", Select).value = method

    def set_defaults(self, method: str, hparams: dict[str, Any]) -> None:
        """Prefill ``method``'s fields with ``hparams`` instead of the preset's values (also after Reset)."""
        self.defaults[method] = dict(hparams)
        if self.lm is not None and self.method == method:
            self.reset()

    def set_run_settings(self, settings: dict[str, Any]) -> None:
        """Fill the run settings (samples, max_new_tokens, threshold, seed); an unknown key is a ValueError."""
        for key, value in settings.items():
            if key not in RUN_FIELDS:
                raise ValueError(f"unknown run setting {key!r}; known: {', '.join(RUN_FIELDS)}")
            self.query_one(f"#run-{key}", Input).value = _fmt(value)

    def reset(self) -> None:
        """Refill every field from the preset of the current method."""
        if self.lm is None:
            return
        from detox_tui.backends.editing.presets import load_preset

        try:
            self.preset = load_preset(self.lm, self.method)
        except UserError as exc:
            self.preset = {}
            self.notify(str(exc), severity="error")
        box = self.query_one("#hp-inputs", Vertical)
        box.remove_children()
        rows = []
        self._inputs = {}
        defaults = self.defaults.get(self.method, {})
        unknown = sorted(set(defaults) - set(self.preset))
        if unknown and self.preset:
            self.notify(f"{self.method} has no hyperparameter {', '.join(unknown)}.", severity="warning")
        for key, value in self.preset.items():
            if key in LAYER_FIELDS:
                continue
            field = Input(
                _fmt(defaults.get(key, value)),
                name=key,
                validators=validator_for(key, value, self.lm.n_layers),
                classes="hp-input",
                compact=True,
            )
            self._inputs[key] = field
            rows.append(Horizontal(Label(key, classes="hp-label"), field, classes="hp-row"))
        box.mount_all(rows)
        self.query_one("#hp-empty", Label).display = not rows

    def hparam_inputs(self) -> dict[str, Input]:
        return dict(self._inputs)

    def _check(self, inputs: dict[str, Input], what: str) -> None:
        for key, field in inputs.items():
            result: ValidationResult | None = field.validate(field.value)
            if result is not None and not result.is_valid:
                field.focus()
                reason = "; ".join(result.failure_descriptions) or "invalid"
                raise UserError(f"The {what} '{key}' is invalid ({field.value!r}: {reason}).")

    def hparams(self) -> dict[str, Any]:
        """The typed hyperparameters (all fields); raises UserError naming the first invalid field."""
        inputs = self.hparam_inputs()
        self._check(inputs, f"{self.method} hyperparameter")
        return {key: parse_value(field.value, self.preset[key]) for key, field in inputs.items()}

    def run_settings(self) -> dict[str, Any]:
        """samples, max_new_tokens, threshold, seed; raises UserError naming the first invalid field."""
        inputs = {key: self.query_one(f"#run-{key}", Input) for key in RUN_FIELDS}
        self._check(inputs, "setting")
        return {key: parse_value(inputs[key].value, RUN_FIELDS[key][1]) for key in RUN_FIELDS}

    # ------------------------------------------------------------------ events

    @on(Select.Changed, "#method")
    def _method_changed(self, event: Select.Changed) -> None:
        self.reset()
        self.post_message(self.MethodChanged(str(event.value)))

    @on(Button.Pressed, "#hp-reset")
    def _reset_pressed(self) -> None:
        self.reset()
        where = "their starting values" if self.defaults.get(self.method) else "the preset"
        self.notify(f"{self.method} hyperparameters reset to {where}.")
