"""Prompt detail: every generation before and after the edit, each with its score."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, Static

from detox_tui.text import visible
from detox_tui.widgets.results_table import score_style


def generations_table(title: str, generations: list[str], scores: list[float]) -> Table:
    table = Table(title=title, expand=True, show_lines=False, title_justify="left")
    table.add_column("score", width=6, justify="right")
    table.add_column("continuation", ratio=1)
    for i, gen in enumerate(generations):
        score = scores[i] if i < len(scores) else None
        table.add_row(
            Text("n/a" if score is None else f"{score:.3f}", style=score_style(score)),
            # A generation is untrusted: plain text (never markup), its controls shown as escapes.
            Text(" ".join(visible(gen).split()) or "(empty)"),
        )
    if not generations:
        table.add_row("", Text("(no generations)", style="dim"))
    return table


class PromptDetail(ModalScreen[None]):
    """Modal view of one results row; escape or q closes it."""

    BINDINGS = [Binding("escape", "dismiss", "Close"), Binding("q", "dismiss", "Close", show=False)]

    def __init__(self, row: dict[str, Any]) -> None:
        super().__init__()
        self.row = row

    def compose(self) -> ComposeResult:
        row = self.row
        head = Text(f"#{row.get('idx')} ", style="bold")
        head.append(visible(row.get("prompt", "")))
        if row.get("target"):
            head.append(f"   safe target:{visible(row['target'])}", style="green")
        with VerticalScroll(id="detail-box"):
            yield Label(head, id="detail-title")
            before_gens = row.get("generations_before", row.get("generations")) or []
            before_scores = row.get("samples_before", row.get("samples")) or []
            yield Static(generations_table("before", before_gens, before_scores), id="detail-before")
            if "generations_after" in row:
                yield Static(
                    generations_table(
                        "after", row.get("generations_after") or [], row.get("samples_after") or []
                    ),
                    id="detail-after",
                )
        yield Footer()

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
