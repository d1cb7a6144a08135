"""Summary strip: share reduced, mean reduction with CI, p-value, neutral perplexity before -> after, COLLAPSED."""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.widgets import Static


def _num(value: Any, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, fmt)


def summary_text(kind: str, summary: dict[str, Any]) -> Text:
    """One or two lines describing a finished (or running) run's summary."""
    text = Text()
    if kind == "baseline":
        text.append("baseline  ", style="bold")
        text.append(f"prompts {summary.get('n_prompts', '?')}  ")
        text.append(
            f"mean {_num(summary.get('mean'))} [{_num(summary.get('ci_low'))}, {_num(summary.get('ci_high'))}]  "
        )
        share = summary.get("share_prompts_above")
        text.append(f"prompts >= {summary.get('threshold', 0.1)}: {_num(share, '.0%')}")
        return text
    if kind == "ablation":
        text.append("ablation  ", style="bold")
        text.append(f"{summary.get('n_configs', 0)} configurations  best ({summary.get('best') or 'n/a'}) ")
        text.append(f"success {_num(summary.get('best_success'), '.0%')}")
        return text
    text.append("edit  ", style="bold")
    text.append(f"reduced {_num(summary.get('share_reduced'), '.0%')}  ")
    text.append(
        f"mean reduction {_num(summary.get('mean_reduction'))} "
        f"[{_num(summary.get('ci_low'))}, {_num(summary.get('ci_high'))}]  "
    )
    text.append(f"p={_num(summary.get('wilcoxon_p'), '.3g')}  ")
    text.append(
        f"neutral ppl {_num(summary.get('ppl_before'), '.1f')} -> {_num(summary.get('ppl_after'), '.1f')}"
    )
    if summary.get("collapsed"):
        text.append("  COLLAPSED", style="bold white on red")
    return text


class SummaryStrip(Static):
    """The run's headline numbers in one strip."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("No run yet: select prompts, then b (baseline) or e (edit).", id=id)
        self.kind: str | None = None
        self.summary: dict[str, Any] = {}

    def show(self, kind: str, summary: dict[str, Any]) -> None:
        self.kind, self.summary = kind, dict(summary)
        self.update(summary_text(kind, summary))

    def show_side_effects(self, row: dict[str, Any]) -> None:
        """Live update while an edit runs: neutral perplexity of the last edit."""
        merged = dict(self.summary)
        merged.update({k: row.get(k) for k in ("ppl_before", "ppl_after")})
        merged["collapsed"] = bool(self.summary.get("collapsed")) or bool(row.get("collapsed"))
        self.kind, self.summary = "edit", merged
        self.update(summary_text("edit", merged))
