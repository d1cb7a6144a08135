"""Trace panel: prompt and continuation to trace, the trace kind, and the resulting layers x tokens heatmap."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.validation import Function, Integer
from textual.widgets import Input, Label, Select

from detox_tui.errors import UserError
from detox_tui.text import visible
from detox_tui.widgets.heatmap import Heatmap

KINDS = ("hidden", "mlp", "attn")


@dataclass
class TraceRequest:
    prompt: str
    continuation: str
    kind: str
    window: int
    subject: str | None = None


class TracePanel(Vertical):
    """What to trace (prefilled from the highlighted prompt) and the heatmap of the last trace."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._exact: dict[str, str] = {}  # what a prefilled field shows -> the exact text it stands for

    def compose(self) -> ComposeResult:
        not_empty = [Function(lambda v: bool(v.strip()), "must not be empty")]
        with Horizontal(classes="row"):
            yield Label("prompt", classes="field-label")
            yield Input(placeholder="prompt to trace", id="trace-prompt", validators=not_empty, compact=True)
        with Horizontal(classes="row"):
            yield Label("continuation", classes="field-label")
            yield Input(
                placeholder="the (toxic) continuation whose probability is traced",
                id="trace-cont",
                validators=not_empty,
                compact=True,
            )
        with Horizontal(classes="row"):
            yield Label("kind", classes="field-label")
            yield Select(
                [(k, k) for k in KINDS], value="mlp", allow_blank=False, id="trace-kind", compact=True
            )
            yield Label(" window", classes="short-label")
            yield Input(
                "3", id="trace-window", validators=[Integer(minimum=1)], classes="short-input", compact=True
            )
        yield Label("", id="trace-peak")
        with VerticalScroll(id="trace-scroll"):
            yield Heatmap(id="heatmap")

    def prefill(self, prompt: str, continuation: str | None, subject: str | None = None) -> None:
        """Fill the fields from a prompt (keeps what the user typed if the prompt is the same).

        The fields show the prompt and continuation with their control characters as escapes (an Input writes
        its value to the terminal as it is); left unedited, the trace still uses the exact text."""
        field = self.query_one("#trace-prompt", Input)
        shown = visible(prompt)
        if field.value != shown:
            self._exact = {shown: prompt, visible(continuation or ""): continuation or ""}
            field.value = shown
            self.query_one("#trace-cont", Input).value = visible(continuation or "")
        self.subject = subject

    def _text(self, wid: str) -> str:
        """A field's text: the exact prefilled text when the field still shows it, else what was typed."""
        value = self.query_one(wid, Input).value
        return self._exact.get(value, value)

    def request(self) -> TraceRequest:
        """The trace to run; raises UserError naming the first empty or invalid field."""
        for wid, name in (
            ("#trace-prompt", "prompt"),
            ("#trace-cont", "continuation"),
            ("#trace-window", "window"),
        ):
            field = self.query_one(wid, Input)
            result = field.validate(field.value)
            if result is not None and not result.is_valid:
                field.focus()
                raise UserError(f"The trace {name} is invalid: {'; '.join(result.failure_descriptions)}.")
        cont = self._text("#trace-cont")
        return TraceRequest(
            prompt=self._text("#trace-prompt"),
            continuation=cont if cont.startswith(" ") else " " + cont,
            kind=str(self.query_one("#trace-kind", Select).value),
            window=int(self.query_one("#trace-window", Input).value),
            subject=getattr(self, "subject", None),
        )

    def show_result(self, tokens: list[str], scores, peak: list[int], title: str) -> None:
        self.query_one(Heatmap).set_trace(tokens, scores, title)
        self.query_one("#trace-peak", Label).update(
            f"peak layers: {','.join(map(str, peak))}  (layer preset 'peak of causal trace' now available)"
        )
