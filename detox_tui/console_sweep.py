"""Rich rendering of a sweep in the terminal: the expanded experiment list, live progress, the result table.

Every cell is a rich Text (plain text, never markup): labels, errors and model names come from files and models.
"""

from __future__ import annotations

import math
import time
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from detox_tui.pipeline.sweep import SweepEvent
from detox_tui.text import plain


def _t(value: Any) -> Text:
    return plain("" if value is None else str(value))


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, fmt)


def experiments_table(rows: list[dict[str, Any]]) -> Table:
    """The expanded grid, one row per experiment, as stored before anything runs."""
    table = Table(title="experiments", title_justify="left", header_style="bold")
    for col in ("id", "model", "method", "layers", "hparams"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(_t(r[c]) for c in ("id", "model", "method", "layers", "hparams")))
    return table


def _share(r: dict[str, Any]) -> str:
    share = r.get("share_detoxified")
    if share is None:
        return ""
    lo, hi = r.get("share_detoxified_ci_low"), r.get("share_detoxified_ci_high")
    return f"{100 * share:.0f}% [{_num(lo and 100 * lo, '.0f')}, {_num(hi and 100 * hi, '.0f')}]"


def sweep_table(rows: list[dict[str, Any]]) -> Table:
    """One row per experiment: state (and worker), time and the edit's headline numbers (as an ablation row)."""
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", no_wrap=True)
    table.add_column("experiment", overflow="fold", min_width=10)
    table.add_column("state", overflow="fold", min_width=8)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("detoxified [CI]", justify="right", overflow="fold")
    table.add_column("mean b->a", justify="right", overflow="fold")
    table.add_column("ppl b->a", justify="right", overflow="fold")
    table.add_column("run / error", overflow="fold", min_width=10)
    styles = {"finished": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}
    for r in rows:
        state = str(r.get("state"))
        finished = state == "finished"
        where = f" on {r['worker']}" if r.get("worker") else ""
        collapsed = ", collapsed" if finished and r.get("collapsed") else ""
        table.add_row(
            _t(r.get("id")),
            _t(r.get("label")),
            Text(state + collapsed + where, style=styles.get(state, "")),
            _t(f"{r['elapsed_s']:.1f} s" if r.get("elapsed_s") is not None else ""),
            _t(_share(r)),
            _t(
                f"{_num(r.get('before_mean'), '.3f')}->{_num(r.get('after_mean'), '.3f')}" if finished else ""
            ),
            _t(f"{_num(r.get('ppl_before'), '.1f')}->{_num(r.get('ppl_after'), '.1f')}" if finished else ""),
            _t(r.get("run_id") if finished else r.get("error")),
        )
    return table


def sweep_summary_line(run_id: str, summary: dict[str, Any]) -> Text:
    """'sweep <id>: 4 of 4 finished, 0 failed; best <label> (100.0% detoxified)'."""
    if not summary:
        return plain(f"sweep {run_id}: not finished (detox-tui sweep --resume {run_id} runs the rest)")
    best = summary.get("best")
    share = summary.get("best_share_detoxified")
    tail = (
        f"best {best} ({100 * share:.1f}% detoxified)"
        if best and share is not None
        else ("no experiment detoxified any prompt")
    )
    return plain(
        f"sweep {run_id}: {summary.get('n_finished', 0)} of {summary.get('n_experiments', 0)} finished, "
        f"{summary.get('n_failed', 0)} failed; {tail}"
    )


class SweepProgress:
    """A Rich progress bar over the experiments, the running ones named beside it, a line per finished one."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[running]}"),
            console=console,
            transient=True,
        )
        self.task = None
        self.running: dict[str, tuple[str, float]] = {}

    def __enter__(self) -> SweepProgress:
        if not self.quiet:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> bool:
        if not self.quiet:
            self.progress.stop()
        return False

    def _running_text(self) -> str:
        now = time.perf_counter()
        return "  ".join(f"{i} on {w} ({now - t0:.0f} s)" for i, (w, t0) in sorted(self.running.items()))

    def __call__(self, event: SweepEvent) -> None:
        if self.quiet:
            return
        if event.kind == "expanded":
            self.task = self.progress.add_task("sweep", total=event.total, completed=event.done, running="")
            self.progress.console.print(plain(event.message))
            return
        if event.kind == "log":
            self.progress.console.print(plain(event.message, "dim"))
            return
        row = event.row or {}
        exp_id, state = str(row.get("id")), row.get("state")
        if state == "running":
            self.running[exp_id] = (str(row.get("worker")), time.perf_counter())
        else:
            self.running.pop(exp_id, None)
        if state == "finished":
            self.progress.console.print(
                plain(
                    f"{exp_id} {row.get('label')}: finished in {row.get('elapsed_s') or 0:.1f} s, "
                    f"{_share(row)} detoxified"
                )
            )
        elif state == "failed":
            self.progress.console.print(
                plain(f"{exp_id} {row.get('label')}: failed: {row.get('error')}", "red")
            )
        if self.task is not None:
            self.progress.update(self.task, completed=event.done, running=self._running_text())
