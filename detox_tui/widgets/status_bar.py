"""One-line status bar: model, stage (done/total), progress, elapsed time with the stage's ETA, GPU memory."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.cells import cell_len, set_cell_size
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.timer import Timer
from textual.widgets import Label, ProgressBar

from detox_tui.text import visible

GIB = 2**30
NARROW = 110  # below this many columns the bar drops the percentage and shortens the memory line
TIGHT = 90  # below this the progress bar goes (the stage label keeps done/total) and the model label shrinks
END_STYLES = {"finished": "green", "cancelled": "yellow", "failed": "bold red"}


def duration(seconds: float) -> str:
    """4 -> "4s", 64 -> "1m04s", 3725 -> "1h02m05s"."""
    total = max(int(round(seconds)), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def memory_text(info: dict, short: bool = False) -> str:
    """{"allocated", "peak", "total" in bytes, "utilisation" in % or None} -> "GPU 3.2/79.6 GiB peak 5.1 util 87%".

    ``short`` gives "GPU 3.2/79.6G 87%" for narrow terminals.
    """
    allocated = float(info.get("allocated") or 0) / GIB
    total = float(info.get("total") or 0) / GIB
    peak = info.get("peak")
    util = info.get("utilisation")
    used = f"{allocated:.1f}/{total:.1f}" if total else f"{allocated:.1f}"
    if short:
        text = f"GPU {used}G"
    else:
        text = f"GPU {used} GiB"
        if peak is not None:
            text += f" peak {float(peak) / GIB:.1f}"
    if util is not None:
        text += f" {int(util)}%" if short else f" util {int(util)}%"
    return text


class _StageLabel(Label):
    """The stage label: when space is short the stage's name is ellipsised, never its done/total count."""

    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self.stage_name = ""
        self.count = ""

    def show(self, name: str, count: str = "") -> None:
        self.stage_name, self.count = visible(name), count
        self.refresh()  # its width is the bar's spare width, whatever the text: a repaint, never a layout

    def render(self) -> Text:
        width = self.size.width
        tail = f" {self.count}" if self.count else ""
        name = self.stage_name
        if width and cell_len(name) + len(tail) > width:
            room = max(width - len(tail) - 1, 0)
            name = set_cell_size(name, room) + "…" if room else ""
        return Text((name + tail).strip() if name else self.count)


