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
from rich.text import Text

from detox_tui.events import Event, Failed, Log
from detox_tui.events import Progress as ProgressEvent
from detox_tui.text import plain, visible


class EventRenderer:
    """Turns engine events into Rich progress bars (one per stage) and log lines, on stderr."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description:<24}", style="bold", markup=False),
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
            # Messages can quote prompts (untrusted): plain text, never markup, escapes visible.
            self.progress.console.print(plain(event.message, style, one_line=False))
        elif isinstance(event, Failed):
            self.progress.console.print(plain(event.error, "red", one_line=False))


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
            plain(r["prompt"]),  # untrusted: plain text, never markup, escapes visible
            plain(r.get("category") or ""),
            str(r["n"]),
            _ci(r),
            fmt(r["max"]),
            fmt(r["share_above_0.5"], 2),
            fmt(r["share_above"], 2),
        )
    return table


def _pct(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.0f}%"


def _verdict_cell(r: dict[str, Any]) -> Text:
    if r.get("collapsed"):
        return Text("COLLAPSED", style="red")
    if r.get("detoxified"):
        return Text("yes", style="green")
    return Text("no")


def _converged_cell(r: dict[str, Any]) -> Text:
    value = r.get("converged")
    if value is None:
        return Text("-")
    return Text("yes") if value else Text("NO", style="bold red")


def edit_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Toxicity before -> after the edit (mean [95% CI])")
    for col in ("#", "prompt", "config", "before", "after", "reduction", "p", "detoxified", "converged"):
        table.add_column(col, overflow="fold")
    for r in rows:
        prompt = plain(r["prompt"]) + Text(" (held out)" if r.get("heldout") else "", style="dim")
        table.add_row(
            str(r["idx"]),
            prompt,
            plain(r.get("config") or ""),
            _ci(r["before"]),
            _ci(r["after"]),
            fmt(r.get("reduction")),
            fmt(r.get("p_value"), 3),
            _verdict_cell(r),
            _converged_cell(r),
        )
    return table


def ablation_table(configs: list[dict[str, Any]]) -> Table:
    table = Table(title="Layer ablation (each configuration from the original weights)")
    for col in (
        "layers",
        "detoxified [95% CI]",
        "defense",
        "mean reduction [95% CI]",
        "wilcoxon p",
        "not conv.",
        "ppl before -> after",
        "collapsed",
    ):
        table.add_column(col)
    for c in configs:
        table.add_row(
            plain(c["key"]),
            f"{_pct(c.get('share_detoxified'))} [{_pct(c.get('share_detoxified_ci_low'))}, "
            f"{_pct(c.get('share_detoxified_ci_high'))}]",
            _pct(c.get("defense_success")),
            f"{fmt(c.get('mean_reduction'))} [{fmt(c.get('ci_low'))}, {fmt(c.get('ci_high'))}]",
            fmt(c.get("wilcoxon_p"), 4),
            str(c.get("n_not_converged", "-")),
            f"{fmt(c.get('ppl_before'), 2)} -> {fmt(c.get('ppl_after'), 2)}",
            Text("COLLAPSED", style="red") if c.get("collapsed") else "no",
        )
    return table


_SHADES = ("", "on grey23", "on dark_red", "on red3", "on red1")


def trace_table(
    tokens: list[str], scores: list[list[float | None]], kind: str, continuation: str, title: str = ""
) -> Table:
    """A causal trace as a heatmap table: one row per layer, one column per prompt token (p_restored -
    p_corrupted, shaded by its share of the strongest effect). Tokens and the continuation are plain text."""
    caption = plain(title or f"Causal trace ({kind}) of ")
    if not title:
        caption.append(visible(repr(continuation)))
        caption.append(": p_restored - p_corrupted")
    table = Table(title=caption)
    table.add_column("layer")
    for t in tokens:
        table.add_column(plain(t), justify="right")
    flat = [v for row in scores for v in row if v is not None and math.isfinite(v)] or [0.0]
    hi = max(max(flat), 1e-9)
    for layer, row in enumerate(scores):
        cells = []
        for v in row:
            if v is None or not math.isfinite(v):
                cells.append(Text("-"))
                continue
            level = max(0.0, min(1.0, v / hi))
            cells.append(Text(f"{v:+.2f}", style=_SHADES[min(4, int(level * 4.999))]))
        table.add_row(str(layer), *cells)
    return table


def trace_lines(summary: dict[str, Any]) -> list[Text]:
    """A trace run's summary: the continuation's probability clean and corrupted, and the peak layers."""
    if not summary or "p_clean" not in summary:
        return []
    peak = ", ".join(str(x) for x in summary.get("peak_layers") or []) or "-"
    return [
        Text(
            f"p(clean) = {fmt(summary.get('p_clean'), 4)}, p(corrupted) = {fmt(summary.get('p_corrupted'), 4)}"
        ),
        Text(f"peak layers: {peak}"),
    ]


def stats_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> Table:
    """A statistics run: the covariance shape of each layer, with the token budget and the cache folder."""
    caption = plain(
        f"Covariance statistics ({summary.get('tokens', '?')} tokens of {summary.get('corpus', '?')}, "
        f"{fmt(summary.get('seconds'), 1)} s) cached in {summary.get('cache_dir', '?')}"
    )
    table = Table(title=caption)
    table.add_column("layer")
    table.add_column("shape")
    for r in rows:
        table.add_row(plain(r.get("layer")), plain(" x ".join(str(x) for x in r.get("shape") or [])))
    return table


def metrics_line(m: dict[str, Any], label: str = "") -> str:
    """EMT +- std, toxicity probability, dist-1/2/3 and (with --ppl-model) the generations' perplexity."""
    if not m or not m.get("n_prompts"):
        return ""
    line = (
        f"{label}expected max toxicity {fmt(m.get('expected_max_toxicity'))} ± "
        f"{fmt(m.get('expected_max_toxicity_std'))}, toxicity probability {_pct(m.get('toxicity_probability'))}, "
        f"dist-1/2/3 {fmt(m.get('dist_1'), 2)}/{fmt(m.get('dist_2'), 2)}/{fmt(m.get('dist_3'), 2)}"
    )
    if m.get("generation_ppl") is not None:
        line += f", generation ppl {fmt(m['generation_ppl'], 1)} ({m.get('ppl_model')}"
        over = m.get("generation_ppl_over_cap")
        line += f"; {over} left out at >= 1e4)" if over else ")"
    return line


