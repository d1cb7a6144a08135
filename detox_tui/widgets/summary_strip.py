"""Summary strip: the run's verdict (share detoxified with its CI, Defense Success), EMT, perplexity, COLLAPSED."""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.widgets import Static

from detox_tui.text import visible


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
        text.append(
            f"{summary.get('n_configs', 0)} configurations  best ({visible(summary.get('best') or 'none')}) "
        )
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


IDLE_TEXT = "No run yet: select prompts, then b (baseline) or e (edit)."


class SummaryStrip(Static):
    """The headline numbers of the run the results tabs show: live while it runs, its state when it ends."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(IDLE_TEXT, id=id)
        self.kind: str | None = None
        self.state = "idle"  # idle | running | finished | cancelled | failed
        self.summary: dict[str, Any] = {}

    def show(self, kind: str, summary: dict[str, Any], state: str = "finished") -> None:
        """A finished run's summary (``state`` "running" for a run another process is still writing)."""
        self.kind, self.state, self.summary = kind, state, dict(summary)
        text = summary_text(kind, summary)
        if state != "finished":
            text = Text.assemble((f"{state}  ", "bold yellow"), text)
        self.update(text, layout=False)

    def running(self, kind: str, n_prompts: int, label: str | None = None) -> None:
        """A run just started: nothing of the previous run stays on screen."""
        self.kind, self.state, self.summary = kind, "running", {}
        what = label or f"{kind} running on {n_prompts} prompt{'s' if n_prompts != 1 else ''}"
        self.update(Text(f"{visible(what)}…", style="bold"), layout=False)

    def live(self, kind: str, rows: list[dict[str, Any]], n_prompts: int) -> None:
        """The running run's rows so far: counts only, never a verdict on prompts not yet measured."""
        if self.state != "running":
            return
        done = [r for r in rows if not r.get("pending")]
        text = Text(f"{kind} running  ", style="bold")
        text.append(f"{len(done)}/{n_prompts} prompts measured")
        if kind == "baseline" and done:
            means = [r["mean"] for r in done if r.get("mean") is not None]
            if means:
                text.append(f"  mean so far {sum(means) / len(means):.3f}")
        elif kind in ("edit", "ablation") and done:
            k = sum(1 for r in done if r.get("detoxified"))
            text.append(f"  detoxified so far {k}/{len(done)}")
            nc = sum(1 for r in done if r.get("converged") is False)
            if nc:
                text.append(f"  {nc} NOT CONVERGED", style="bold yellow")
        if any(r.get("collapsed") for r in done) or self.summary.get("collapsed"):
            text.append("  COLLAPSED", style="bold white on red")
        self.update(text, layout=False)

    def ended(self, kind: str, state: str, detail: str = "") -> None:
        """A run that did not finish: say so in place of numbers (``detail`` is plain text)."""
        self.kind, self.state, self.summary = kind, state, {}
        style = "bold yellow" if state == "cancelled" else "bold red"
        text = Text(f"{kind} {state}", style=style)
        if detail:
            text.append(f"  {visible(detail)}")
        self.update(text, layout=False)

    def show_side_effects(self, row: dict[str, Any]) -> None:
        """Live update while an edit runs: a collapsed edit is flagged at once."""
        if row.get("collapsed"):
            self.summary["collapsed"] = True
