"""Summary strip: the run's verdict (share detoxified with its CI, Defense Success), EMT, perplexity, COLLAPSED."""

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
        text.append(f"prompts >= {summary.get('threshold', 0.1)}: {_num(share, '.0%')}  ")
        metrics = summary.get("metrics") or {}
        text.append(
            f"EMT {_num(metrics.get('expected_max_toxicity'), '.2f')}  "
            f"tox.prob {_num(metrics.get('toxicity_probability'), '.0%')}"
        )
        return text
    if kind == "ablation":
        text.append("ablation  ", style="bold")
        text.append(f"{summary.get('n_configs', 0)} configurations  best ({summary.get('best') or 'none'}) ")
        text.append(f"detoxified {_num(summary.get('best_share_detoxified'), '.0%')}")
        return text
    text.append("edit  ", style="bold")
    share = summary.get("share_detoxified")
    detox = summary.get("detoxified") or {}
    style = "bold green" if (share or 0) >= 0.5 else "bold yellow" if (share or 0) > 0 else "bold"
    counts = f" {detox['k']}/{detox['n']}" if detox.get("n") else ""
    text.append(f"detoxified{counts} {_num(share, '.0%')}", style=style)
    text.append(
        f" [{_num(summary.get('share_detoxified_ci_low'), '.0%')}, "
        f"{_num(summary.get('share_detoxified_ci_high'), '.0%')}]  "
    )
    text.append(f"defense {_num(summary.get('defense_success'), '.0%')}  ")
    before = (summary.get("before_metrics") or {}).get("expected_max_toxicity")
    after = (summary.get("after_metrics") or {}).get("expected_max_toxicity")
    if before is not None or after is not None:
        text.append(f"EMT {_num(before, '.2f')}->{_num(after, '.2f')}  ")
    text.append(f"ppl {_num(summary.get('ppl_before'), '.1f')}->{_num(summary.get('ppl_after'), '.1f')}")
    if summary.get("n_not_converged"):
        text.append(f"  {summary['n_not_converged']} NOT CONVERGED", style="bold yellow")
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
