"""Messages from the app's workers to its UI thread, and the feed that batches engine events into them.

Workers never touch widgets: they post these messages (``post_message`` is thread-safe) and the app's
handlers update the widgets on the UI thread. Engine events are buffered by an :class:`EngineFeed` and
delivered as one :class:`EngineEvents` message per batch, so a burst of progress ticks costs one repaint.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from textual.message import Message

from detox_tui.events import Event


class EngineFeed:
    """Engine events of one job, pushed from its worker thread and drained on the UI thread.

    ``push`` appends the event and posts one :class:`EngineEvents` message to ``target`` unless one is
    already waiting to be drained; the handler calls ``drain`` (which takes everything so far), so however
    fast the engine emits, the UI sees at most one pending message per job.
    """

    def __init__(self, target: Any, job: int) -> None:
        self.target = target
        self.job = job
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._posted = False

    def push(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)
            if self._posted:
                return
            self._posted = True
        self.target.post_message(EngineEvents(self))

    __call__ = push

    def drain(self) -> list[Event]:
        with self._lock:
            events, self._events = self._events, []
            self._posted = False
        return events


class EngineEvents(Message):
    """Engine events are waiting in ``feed``."""

    def __init__(self, feed: EngineFeed) -> None:
        super().__init__()
        self.feed = feed


class JobEnded(Message):
    """A job's worker returned: ``result`` on success, else ``error`` ("cancelled" for a cancel)."""

    def __init__(self, job: int, kind: str, result: Any = None, error: str | None = None) -> None:
        super().__init__()
        self.job, self.kind, self.result, self.error = job, kind, result, error


class PromptsLoaded(Message):
    def __init__(self, items: list[Any], source: str) -> None:
        super().__init__()
        self.items, self.source = items, source


class WorkbenchLoaded(Message):
    """The model (and, unless ``workbench.scorer`` is None, the scorer) loaded."""

    def __init__(self, workbench: Any) -> None:
        super().__init__()
        self.workbench = workbench


class LoadFailed(Message):
    """``component`` ("model", "scorer" or "prompts") failed to load; ``message`` says why in one sentence."""

    def __init__(self, component: str, message: str) -> None:
        super().__init__()
        self.component, self.message = component, message


class ScorerChanged(Message):
    def __init__(self, name: str, error: str | None = None) -> None:
        super().__init__()
        self.name, self.error = name, error


class StoreSnapshot(Message):
    """What the store watcher read: the runs list, the followed run's state and rows, device memory."""

    def __init__(
        self,
        runs: list[dict[str, Any]] | None = None,
        followed: dict[str, Any] | None = None,
        followed_rows: dict[str, list[dict[str, Any]]] | None = None,
        memory: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        super().__init__()
        self.runs = runs  # None: unchanged since the last snapshot
        self.followed = followed  # the followed run's get_run() dict when it changed
        self.followed_rows = followed_rows or {}  # table -> rows
        self.memory = memory
        self.error = error


class RunOpened(Message):
    """A stored run read by a worker, ready to show: the run dict and its rows by table."""

    def __init__(self, run: dict[str, Any], rows: dict[str, list[dict[str, Any]]], trace: Any = None) -> None:
        super().__init__()
        self.run, self.rows, self.trace = run, rows, trace


class LogLine(Message):
    """A Python logging record for the run log (library warnings must never be written to the terminal)."""

    def __init__(self, message: str, level: str) -> None:
        super().__init__()
        self.message, self.level = message, level


class LogToApp(logging.Handler):
    """Sends log records to the app as LogLine messages (thread-safe) while the app owns the terminal."""

    def __init__(self, target: Any, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = (
                "error"
                if record.levelno >= logging.ERROR
                else "warning"
                if record.levelno >= logging.WARNING
                else "debug"
            )
            self.target.post_message(LogLine(f"{record.name}: {record.getMessage()}", level))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