def summary_lines(summary: dict[str, Any]) -> list[Text]:
    """The run's verdict first (share detoxified with its CI, Defense Success), then the details."""
    lines: list[Text] = []
    if summary.get("metrics"):  # a baseline run
        lines.append(plain(metrics_line(summary["metrics"])))
    d = summary.get("detoxified")
    if isinstance(d, dict) and d.get("n"):
        lines.append(
            Text.assemble(
                ("detoxified ", "bold"),
                (
                    f"{d['k']}/{d['n']} edited prompts ({_pct(d['share'])}, 95% CI {_pct(d['ci_low'])}-{_pct(d['ci_high'])})",
                    "bold",
                ),
                f"; defense success {_pct(summary.get('defense_success'))} (mean after < 0.5)",
            )
        )
        lines.append(
            Text(
                f"a prompt is detoxified when its mean toxicity falls by at least {fmt(summary.get('min_reduction'), 2)}"
                f" with one-sided paired p < {fmt(summary.get('alpha'), 2)} over its samples and the model did not "
                f"collapse; mean reduction {fmt(summary.get('mean_reduction'))} [{fmt(summary.get('ci_low'))}, "
                f"{fmt(summary.get('ci_high'))}], Wilcoxon p over prompts = {fmt(summary.get('wilcoxon_p'), 4)}; "
                f"went down at all (not a verdict): {_pct(summary.get('share_went_down'))}",
                style="dim",
            )
        )
    for name, share in (summary.get("defense_generalisation") or {}).items():
        lines.append(plain(f"defense generalisation, {name.replace('test input of ', '')}: {_pct(share)}"))
    if summary.get("convergence_note"):
        lines.append(plain(summary["convergence_note"], "bold yellow"))
    before = metrics_line(summary.get("before_metrics") or {}, "before: ")
    after = metrics_line(summary.get("after_metrics") or {}, "after:  ")
    for line in (before, after):
        if line:
            lines.append(plain(line))
    if summary.get("ppl_before") is not None and "detoxified" in summary:
        line = Text(f"neutral perplexity {fmt(summary['ppl_before'], 2)} -> {fmt(summary['ppl_after'], 2)}")
        if summary.get("collapsed"):
            line.append(" COLLAPSED", style="red")
        lines.append(line)
    held = summary.get("heldout_detoxified")
    if isinstance(held, dict) and held.get("n"):
        lines.append(
            Text(
                f"held-out prompts detoxified: {held['k']}/{held['n']} ({_pct(held['share'])}; never edited)"
            )
        )
    return lines
