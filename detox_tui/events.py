"""Events the engine reports through a callback; front ends (CLI, TUI) render them.

The lowest layer: it imports only the standard library and detox_tui.errors, so backends and pipeline
both import it downward (tests/test_layering.py holds the rule).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from detox_tui.errors import Cancelled


@dataclass(frozen=True)
class Started:
    """A run was created in the store (before any work): front ends can name it, even if it is cancelled."""

    run_id: str
    kind: str
    n_prompts: int = 0


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` steps of ``stage`` (e.g. "generate before", "covariance", "memit z")."""

    stage: str
    done: int
    total: int
    message: str = ""


@dataclass(frozen=True)
class RowReady:
    """One finished result row; ``table`` names which table it belongs to ("baseline", "edit", "ablation")."""

    table: str
    row: dict[str, Any]


@dataclass(frozen=True)
class Log:
    message: str
    level: str = "info"


@dataclass(frozen=True)
class Finished:
    run_id: str | None
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    error: str
    traceback: str | None = None


Event = Started | Progress | RowReady | Log | Finished | Failed
EventCallback = Callable[[Event], None]


def null_callback(event: Event) -> None:
    """Default callback: drop every event."""


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise Cancelled if the cancel flag is set; call between steps of long loops (every generated token,
    optimisation step and statistics batch)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")