class StatusBar(Horizontal):
    """Model label, stage label (takes the spare width, ellipsised), progress bar, timing and memory.

    The app calls ``job_started``, then ``stage`` for each progress event, then ``job_ended``. Elapsed time
    refreshes once a second while a job runs; the ETA is the current stage's, counting down between
    progress events. ``clock`` is injectable so tests can drive time.
    """

    DEFAULT_CSS = """
    StatusBar {
        height: 1;
        background: $panel;
        padding: 0 1;
    }
    StatusBar > Label {
        height: 1;
        text-wrap: nowrap;
    }
    StatusBar #model-status {
        width: auto;
        max-width: 36;
        margin-right: 1;
        text-overflow: ellipsis;
    }
    StatusBar #stage {
        width: 1fr;
        min-width: 0;
        color: $text-muted;
        text-overflow: ellipsis;
    }
    StatusBar #progress {
        width: auto;
        margin-left: 1;
    }
    StatusBar #progress Bar {
        width: 14;
    }
    StatusBar #timing {
        width: 24;
        margin-left: 1;
        content-align-horizontal: right;
    }
    StatusBar #memory {
        width: 36;
        margin-left: 1;
        color: $text-muted;
    }
    StatusBar.-narrow #memory {
        width: 20;
    }
    StatusBar.-narrow #model-status {
        max-width: 22;
    }
    StatusBar.-narrow #progress Bar {
        width: 8;
    }
    StatusBar.-narrow #progress PercentageStatus {
        display: none;
    }
    StatusBar.-tight #model-status {
        max-width: 16;
    }
    StatusBar.-tight #progress {
        display: none;
    }
    """

    def __init__(
        self,
        model_text: Text | str = "",
        *,
        clock: Callable[[], float] = time.monotonic,
        id: str | None = "status-bar",
        classes: str | None = None,
    ) -> None:
        super().__init__(id=id, classes=classes)
        self.clock = clock
        self._model_text = model_text
        self.running = False
        self.job_start: float | None = None
        self.job_elapsed: float | None = None  # the final elapsed time once the job ended
        self.end_state: str | None = None
        self.stage_key: str | None = None
        self.stage_start: float | None = None
        self._stages: dict[str, tuple[float, int]] = {}  # stage key -> (start, last done) in this job
        self._last_event: float = 0.0
        self._eta: float | None = None  # seconds left in the stage as of _eta_at
        self._eta_at: float = 0.0
        self._memory: dict | None = None
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Label(self._plain(self._model_text), id="model-status")
        yield _StageLabel(id="stage")
        # No percentage: the stage label has done/total, and its label would lay the screen out on every tick.
        yield ProgressBar(total=1, id="progress", show_eta=False, show_percentage=False)
        yield Label("", id="timing")
        memory = Label("", id="memory")
        memory.display = False
        yield memory

    def on_resize(self) -> None:
        narrow = self.size.width < NARROW
        self.set_class(self.size.width < TIGHT, "-tight")
        if narrow != self.has_class("-narrow"):
            self.set_class(narrow, "-narrow")
            self._show_memory()

    @staticmethod
    def _plain(text: Text | str) -> Text:
        return text if isinstance(text, Text) else Text(visible(text))

    # ---------------------------------------------------------------------------------------- model

    def set_model(self, text: Text | str) -> None:
        self._model_text = text
        self.query_one("#model-status", Label).update(self._plain(text))

    # ---------------------------------------------------------------------------------------- job

    def job_started(self) -> None:
        """Start the job clock (and its once-a-second refresh); forget the last job's stage and ending."""
        now = self.clock()
        self.running = True
        self.job_start = now
        self.job_elapsed = None
        self.end_state = None
        self.stage_key = None
        self.stage_start = None
        self._stages = {}
        self._last_event = now
        self._eta = None
        if self._timer is None:
            self._timer = self.set_interval(1.0, self.update_timing)
        else:
            self._timer.resume()
        self.update_timing()

    def job_ended(self, state: str) -> None:
        """Stop the clock and show how the job ended ("finished", "cancelled", "failed") after how long."""
        now = self.clock()
        if self.job_start is not None:
            self.job_elapsed = now - self.job_start
        self.running = False
        self.end_state = state
        self._eta = None
        if self._timer is not None:
            self._timer.pause()
        self.update_timing()

    def stage(self, label: str, done: int, total: int, stage_key: str | None = None) -> None:
        """Show "label done/total" and the progress, with the stage's ETA once ``done`` > 0.

        The stage is ``stage_key`` (default: the label). A new stage's clock starts now when it reports 0
        done, else at the previous progress event (when the last stage stopped reporting). A stage seen before in this job keeps its clock while
        ``done`` keeps growing (an outer stage such as "edit" around per-layer stages) and restarts when
        ``done`` goes back (the same stage run again). Starts the job clock when no job is running.
        """
        if not self.running:
            self.job_started()
        now = self.clock()
        key = label if stage_key is None else stage_key
        start, last_done = self._stages.get(key, (None, 0))
        if start is None or done < last_done:
            # A stage that reports its start (0 done) starts now; one whose first report is already
            # some steps in began when the previous report came.
            start = now if done <= 0 else self._last_event
        self._stages[key] = (start, done)
        self.stage_key = key
        self.stage_start = start
        self._last_event = now
        self.query_one("#stage", _StageLabel).show(label, f"{done}/{total}" if total else "")
        self.query_one("#progress", ProgressBar).update(
            total=max(total, 1), progress=min(max(done, 0), max(total, 1))
        )
        in_stage = now - start
        if total > 1 and 0 < done < total and in_stage > 0:
            self._eta = in_stage / done * (total - done)
            self._eta_at = now
        else:
            self._eta = None
        self.update_timing()

    @property
    def eta(self) -> float | None:
        """Seconds left in the current stage (counting down since the last progress event), or None."""
        if self._eta is None or not self.running:
            return None
        return max(self._eta - (self.clock() - self._eta_at), 0.0)

    def timing_text(self) -> Text:
        if self.job_start is None:
            return Text("")
        if not self.running:
            state = self.end_state or "ended"
            word = "in" if state == "finished" else "after"
            return Text(f"{state} {word} {duration(self.job_elapsed or 0)}", style=END_STYLES.get(state, ""))
        text = Text(f"elapsed {duration(self.clock() - self.job_start)}")
        eta = self.eta
        if eta is not None:
            text.append(f" ETA {duration(eta)}", style="bold")
        return text

    def update_timing(self) -> None:
        """Refresh the timing label (the once-a-second timer calls this; it touches nothing else)."""
        # Fixed widths (see DEFAULT_CSS): a tick repaints these labels without laying the screen out again.
        self.query_one("#timing", Label).update(self.timing_text(), layout=False)

    # ---------------------------------------------------------------------------------------- memory

    def set_memory(self, info: dict | None) -> None:
        """GPU memory in GiB (allocated/total, peak, utilisation); None hides the label (CPU)."""
        self._memory = info
        self._show_memory()

    def _show_memory(self) -> None:
        label = self.query_one("#memory", Label)
        if self._memory is None:
            label.display = False
            return
        label.update(Text(memory_text(self._memory, short=self.has_class("-narrow"))), layout=False)
        label.display = True
