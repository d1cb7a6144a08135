"""Rich rendering for the headless CLI: engine events as progress bars, result rows as tables."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from detox_tui.pipeline.events import Event, Failed, Log
from detox_tui.pipeline.events import Progress as ProgressEvent


class EventRenderer:
    """Turns engine events into Rich progress bars (one per stage) and log lines, on stderr."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]{task.description:<24}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=quiet,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> EventRenderer:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, event: Event) -> None:
        if isinstance(event, ProgressEvent):
            task = self._tasks.get(event.stage)
            if task is None:
                task = self.progress.add_task(event.stage, total=max(event.total, 1))
                self._tasks[event.stage] = task
            self.progress.update(task, completed=event.done, total=max(event.total, 1))
        elif isinstance(event, Log) and not self.quiet:
            style = {"warning": "yellow", "error": "red"}.get(event.level, "dim")
            self.progress.console.print(f"[{style}]{event.message}[/]")
        elif isinstance(event, Failed):
            self.progress.console.print(f"[red]{event.error}[/]")


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def _ci(summary: dict[str, Any]) -> str:
    return f"{fmt(summary.get('mean'))} [{fmt(summary.get('ci_low'))}, {fmt(summary.get('ci_high'))}]"


def baseline_table(rows: list[dict[str, Any]], threshold: float) -> Table:
    table = Table(title="Baseline toxicity of continuations (mean [95% CI])", show_lines=False)
    for col in ("#", "prompt", "category", "n", "mean [95% CI]", "max", "≥0.5", f"≥{threshold:g}"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            str(r["idx"]),
            r["prompt"],
            r.get("category") or "",
            str(r["n"]),
            _ci(r),
            fmt(r["max"]),
            fmt(r["share_above_0.5"], 2),
            fmt(r["share_above"], 2),
        )
    return table


def edit_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Toxicity before -> after the edit (mean [95% CI])")
    for col in ("#", "prompt", "config", "before", "after", "delta", "reduced", "collapsed"):
        table.add_column(col, overflow="fold")
    for r in rows:
        prompt = r["prompt"] + (" (held out)" if r.get("heldout") else "")
        table.add_row(
            str(r["idx"]),
            prompt,
            r.get("config") or "",
            _ci(r["before"]),
            _ci(r["after"]),
            fmt(r["delta"]),
            fmt(r["reduced"]),
            "[red]COLLAPSED[/]" if r["collapsed"] else "no",
        )
    return table


def ablation_table(configs: list[dict[str, Any]]) -> Table:
    table = Table(title="Layer ablation (each configuration from the original weights)")
    for col in (
        "layers",
        "success",
        "mean reduction [95% CI]",
        "wilcoxon p",
        "ppl before -> after",
        "collapsed",
    ):
        table.add_column(col)
    for c in configs:
        table.add_row(
            c["key"],
            f"{100 * (c.get('success') or 0):.1f}%",
            f"{fmt(c.get('mean_reduction'))} [{fmt(c.get('ci_low'))}, {fmt(c.get('ci_high'))}]",
            fmt(c.get("wilcoxon_p"), 4),
            f"{fmt(c.get('ppl_before'), 2)} -> {fmt(c.get('ppl_after'), 2)}",
            "[red]COLLAPSED[/]" if c.get("collapsed") else "no",
        )
    return table


def summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    if "share_reduced" in summary:
        lines.append(
            f"share of edited prompts reduced: {100 * summary['share_reduced']:.1f}% "
            f"(collapsed edits count as failures); mean reduction {fmt(summary.get('mean_reduction'))} "
            f"[{fmt(summary.get('ci_low'))}, {fmt(summary.get('ci_high'))}], "
            f"Wilcoxon p = {fmt(summary.get('wilcoxon_p'), 4)}"
        )
    if "defense_success" in summary:
        line = f"defense success: {100 * summary['defense_success']:.1f}% of edited prompts below 0.5"
        for name, share in (summary.get("defense_generalisation") or {}).items():
            line += f"; {name.replace('test input of ', '')}: {100 * share:.1f}%"
        lines.append(line)
    if "ppl_before" in summary:
        flag = " [red]COLLAPSED[/]" if summary.get("collapsed") else ""
        lines.append(
            f"neutral perplexity {fmt(summary['ppl_before'], 2)} -> {fmt(summary['ppl_after'], 2)}{flag}"
        )
    if "heldout" in summary and summary["heldout"]:
        h = summary["heldout"]
        lines.append(f"held-out prompts reduced: {100 * (h.get('share_reduced') or 0):.1f}% (never edited)")
    return lines
