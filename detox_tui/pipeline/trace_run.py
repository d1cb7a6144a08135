"""Causal traces as runs: stored in the run store like baselines and edits, one result row per layer.

``run_trace`` creates a run of kind "trace" (its config: the model and the trace's settings; its one prompt),
stores and emits each layer's row as soon as that layer is traced, and finishes with a summary; a cancelled or
failed trace is stored as such with the layers it finished. ``trace_from_store`` rebuilds the heatmap of a stored
trace. A trace needs no scorer.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from detox_tui.backends.tracing import TraceResult, check_trace_args, peak_layers, prompt_tokens, trace
from detox_tui.errors import UserError
from detox_tui.events import EventCallback, Log, RowReady, null_callback
from detox_tui.pipeline.experiment import Workbench, _create_run, _finish, _guard
from detox_tui.pipeline.store import RunStore
from detox_tui.prompts.base import PromptItem

KIND = "trace"
TABLE = "trace"


@dataclass(frozen=True)
class TraceSpec:
    """What to trace: ``continuation`` after ``prompt``, restoring ``kind`` states (hidden, mlp or attn) over
    ``window`` layers, with the ``subject`` span (default: the whole prompt) corrupted by Gaussian noise of std
    ``noise`` (default: 3 x the corrupted tokens' embedding std), ``noise_samples`` seeded draws."""

    prompt: str
    continuation: str
    kind: str = "hidden"
    window: int = 10
    subject: str | None = None
    noise: float | None = None
    noise_samples: int = 10
    seed: int = 0

    def check(self) -> None:
        """The checks that need no model (kind, window, samples, noise, the subject in the prompt): UserError."""
        check_trace_args(
            self.prompt,
            self.continuation,
            kind=self.kind,
            window=self.window,
            samples=self.noise_samples,
            subject=self.subject,
            noise=self.noise,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TraceRunResult:
    """A finished trace run: the heatmap, the stored summary and the per-layer rows (as stored)."""

    run_id: str
    trace: TraceResult
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    kind: str = KIND


def layer_row(layer: int, tokens: list[str], scores: np.ndarray) -> dict[str, Any]:
    """One layer of a trace as a result row: its score per prompt token and the strongest token."""
    values = [float(v) for v in scores]
    finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
    best, at = max(finite, key=lambda p: (p[0], -p[1])) if finite else (float("nan"), -1)
    return {
        "layer": int(layer),
        "tokens": list(tokens),
        "scores": values,
        "max": best,
        "argmax_token": tokens[at] if 0 <= at < len(tokens) else "",
    }


def trace_summary(spec: TraceSpec, result: TraceResult) -> dict[str, Any]:
    """The run summary of a finished trace (``window`` and ``noise`` as used: 1 for hidden, the noise level)."""
    return {
        "prompt": spec.prompt,
        "continuation": result.continuation,
        "subject": spec.subject,
        "kind": result.kind,
        "window": int(result.window),
        "noise": float(result.noise),
        "noise_samples": int(spec.noise_samples),
        "p_clean": float(result.p_clean),
        "p_corrupted": float(result.p_corrupted),
        "peak_layers": peak_layers(result, k=min(3, result.layers)),
        "layers": int(result.layers),
        "tokens": list(result.tokens),
    }


def run_trace(
    wb: Workbench,
    spec: TraceSpec,
    *,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
) -> TraceRunResult:
    """Trace ``spec`` on the workbench's model as a stored run of kind "trace" (no scorer needed).

    The spec is checked before the run is created, so a mistake stores nothing. Each layer's row is stored and
    emitted (RowReady("trace", row)) as soon as it is traced; Finished(run_id, summary) ends the run.
    """
    spec.check()
    box: list[str] = []

    def body() -> TraceRunResult:
        config = {"model": wb.config.model.to_dict(), KIND: spec.to_dict()}
        item = PromptItem(spec.prompt, subject=spec.subject, meta={"continuation": spec.continuation})
        run_id = _create_run(wb, KIND, config, [item], emit)
        box.append(run_id)
        emit(Log(f"trace run {run_id}: {spec.kind} states of {wb.lm.n_layers} layers on {wb.lm.name}"))
        tokens = prompt_tokens(wb.lm, spec.prompt)
        rows: list[dict[str, Any]] = []

        def on_layer(layer: int, scores: np.ndarray) -> None:
            row = layer_row(layer, tokens, scores)
            wb.store.add_row(run_id, TABLE, str(layer), row)
            rows.append(row)
            emit(RowReady(TABLE, row))

        result = trace(
            wb.lm,
            spec.prompt,
            spec.continuation,
            kind=spec.kind,
            window=spec.window,
            samples=spec.noise_samples,
            subject=spec.subject,
            noise=spec.noise,
            seed=spec.seed,
            emit=emit,
            cancel=cancel,
            on_layer=on_layer,
        )
        summary = trace_summary(spec, result)
        _finish(wb, run_id, summary, emit)
        return TraceRunResult(run_id=run_id, trace=result, summary=summary, rows=rows)

    return _guard(wb, box, body)


def trace_from_store(store: RunStore, run_id: str) -> TraceResult:
    """The heatmap of a stored trace run (id or unique prefix), for reopening it.

    A run still going or stopped early gives the layers stored so far (p_clean and p_corrupted are NaN until it
    finishes). UserError when the run is not a trace.
    """
    run = store.get_run(run_id)
    if run["kind"] != KIND:
        raise UserError(f"Run '{run['id']}' is a {run['kind']} run, not a trace.")
    summary = run.get("summary") or {}
    settings = (run.get("config") or {}).get(KIND) or {}
    rows = sorted(store.rows(run["id"], TABLE), key=lambda r: int(r["layer"]))
    tokens = list(summary.get("tokens") or (rows[0]["tokens"] if rows else []))
    n_layers = int(summary.get("layers") or (rows[-1]["layer"] + 1 if rows else 0))
    scores = np.full((n_layers, len(tokens)), np.nan)
    for r in rows:
        values = [np.nan if v is None else float(v) for v in r["scores"]]
        scores[int(r["layer"]), : len(values)] = values
    kind = summary.get("kind") or settings.get("kind") or "hidden"
    window = summary.get("window") or (1 if kind == "hidden" else settings.get("window") or 1)
    return TraceResult(
        tokens=tokens,
        layers=n_layers,
        scores=scores,
        p_clean=_number(summary.get("p_clean")),
        p_corrupted=_number(summary.get("p_corrupted")),
        continuation=summary.get("continuation") or settings.get("continuation") or "",
        kind=kind,
        window=int(window),
        noise=_number(summary.get("noise", settings.get("noise"))),
    )


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)
