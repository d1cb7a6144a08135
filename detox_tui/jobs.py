"""What the app's worker threads do: run an engine job, read the run store. No widgets here.

Each function runs in a thread worker and returns plain data or a message for the UI thread to handle;
the app (detox_tui/app.py) only starts them and posts what they return.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from detox_tui.config import ExperimentConfig
from detox_tui.errors import UserError
from detox_tui.events import EventCallback
from detox_tui.messages import RunOpened, StoreSnapshot
from detox_tui.prompts.base import PromptItem

log = logging.getLogger(__name__)


def run_job(
    wb: Any,
    kind: str,
    items: Sequence[PromptItem],
    cfg: ExperimentConfig,
    extra: Any,
    emit: EventCallback,
    cancel: threading.Event,
) -> Any:
    """Run one engine job ("baseline", "edit", "ablation" with ``extra`` = configs, "trace" with a TraceSpec)."""
    from detox_tui.pipeline import experiment

    if kind == "baseline":
        return experiment.run_baseline(wb, items, cfg, emit=emit, cancel=cancel)
    if kind == "edit":
        return experiment.run_edit(wb, items, cfg, emit=emit, cancel=cancel)
    if kind == "ablation":
        return experiment.run_ablation(wb, items, cfg, extra, emit=emit, cancel=cancel)
    if kind == "trace":
        from detox_tui.pipeline.trace_run import run_trace

        return run_trace(wb, extra, emit=emit, cancel=cancel)
    raise ValueError(f"unknown job kind {kind!r}")


def runs_signature(runs: list[dict[str, Any]]) -> tuple:
    """What changes when a run in the list progresses: status, update time and stored row count."""
    return tuple((r["id"], r["status"], r.get("updated"), r.get("n_rows")) for r in runs)


def _run_rows(wb: Any, run_id: str) -> dict[str, list[dict[str, Any]]]:
    return {table: wb.store.rows(run_id, table) for table in wb.store.tables(run_id)}


def read_store(wb: Any, followed: dict[str, Any] | None, signature: Any, busy: bool) -> StoreSnapshot:
    """The runs list if it changed since ``signature``, the followed run if it progressed, device memory if busy."""
    from detox_tui.backends.models import device_memory

    snapshot = StoreSnapshot()
    try:
        runs = wb.store.list_runs()
        if runs_signature(runs) != signature:
            snapshot.runs = runs
        if followed is not None:
            state = wb.store.run_state(followed["id"])
            if (state["n_rows"], state["status"]) != (followed.get("n_rows"), followed.get("status")):
                run = wb.store.get_run(followed["id"])
                run["n_rows"] = state["n_rows"]
                snapshot.followed = run
                snapshot.followed_rows = _run_rows(wb, run["id"])
        if busy:
            snapshot.memory = device_memory(wb.lm.device)
    except UserError as exc:
        snapshot.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - a store read failing must not end the app
        log.exception("reading the run store failed")
        snapshot.error = f"Reading the run store failed: {exc}"
    return snapshot


def read_run(wb: Any, run_id: str) -> RunOpened:
    """A stored run with its rows by table (and its heatmap, for a finished trace). UserError if unknown."""
    run = wb.store.get_run(run_id)
    run["n_rows"] = wb.store.run_state(run["id"])["n_rows"]
    trace = None
    if run["kind"] == "trace" and run["status"] == "finished":
        from detox_tui.pipeline.trace_run import trace_from_store

        trace = trace_from_store(wb.store, run["id"])
    return RunOpened(run, _run_rows(wb, run["id"]), trace)
