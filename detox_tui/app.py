"""The Textual app: a thin controller between the widgets and the engine's workers.

Workers (model loading, engine jobs, the store watcher) never touch widgets: they post messages
(detox_tui.messages) that the handlers here route to the widgets. Engine events are batched by an
EngineFeed and repainted at most ``REPAINT_INTERVAL`` apart, so a busy job never floods the UI thread.
The key table is detox_tui.commands; dialogs and screens live in detox_tui.widgets, one per file.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.notifications import SeverityLevel
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Header, Input, Label, Static, TabbedContent, TabPane

from detox_tui.commands import APP_NAMES, COMMANDS, TAB_FOCUS, TABS, WIDGET_COMMANDS
from detox_tui.config import (
    DEFAULT_MODEL,
    DEFAULT_SCORER,
    ExperimentConfig,
    GenerationConfig,
    ModelConfig,
    ScoringConfig,
)
from detox_tui.errors import Cancelled, UserError
from detox_tui.events import Event, Failed, Finished, Log, Progress, RowReady, Started
from detox_tui.jobs import read_run, read_store, run_job, runs_signature
from detox_tui.messages import (
    EngineEvents,
    EngineFeed,
    JobEnded,
    LoadFailed,
    LogLine,
    LogToApp,
    PromptsLoaded,
    RunOpened,
    ScorerChanged,
    StoreSnapshot,
    WorkbenchLoaded,
)
from detox_tui.prompts.base import PromptItem
from detox_tui.text import visible
from detox_tui.widgets.ablation_chart import AblationChart
from detox_tui.widgets.app_footer import AppFooter
from detox_tui.widgets.confirm_dialog import ConfirmDialog
from detox_tui.widgets.export_dialog import ExportDialog, ExportRequest
from detox_tui.widgets.help_screen import HelpScreen, binding_rows
from detox_tui.widgets.layer_picker import LayerPicker
from detox_tui.widgets.method_form import MethodForm
from detox_tui.widgets.prompt_detail import PromptDetail
from detox_tui.widgets.prompt_picker import PromptPicker
from detox_tui.widgets.results_table import ResultsTable
from detox_tui.widgets.run_log import RunLog
from detox_tui.widgets.runs_browser import CompareRuns, RunsBrowser
from detox_tui.widgets.score_bars import ScoreBars
from detox_tui.widgets.settings_dialog import Settings, SettingsDialog, settings_changes
from detox_tui.widgets.status_bar import StatusBar
from detox_tui.widgets.summary_strip import SummaryStrip, summary_text
from detox_tui.widgets.sweeps_view import SweepsView, sweep_summary
from detox_tui.widgets.trace_panel import TracePanel

log = logging.getLogger(__name__)

# Jobs that sample and score generations (a trace needs only the model).
SCORED_JOBS = ("baseline", "edit", "ablation")
SCORER_SUGGESTIONS = (
    "detoxify",
    "detoxify:original",
    "detoxify:unbiased",
    "detoxify:multilingual",
    "profanity",
)


def view_of(kind: str) -> str:
    """The view a run of ``kind`` (or a tab) fills: "ablation", "trace" and "sweeps" have their own tabs, the rest
    the Results tab."""
    return kind if kind in ("ablation", "trace", "sweeps") else "results"


class SweepRead(Message):
    """The store poll re-read the sweep the Sweeps tab shows: its run dict and its "sweep" rows (or an error)."""

    def __init__(
        self,
        run_id: str,
        run: dict[str, Any] | None = None,
        rows: list[dict[str, Any]] | None = None,
        error: str | None = None,
    ) -> None:
        super().__init__()
        self.run_id, self.run, self.rows, self.error = run_id, run, rows or [], error


def _bindings() -> list[Binding]:
    out = []
    for c in COMMANDS:
        out.append(
            Binding(
                c.key,
                c.action,
                c.footer or c.title,
                show=c.footer is not None,
                priority=c.priority,
            )
        )
    out += [
        Binding(str(i + 1), f"show_tab('{tab}')", title, show=False) for i, (tab, title) in enumerate(TABS)
    ]
    return out


class DetoxApp(App[None]):
    """detox-tui's interactive front end; all model work happens in thread workers."""

    CSS_PATH = "app.tcss"
    TITLE = "detox-tui"
    BINDINGS = _bindings()
    REPAINT_INTERVAL = 0.1  # seconds between repaints of a job's rows
    PROGRESS_INTERVAL = (
        0.25  # seconds between repaints of the status bar's progress (a new stage shows at once)
    )
    STORE_POLL = 1.0  # seconds between reads of the run store (runs list, followed run, device memory)

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        prompts: str | None = None,
        scorer: str = DEFAULT_SCORER,
        device: str = "auto",
        dtype: str = "auto",
        data_dir: str | None = None,
        method: str | None = None,
        layers: list[int] | None = None,
        hparams: dict[str, Any] | None = None,
        run_settings: dict[str, Any] | None = None,
        ablation: list[list[int]] | None = None,
        trust_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        # --trust-checkpoint: a scorer checkpoint that needs pickle is loaded (with a warning) instead of refused.
        self.trust_checkpoint = trust_checkpoint
        if "TEXTUAL_ANIMATIONS" not in os.environ:
            # Over SSH every animation frame (the tab underline's slide) is a repaint down the wire, and while a job
            # runs it competes with the worker for the interpreter; TEXTUAL_ANIMATIONS=full brings them back.
            self.animation_level = "none"
        self.model_name = model
        self.prompts_source = prompts
        self.data_dir = data_dir
        gen = GenerationConfig()
        self.settings = Settings(
            scorer=scorer,
            device=device,
            dtype=dtype,
            temperature=gen.temperature,
            top_p=gen.top_p,
            top_k=gen.top_k,
            eval_protocol=None,
        )
        # Initial settings prefilled once the model loads (the demo's): method, its layers and hyperparameters,
        # run settings and the ablation list; None leaves the preset's.
        self.initial_method = method
        self.initial_layers = layers
        self.initial_hparams = hparams
        self.initial_run_settings = run_settings
        self.initial_ablation = ablation
        self.workbench: Any = None  # detox_tui.pipeline.experiment.Workbench once loaded
        self.load_error: str | None = None
        self.cancel_event = threading.Event()
        self.running: str | None = None  # kind of the job in progress
        self.job = 0  # number of the latest job; messages of older jobs are dropped
        self.feed: EngineFeed | None = None
        self.job_prompts = 0
        self._last_flush = 0.0
        self._flush_pending = False
        self._last_progress: tuple[str, float] = ("", 0.0)  # stage shown last and when
        # What each view shows: {"run_id", "kind", "summary", "threshold", "status"} for results/ablation/trace.
        self.views: dict[str, dict[str, Any]] = {}
        self.baseline_rows: dict[str, dict[str, Any]] = {}
        self.trace_rows: list[dict[str, Any]] = []
        self.followed: dict[str, Any] | None = None  # a stored run being followed: {"id", "n_rows", "status"}
        self._runs_signature: Any = None
        self._polling = False
        # The sweep the Sweeps tab shows: {"id", "status" (as last read; None: not read yet), "listed" (its status in
        # the runs list), "chosen" (opened by the user, else the newest sweep in the store)}; re-read at every
        # store poll while it runs or while the runs list says its status changed.
        self.sweep: dict[str, Any] | None = None
        self._sweep_polling = False
        self._form_ready = False  # the method form and layer picker were set up for the loaded model

    @property
    def scorer_name(self) -> str:
        return self.settings.scorer

    @property
    def current_run(self) -> dict[str, Any]:
        """The run the active results view shows."""
        return self.views.get(self._view_of_tab(), {})

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="")
        with TabbedContent(id="tabs", initial="prompts"):
            with TabPane("Prompts", id="prompts"):
                yield PromptPicker(id="picker")
            with TabPane("Layers & Method", id="setup"):
                with VerticalScroll(id="setup-scroll"):
                    yield LayerPicker(id="layers")
                    yield MethodForm(id="method-form")
            with TabPane("Results", id="results"):
                yield SummaryStrip(id="summary")
                yield ResultsTable(id="results-table")
                yield ScoreBars(id="score-bars")
            with TabPane("Ablation", id="ablation"):
                yield Label(
                    "Share of prompts detoxified per layer configuration or sweep experiment (significant fall >= --min-reduction)",
                    classes="dim",
                )
                yield AblationChart(id="ablation-chart")
            with TabPane("Trace", id="trace"):
                yield TracePanel(id="trace-panel")
            with TabPane("Runs", id="runs"):
                yield Label(
                    "enter open (follows a running run)  space mark  c compare  s sort", classes="dim"
                )
                yield RunsBrowser(id="runs-browser")
            with TabPane("Sweeps", id="sweeps"):
                yield Static(sweep_summary(None, []), id="sweep-summary")
                yield Label(
                    "enter open the experiment's run  s sort  (a running sweep is followed)", classes="dim"
                )
                yield SweepsView(id="sweeps-view")
            with TabPane("Log", id="log"):
                yield RunLog(id="run-log")
        yield StatusBar(id="status-bar")
        yield AppFooter()

    def on_mount(self) -> None:
        self.sub_title = self._short_model()
        self._status().set_model(self._model_status("loading"))
        self._runlog(f"loading {self.model_name} with the {self.scorer_name} scorer")
        self.load_prompts_worker()
        self.load_workbench_worker(self._base_config())
        if self.initial_run_settings:
            self._q(MethodForm).set_run_settings(self.initial_run_settings)
        self._q("#prompt-list").focus()
        self.set_interval(self.STORE_POLL, self._poll_store)
        self._capture_logging()

    def _capture_logging(self) -> None:
        """Route Python logging to the run log while the app owns the terminal (restored on unmount)."""
        root = logging.getLogger()
        self._log_handlers = [h for h in root.handlers if type(h) is logging.StreamHandler]
        for handler in self._log_handlers:
            root.removeHandler(handler)
        self._app_log_handler = LogToApp(self)
        root.addHandler(self._app_log_handler)

    def on_unmount(self) -> None:
        if self.running:
            self._hold_full_collections(False)
        gc.unfreeze()  # what the app froze is collectable again once it has closed (tests, serve)
        root = logging.getLogger()
        root.removeHandler(self._app_log_handler)
        for handler in self._log_handlers:
            root.addHandler(handler)

    @on(LogLine)
    def _log_line(self, message: LogLine) -> None:
        self._runlog(message.message, message.level)

    async def _on_message(self, message: Message) -> None:
        # Our messages (from workers and widgets) handled after the screens went away: nothing is left to show them on.
        if not self.screen_stack and type(message).__module__.startswith("detox_tui."):
            return
        await super()._on_message(message)

    def _q(self, selector: Any, expect_type: Any = None) -> Any:
        """A widget of the main screen, also while a dialog is on top (``App.query_one`` searches the top screen)."""
        screen = self.screen_stack[0] if self.screen_stack else self.screen
        return screen.query_one(selector, expect_type)

    def _status(self) -> StatusBar:
        return self._q(StatusBar)

    def _runlog(self, message: str, level: str = "info") -> None:
        self._q(RunLog).log_message(message, level)

    def _short_model(self) -> str:
        return visible(Path(str(self.model_name).rstrip("/")).name or str(self.model_name))

    def _model_status(self, state: str, ok: bool = True) -> Text:
        text = Text(f"{self._short_model()} ", style="bold")
        if state == "loading":
            text.append("loading…", style="yellow")
        else:
            text.append(state, style="green" if ok else "bold red")
        return text

    # ------------------------------------------------------------------ loading (workers post messages)

    @work(thread=True, group="prompts", exit_on_error=False)
    def load_prompts_worker(self) -> None:
        from detox_tui.prompts.loaders import load_prompts

        try:
            items = load_prompts(self.prompts_source)
        except UserError as exc:
            self.post_message(LoadFailed("prompts", str(exc)))
            return
        self.post_message(PromptsLoaded(items, self.prompts_source or "the builtin set"))

    @on(PromptsLoaded)
    def _prompts_loaded(self, message: PromptsLoaded) -> None:
        self._q(PromptPicker).set_items(message.items)
        self._runlog(f"{len(message.items)} prompts from {message.source}")

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def load_workbench_worker(self, cfg: ExperimentConfig) -> None:
        from detox_tui.pipeline.experiment import Workbench

        try:
            wb = Workbench.load(cfg, data_dir=self.data_dir, emit=EngineFeed(self, -1), scorer="optional")
        except UserError as exc:
            self.post_message(LoadFailed("model", str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged with its traceback
            log.exception("loading failed")
            self.post_message(LoadFailed("model", f"The model did not load: {type(exc).__name__}: {exc}"))
            return
        self.post_message(WorkbenchLoaded(wb))

    @on(LoadFailed)
    def _load_failed(self, message: LoadFailed) -> None:
        if message.component == "model":
            self.load_error = message.message
            self._status().set_model(self._model_status("failed to load", ok=False))
            self._status().job_ended("failed")
        self._error(message.message)

    @on(WorkbenchLoaded)
    def _workbench_loaded(self, message: WorkbenchLoaded) -> None:
        wb = message.workbench
        self.workbench, self.load_error = wb, None
        lm = wb.lm
        self._show_model_status()
        if not self._form_ready:  # once: a reload (Settings) keeps what the user chose
            self._form_ready = True
            form = self._q(MethodForm)
            if self.initial_method:
                form.set_method(self.initial_method)
                if self.initial_hparams:
                    form.set_defaults(self.initial_method, self.initial_hparams)
            form.set_model(lm)
            self._q(LayerPicker).set_model(lm.n_layers, self._default_layers(form.method))
            if self.initial_ablation:
                self._q(LayerPicker).set_configs(self.initial_ablation)
        self._status().stage("ready", 1, 1)
        self._status().job_ended("loaded")
        # The model, tokenizer, scorer and the libraries behind them (~500k objects) are never garbage: take them
        # out of every later full collection, which otherwise pauses the UI for half a second at random.
        gc.collect()
        gc.freeze()
        self._runlog(f"loaded {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}, on {lm.device}")
        if wb.scorer is None and getattr(wb, "scorer_error", None):
            self._error(f"{wb.scorer_error} Traces still work; choose another scorer in Settings (,).")
        self._runs_signature = None

    def _show_model_status(self) -> None:
        wb = self.workbench
        if wb is None:
            return
        lm = wb.lm
        if wb.scorer is None:
            self._status().set_model(
                Text.assemble(
                    self._model_status(f"{lm.n_layers} layers · {lm.device} · "), ("no scorer", "bold red")
                )
            )
        else:
            self._status().set_model(
                self._model_status(f"{lm.n_layers} layers · {lm.device} · {wb.scorer.name}")
            )

    def _default_layers(self, method: str) -> list[int]:
        from detox_tui.backends.editing.presets import load_preset

        if self.initial_layers is not None and method == self.initial_method:
            return list(self.initial_layers)
        try:
            hp = load_preset(self.workbench.lm, method)
        except UserError:
            return []
        if isinstance(hp.get("layers"), list):
            return list(hp["layers"])
        if isinstance(hp.get("layer"), int):
            return [hp["layer"]]
        return []

    # ------------------------------------------------------------------ engine events (batched)

    @on(EngineEvents)
    def _engine_events(self, message: EngineEvents) -> None:
        if message.feed is not self.feed:
            if message.feed.job == -1:  # loading progress
                self._apply(message.feed.drain())
            else:
                message.feed.drain()  # a finished job's late events
            return
        wait = self.REPAINT_INTERVAL - (time.monotonic() - self._last_flush)
        if wait > 0:
            if not self._flush_pending:
                self._flush_pending = True
                self.set_timer(wait, self._flush_feed)
            return
        self._flush_feed()

    def _flush_feed(self) -> None:
        """Apply every event the current job emitted since the last repaint (UI thread)."""
        self._flush_pending = False
        self._last_flush = time.monotonic()
        if self.feed is not None and self.screen_stack:  # (a timer can fire while the app closes)
            self._apply(self.feed.drain())

    def _apply(self, events: list[Event]) -> None:
        last_progress: Progress | None = None
        rows_changed = False
        for event in events:
            if isinstance(event, Progress):
                last_progress = event
            elif isinstance(event, RowReady):
                self._row_ready(event.table, event.row)
                rows_changed = True
            elif isinstance(event, Started):
                self._view_for_job()["run_id"] = event.run_id
                self._runlog(f"{event.kind} run {event.run_id} started")
            elif isinstance(event, Log):
                self._runlog(event.message, event.level)
            elif isinstance(event, Finished):
                self._view_for_job().update({"run_id": event.run_id, "summary": event.result})
            elif isinstance(event, Failed):
                self._runlog(event.error, "error")
        if last_progress is not None:
            p, now = last_progress, time.monotonic()
            shown_stage, shown_at = self._last_progress
            # The bar and its labels cost a repaint each: a few a second is plenty for a human to read.
            if p.stage != shown_stage or p.done >= p.total or now - shown_at >= self.PROGRESS_INTERVAL:
                self._status().stage(f"{p.stage} {p.message}".strip(), p.done, p.total, stage_key=p.stage)
                self._last_progress = (p.stage, now)
        if rows_changed and self.running in SCORED_JOBS:
            self._q(SummaryStrip).live(self.running, self._q(ResultsTable).rows_data, self.job_prompts)

    def _view_for_job(self) -> dict[str, Any]:
        return self._view_for_kind(self.running or "")

    def _view_of_tab(self) -> str:
        return view_of(str(self._q(TabbedContent).active))

    def _row_ready(self, table: str, row: dict[str, Any]) -> None:
        if table in ("baseline", "before", "edit"):
            self._q(ResultsTable).add_result(table, row)
            if table in ("baseline", "before"):
                self.baseline_rows[row["prompt"]] = row
        elif table == "side_effects":
            self._q(SummaryStrip).show_side_effects(row)
            flag = "  COLLAPSED" if row.get("collapsed") else ""
            self._runlog(
                f"side effects ({row.get('config') or 'preset'}): neutral ppl {row.get('ppl_before', 0):.2f} -> "
                f"{row.get('ppl_after', 0):.2f}, KL {row.get('kl_neutral', 0):.4f}{flag}",
                "warning" if flag else "info",
            )
        elif table == "ablation":
            self._q(AblationChart).add_config(row)
        elif table == "trace":
            self.trace_rows.append(row)

    def _error(self, message: str) -> None:
        # Messages may quote prompts or file names: plain text, never markup.
        self.notify(message, severity="error", timeout=8, markup=False)
        self._runlog(message, "error")

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None:
        """Every notification (the app's and its widgets') is plain text: messages quote prompts, run ids, paths
        and errors, so they are never parsed as markup and their control characters show as escapes."""
        super().notify(
            visible(message, one_line=False),
            title=visible(title),
            severity=severity,
            timeout=timeout,
            markup=False,
        )

    # ------------------------------------------------------------------ starting jobs

    def _can_run(self, kind: str) -> bool:
        if self.running:
            self.notify(f"A {self.running} is running; wait or cancel it (ctrl+x).", severity="warning")
            return False
        if self.workbench is None:
            if self.load_error:
                self._error(f"{self.load_error} Fix it in Settings (,) or restart with another --model.")
            else:
                self.notify("The model is still loading; try again in a moment.", severity="warning")
            return False
        if kind in SCORED_JOBS and self.workbench.scorer is None:
            reason = getattr(self.workbench, "scorer_error", None) or "No scorer is loaded."
            self._error(f"{reason} Choose a scorer in Settings (,); a trace needs none.")
            return False
        return True

    def _base_config(self) -> ExperimentConfig:
        """Model, scorer and prompt source as the settings say."""
        s = self.settings
        return ExperimentConfig(
            model=ModelConfig(name=self.model_name, device=s.device, dtype=s.dtype),
            scoring=ScoringConfig(scorer=s.scorer, trust_checkpoint=self.trust_checkpoint),
            prompts=self.prompts_source or "builtin",
            chat_template=s.chat_template,
        )

    def _config(self, method: str | None = None, layers: list[int] | None = None) -> ExperimentConfig:
        """The ExperimentConfig of the current form and settings (UserError for invalid fields); UI thread only."""
        cfg = self._base_config()
        form = self._q(MethodForm)
        run = form.run_settings()
        s = self.settings
        cfg.generation = GenerationConfig(
            samples=run["samples"],
            max_new_tokens=run["max_new_tokens"],
            seed=run["seed"],
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
        )
        cfg.scoring.threshold = run["threshold"]
        if s.eval_protocol:
            cfg.apply_eval_protocol(s.eval_protocol)
        if method is not None:
            cfg.method, cfg.mode, cfg.protocol = method, form.mode, form.protocol
            cfg.hparams = form.hparams()
            cfg.layers = layers
            cfg.rect = s.rect
        return cfg

    def _edit_layers(self, method: str) -> list[int] | None:
        layers = self._q(LayerPicker).selected_layers
        if not layers:
            from detox_tui.backends.editing.base import editor_class

            if editor_class(method).layers_optional:
                return None  # DINM locates its layer per prompt; AurA dampens every layer
            raise UserError("Select at least one layer in the Layers & Method tab (or pick a preset).")
        return layers

    def _check_edit_config(
        self, cfg: ExperimentConfig, items: list[PromptItem], configs: list[list[int]] | None = None
    ) -> None:
        """The engine's validation of the edit (``configs``: an ablation) before anything runs; no forward pass."""
        from detox_tui.pipeline.validation import validate_edit

        validate_edit(
            self.workbench.lm, cfg, items, configs=configs, ablation=configs is not None, names=APP_NAMES
        )

    def _start(self, kind: str, items: list[PromptItem], cfg: ExperimentConfig, extra: Any = None) -> None:
        """Reset every view the job fills, then start it in the engine worker."""
        self.job += 1
        self.running = kind
        self.followed = None
        self.cancel_event = threading.Event()
        self.feed = EngineFeed(self, self.job)
        self.job_prompts = len(items)
        view = {"kind": kind, "run_id": None, "summary": {}, "threshold": cfg.scoring.threshold}
        self.views[view_of(kind)] = view
        if kind in SCORED_JOBS:
            # An ablation's per-prompt rows are in the Results tab: one view object, so both get its run id.
            self.views["results"] = view
            self._q(ResultsTable).start(kind, cfg.scoring.threshold)
            self._q(SummaryStrip).running(kind, len(items))
            self._q(ScoreBars).clear()
        if kind == "ablation":
            self._q(AblationChart).reset()
        if kind == "trace":
            self.trace_rows = []
        self._runlog(f"starting {kind}" + (f" on {len(items)} prompt(s)" if items else ""))
        self._status().job_started()
        self._status().stage(kind, 0, 1)
        self._hold_full_collections(True)
        if kind in ("baseline", "edit"):
            self.action_show_tab("results")
        elif kind == "ablation":
            self.action_show_tab("ablation")
        self.engine_worker(self.job, kind, items, cfg, extra, self.cancel_event, self.feed)

    def action_baseline(self) -> None:
        """Baseline on the selected prompts."""
        if not self._can_run("baseline"):
            return
        try:
            items = self._selected_prompts()
            cfg = self._config()
        except UserError as exc:
            self._error(str(exc))
            return
        self._start("baseline", items, cfg)

    def action_edit(self) -> None:
        """Edit with the chosen method and layers, measured before and after."""
        if not self._can_run("edit"):
            return
        form = self._q(MethodForm)
        try:
            items = self._selected_prompts()
            layers = self._edit_layers(form.method)
            cfg = self._config(form.method, layers)
            self._check_edit_config(cfg, items)
        except UserError as exc:
            self._error(str(exc))
            return
        self._start("edit", items, cfg)

    def action_ablation(self) -> None:
        """One edit per configuration in the ablation list."""
        if not self._can_run("ablation"):
            return
        form = self._q(MethodForm)
        configs = [list(c) for c in self._q(LayerPicker).configs]
        try:
            items = self._selected_prompts()
            if not configs:
                raise UserError(
                    "The ablation list is empty; add layer configurations in the Layers & Method tab."
                )
            cfg = self._config(form.method, None)
            self._check_edit_config(cfg, items, configs)
        except UserError as exc:
            self._error(str(exc))
            return
        self._start("ablation", items, cfg, configs)

    def action_trace(self) -> None:
        """Causal trace of the Trace tab's prompt and continuation."""
        if not self._can_run("trace"):
            return
        if self._q(TabbedContent).active != "trace":
            self._prefill_trace()
            self.action_show_tab("trace")
            self.notify("Check the prompt and continuation, then press t again to trace.")
            return
        from detox_tui.pipeline.trace_run import TraceSpec

        try:
            request = self._q(TracePanel).request()
            seed = self._q(MethodForm).run_settings()["seed"]
        except UserError as exc:
            self._error(str(exc))
            return
        spec = TraceSpec(
            prompt=request.prompt,
            continuation=request.continuation,
            kind=request.kind,
            window=request.window,
            subject=request.subject,
            seed=seed,
        )
        self._start("trace", [], self._base_config(), spec)

    def _selected_prompts(self) -> list[PromptItem]:
        items = self._q(PromptPicker).selected_items()
        if not items:
            raise UserError("No prompts are selected; pick at least one in the Prompts tab.")
        return items

    def _prefill_trace(self) -> None:
        picker = self._q(PromptPicker)
        items = picker.selected_items() or picker.items
        lst = self._q("#prompt-list")
        visible = picker.visible_indices()
        if lst.highlighted is not None and visible:
            items = [picker.items[visible[min(lst.highlighted, len(visible) - 1)]]]
        if not items:
            return
        item = items[0]
        continuation = item.toxic
        row = self.baseline_rows.get(item.prompt)
        if not continuation and row and row.get("generations") and row.get("samples"):
            best = max(range(len(row["generations"])), key=lambda i: row["samples"][i])
            continuation = row["generations"][best]
        self._q(TracePanel).prefill(item.prompt, continuation, item.subject)

    # ------------------------------------------------------------------ the engine worker

    @work(thread=True, exclusive=True, group="engine", exit_on_error=False)
    def engine_worker(
        self,
        job: int,
        kind: str,
        items: list[PromptItem],
        cfg: ExperimentConfig,
        extra: Any,
        cancel: threading.Event,
        feed: EngineFeed,
    ) -> None:
        try:
            result = run_job(self.workbench, kind, items, cfg, extra, feed, cancel)
        except Cancelled:
            self.post_message(JobEnded(job, kind, error="cancelled"))
        except UserError as exc:
            self.post_message(JobEnded(job, kind, error=str(exc)))
        except Exception as exc:  # noqa: BLE001 - reported in the log with its traceback
            log.exception("%s failed", kind)
            feed(Failed(f"{kind} failed: {exc}", traceback.format_exc()))
            self.post_message(JobEnded(job, kind, error=f"{kind} failed: {type(exc).__name__}: {exc}"))
        else:
            self.post_message(JobEnded(job, kind, result=result))

    @on(JobEnded)
    def _job_ended(self, message: JobEnded) -> None:
        if message.job != self.job:
            return
        self._flush_feed()  # every event the job emitted before it returned
        kind, error, result = message.kind, message.error, message.result
        self.running = None
        self._hold_full_collections(False)
        view = self._view_for_kind(kind)
        run_id = view.get("run_id")
        stored = f"; stored as run {run_id}" if run_id else ""
        status = self._status()
        if error == "cancelled":
            view["status"] = "cancelled"
            status.job_ended("cancelled")
            detail = f"the original weights are in place{stored}"
            if kind in SCORED_JOBS:
                self._q(SummaryStrip).ended(kind, "cancelled", detail)
                self._q(ResultsTable).stop_pending("not measured (cancelled)")
            self._runlog(f"{kind} cancelled; {detail}", "warning")
            self.notify(f"{kind.capitalize()} cancelled; {detail}.", severity="warning")
        elif error:
            view["status"] = "failed"
            status.job_ended("failed")
            if kind in SCORED_JOBS:
                self._q(SummaryStrip).ended(kind, "failed", error)
                self._q(ResultsTable).stop_pending("not measured (failed)")
            self._error(error)
        else:
            view.update(
                {"run_id": result.run_id, "summary": result.summary, "kind": kind, "status": "finished"}
            )
            status.job_ended("finished")
            if kind == "trace":
                self._show_trace(result.trace)
                self.trace_rows = list(result.rows)
            else:
                strip = self._q(SummaryStrip)
                summary = result.summary
                if kind == "edit" and result.side_effects:
                    summary = {**result.side_effects, **summary}
                strip.show(kind, summary)
                self._update_flags(result.rows, kind)
                self._runlog(summary_text(kind, result.summary).plain)
            self._runlog(f"{kind} run {result.run_id} finished")
            self.notify(f"{kind.capitalize()} finished (run {result.run_id}).")
            note = result.summary.get("convergence_note") if kind == "edit" else None
            if note:
                self._runlog(note, "warning")
                self.notify(
                    note, title="Edits that did not take", severity="warning", markup=False, timeout=15
                )
        self.bell()
        self._runs_signature = None  # re-read the runs list at the next poll

    def _hold_full_collections(self, hold: bool) -> None:
        """No full garbage collection while a job runs (young generations are still collected); one when it ends.

        A full collection holds the GIL for as long as it scans, so one in the middle of a job stalls the UI
        thread; at the end of a job, with the model frozen (see _workbench_loaded), it scans only what the app
        made since it loaded.
        """
        young, middle, old = gc.get_threshold()
        if hold:
            self._gc_old_threshold = old
            gc.set_threshold(young, middle, 1_000_000)
        else:
            gc.set_threshold(young, middle, getattr(self, "_gc_old_threshold", old))
            gc.collect()

    def _view_for_kind(self, kind: str) -> dict[str, Any]:
        return self.views.setdefault(view_of(kind), {})

    def _update_flags(self, rows: list[dict[str, Any]], kind: str) -> None:
        threshold = self.views.get("results", {}).get("threshold", 0.1)
        if kind == "baseline":
            means = {r["prompt"]: r["mean"] for r in rows}
        else:
            means = {r["prompt"]: r["before"]["mean"] for r in rows if r.get("before")}
        if means:
            self._q(PromptPicker).set_baseline(means, threshold)

    def _show_trace(self, trace: Any) -> None:
        from detox_tui.backends.tracing import peak_layers

        peak = peak_layers(trace, k=min(3, trace.layers))
        title = (
            f"{trace.kind} trace of {trace.continuation.strip()!r}: "
            f"p clean {trace.p_clean:.3f}, corrupted {trace.p_corrupted:.3f}"
        )
        self._q(TracePanel).show_result(trace.tokens, trace.scores, peak, title)
        self._q(LayerPicker).set_trace_peak(peak)
        self._runlog(f"trace finished; peak layers {peak}")

    # ------------------------------------------------------------------ cancel, leave, quit

    def action_cancel(self) -> None:
        """Ask, then stop the running job at its next step; the engine restores the weights."""
        if not self.running:
            self.notify("Nothing is running.", timeout=2)
            return
        job, kind = self.job, self.running

        def answer(yes: bool | None) -> None:
            if yes and self.running and self.job == job:
                self.cancel_event.set()
                self._status().stage(f"cancelling {kind}…", 0, 0)
                self._runlog(f"cancel requested for {kind}", "warning")

        self.push_screen(
            ConfirmDialog(
                f"Cancel the running {kind}?",
                "It stops at its next step; the original weights are restored and the run is stored as cancelled.",
                yes="Cancel run",
                no="Keep running",
            ),
            answer,
        )

    def action_leave_field(self) -> None:
        """Escape: leave a text field for the tab's main widget. It never cancels a job."""
        if isinstance(self.focused, Input):
            target = TAB_FOCUS.get(str(self._q(TabbedContent).active))
            if target:
                self._q(target).focus()

    async def action_quit(self) -> None:
        if not self.running:
            self.exit()
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.cancel_event.set()
                self.exit()

        self.push_screen(
            ConfirmDialog(
                f"Quit while a {self.running} runs?",
                "The job is cancelled; whatever it finished is already in the run store.",
                yes="Quit",
                no="Keep running",
            ),
            answer,
        )

    # ------------------------------------------------------------------ help and settings

    def action_help(self) -> None:
        """The current tab's keys and the global ones."""
        if isinstance(self.screen, HelpScreen):
            return
        tab = str(self._q(TabbedContent).active)
        title = dict(TABS).get(tab, tab)
        tab_bindings: list[Binding] = []
        target = TAB_FOCUS.get(tab)
        if target:
            # Our widgets' own keys (the framework's cursor keys are summarised in one line).
            node: Any = self._q(target)
            while isinstance(node, Widget) and not isinstance(node, Screen):
                for cls in type(node).__mro__:
                    if cls.__module__.startswith("detox_tui.") and "BINDINGS" in cls.__dict__:
                        tab_bindings += [b for b in cls.__dict__["BINDINGS"] if isinstance(b, Binding)]
                node = node.parent
        global_bindings = [b for _key, b in self._bindings]
        sections = [
            (
                f"{title} tab",
                [*binding_rows(self, tab_bindings), ("↑ ↓ pgup pgdn", "Move; tab moves between fields")],
            ),
            ("Everywhere", binding_rows(self, global_bindings)),
        ]
        self.push_screen(HelpScreen(sections))

    def action_settings(self) -> None:
        """Scorer, device, dtype, sampling, protocol, chat prompts and RECT, applied without a restart."""
        if isinstance(self.screen, SettingsDialog):
            return

        def apply(new: Settings | None) -> None:
            if new is None or new == self.settings:
                return
            changes = settings_changes(self.settings, new)
            if self.running and changes & {"model", "scorer"}:
                self._error(f"A {self.running} is running; change the scorer or device when it ends.")
                return
            old, self.settings = self.settings, new
            if "sampling" in changes:
                what = (
                    f"the {new.eval_protocol} protocol"
                    if new.eval_protocol
                    else (f"temperature {new.temperature}, top-p {new.top_p}, top-k {new.top_k}")
                )
                self._runlog(f"sampling for the next runs: {what}")
                self.notify(f"The next runs sample with {what}.", timeout=4)
            if "runs" in changes:
                what = f"chat template {new.chat_template}, RECT " + (
                    "off" if new.rect is None else f"{new.rect:g}%"
                )
                self._runlog(f"next runs: {what}")
                self.notify(f"The next runs use {what}.", timeout=4)
            if "model" in changes or (self.workbench is None and "scorer" in changes):
                self._runlog(f"reloading {self.model_name} on {new.device} ({new.dtype}) with {new.scorer}")
                self.workbench = None
                gc.unfreeze()  # the model being replaced was frozen when it loaded: let it be collected
                self._status().set_model(self._model_status("loading"))
                self.load_workbench_worker(self._base_config())
            elif "scorer" in changes:
                self._status().set_model(self._model_status(f"loading scorer {new.scorer}…"))
                self.scorer_worker(new.scorer, old.scorer)

        self.push_screen(SettingsDialog(self.settings, SCORER_SUGGESTIONS), apply)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def scorer_worker(self, name: str, previous: str) -> None:
        try:
            self.workbench.set_scorer(name)
        except UserError as exc:
            self.post_message(ScorerChanged(previous, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - shown to the user
            log.exception("scorer failed")
            self.post_message(ScorerChanged(previous, f"The scorer '{name}' did not load: {exc}."))
            return
        self.post_message(ScorerChanged(name))

    @on(ScorerChanged)
    def _scorer_changed(self, message: ScorerChanged) -> None:
        if message.error:
            self.settings = replace(self.settings, scorer=message.name)
            self._error(message.error)
        else:
            self._runlog(f"scorer: {message.name}")
            self.notify(f"Scorer {message.name} loaded.", timeout=3)
        self._show_model_status()

    # ------------------------------------------------------------------ the run store: list, follow, open

    def _poll_store(self) -> None:
        if self.workbench is None:
            return
        if self._sweep_due():
            self._read_sweep()
        if self._polling:
            return
        self._polling = True
        self.store_worker(
            self.workbench,
            dict(self.followed) if self.followed else None,
            self._runs_signature,
            bool(self.running),
        )

    @work(thread=True, exclusive=True, group="store", exit_on_error=False)
    def store_worker(self, wb: Any, followed: dict[str, Any] | None, signature: Any, busy: bool) -> None:
        """Read the store off the UI thread; the snapshot carries only what changed."""
        self.post_message(read_store(wb, followed, signature, busy))

    @on(StoreSnapshot)
    def _store_snapshot(self, message: StoreSnapshot) -> None:
        self._polling = False
        if message.error:
            self._runlog(message.error, "error")
            return
        if message.runs is not None:
            self._runs_signature = runs_signature(message.runs)
            self._q(RunsBrowser).set_runs(message.runs)
            self._sweeps_listed(message.runs)
        if message.memory is not None or self.running:
            self._status().set_memory(message.memory)
        if message.followed is not None and self.followed and message.followed["id"] == self.followed["id"]:
            run = message.followed
            self.followed.update({"n_rows": run.get("n_rows"), "status": run["status"]})
            self._show_run(run, message.followed_rows, quiet=True)
            if run["status"] != "running":
                self.notify(f"Run {run['id']} {run['status']}.", timeout=5)
                self.bell()
                self.followed = None

    def action_reload_runs(self) -> None:
        self._runs_signature = None
        self._poll_store()

    @on(RunsBrowser.Reload)
    def _reload(self) -> None:
        self.action_reload_runs()

    @on(RunsBrowser.Open)
    @on(SweepsView.OpenRun)
    def _open_run(self, event: RunsBrowser.Open | SweepsView.OpenRun) -> None:
        # A sweep opens in the Sweeps tab, so a running job keeps its views.
        if getattr(event, "kind", None) == "sweep":
            self.open_run_worker(self.workbench, event.run_id)
            return
        if self.running:
            self.notify(
                f"A {self.running} is running and its results are on screen; open runs when it ends.",
                severity="warning",
            )
            return
        self.open_run_worker(self.workbench, event.run_id)

    @work(thread=True, exclusive=True, group="open", exit_on_error=False)
    def open_run_worker(self, wb: Any, run_id: str) -> None:
        try:
            self.post_message(read_run(wb, run_id))
        except UserError as exc:
            self.post_message(LoadFailed("run", str(exc)))

    @on(RunOpened)
    def _run_opened(self, message: RunOpened) -> None:
        run = message.run
        if run["kind"] == "sweep":
            self._show_sweep(run, message.rows.get("sweep", []), opened=True)
            return
        if self.running:
            return
        self._show_run(run, message.rows, trace=message.trace)
        if run["status"] == "running":
            self.followed = {"id": run["id"], "n_rows": run.get("n_rows"), "status": "running"}
            self.notify(f"Following {run['kind']} run {run['id']} as it runs.", timeout=4)
        else:
            self.followed = None
            self.notify(f"Opened {run['kind']} run {run['id']} ({run['status']}).", timeout=4)

    def _show_run(
        self,
        run: dict[str, Any],
        rows: dict[str, list[dict[str, Any]]],
        trace: Any = None,
        quiet: bool = False,
    ) -> None:
        """Fill the views from a stored run (finished, or still being written by another process)."""
        kind, status = run["kind"], run["status"]
        threshold = ((run.get("config") or {}).get("scoring") or {}).get("threshold", 0.1)
        meta = {
            "kind": kind,
            "run_id": run["id"],
            "summary": run.get("summary") or {},
            "threshold": threshold,
            "status": status,
        }
        if kind == "trace":
            self.views["trace"] = meta
            self.trace_rows = rows.get("trace", [])
            if trace is not None:
                self._show_trace(trace)
            if not quiet:
                self.action_show_tab("trace")
            return
        table = self._q(ResultsTable)
        n_prompts = len(run.get("prompts") or [])
        if kind == "baseline":
            table.load_rows("baseline", rows.get("baseline", []), threshold)
        else:
            table.load_rows("edit", rows.get("edit", []), threshold)
        self.views["results"] = meta  # an ablation's per-prompt rows: the same run as its chart
        if kind == "ablation":
            self.views["ablation"] = meta
            chart = self._q(AblationChart)
            chart.reset()
            for row in rows.get("ablation", []):
                chart.add_config(row)
        strip = self._q(SummaryStrip)
        if status == "finished":
            strip.show(kind, run.get("summary") or {})
        elif status == "running":
            strip.running(kind, n_prompts, f"{kind} run {run['id']} running in another process")
            strip.live(kind, table.rows_data, n_prompts)
        else:
            strip.ended(kind, status, run.get("error") or "")
        if not quiet:
            self.action_show_tab("ablation" if kind == "ablation" else "results")

    # ------------------------------------------------------------------ sweeps (written by `detox-tui sweep`)

    def _sweeps_listed(self, runs: list[dict[str, Any]]) -> None:
        """Show the newest sweep unless the user opened one; re-read the shown sweep when its status changed."""
        sweeps = [r for r in runs if r.get("kind") == "sweep"]  # newest first
        shown = self.sweep
        if sweeps and (shown is None or (not shown["chosen"] and sweeps[0]["id"] != shown["id"])):
            newest = sweeps[0]
            self.sweep = {"id": newest["id"], "status": None, "listed": newest["status"], "chosen": False}
        elif shown is not None:
            listed = next((r for r in sweeps if r["id"] == shown["id"]), None)
            if listed is not None:
                shown["listed"] = listed["status"]  # a change (finished, resumed) makes it due for a read
        if self._sweep_due():
            self._read_sweep()

    def _sweep_due(self) -> bool:
        """The shown sweep needs a read: not read yet, running, or its listed status differs from the one read."""
        shown = self.sweep
        if shown is None:
            return False
        return shown["status"] in (None, "running") or shown["listed"] not in (None, shown["status"])

    def _read_sweep(self) -> None:
        if self.workbench is None or self.sweep is None or self._sweep_polling:
            return
        self._sweep_polling = True
        self.sweep_worker(self.workbench, self.sweep["id"])

    @work(thread=True, exclusive=True, group="sweep", exit_on_error=False)
    def sweep_worker(self, wb: Any, run_id: str) -> None:
        """Read a sweep and all its rows: a row's state changes without the row count changing."""
        try:
            run = wb.store.get_run(run_id)
            rows = wb.store.rows(run["id"], "sweep")
        except UserError as exc:
            self.post_message(SweepRead(run_id, error=str(exc)))
        except Exception as exc:  # noqa: BLE001 - a store read failing must not end the app
            log.exception("reading sweep %s failed", run_id)
            self.post_message(SweepRead(run_id, error=f"Reading sweep {run_id} failed: {exc}"))
        else:
            self.post_message(SweepRead(run_id, run, rows))

    @on(SweepRead)
    def _sweep_read(self, message: SweepRead) -> None:
        self._sweep_polling = False
        if self.sweep is None or message.run_id != self.sweep["id"]:
            return  # another sweep was opened meanwhile
        if message.run is None:
            # No more reads until the runs list shows its status change.
            self.sweep["status"] = self.sweep["listed"] = "unreadable"
            self._error(message.error or f"Sweep {message.run_id} could not be read.")
            return
        self._show_sweep(message.run, message.rows)

    def _show_sweep(self, run: dict[str, Any], rows: list[dict[str, Any]], opened: bool = False) -> None:
        """Fill the Sweeps tab (and the Ablation tab's bars, see _sweep_to_chart) from a stored sweep."""
        shown = self.sweep if self.sweep is not None and self.sweep["id"] == run["id"] else None
        was_running = shown is not None and shown["status"] == "running"
        status = run["status"]
        self.sweep = {
            "id": run["id"],
            "status": status,
            "listed": shown["listed"] if shown is not None else None,
            "chosen": opened or bool(shown and shown["chosen"]),
        }
        self._q(SweepsView).show_sweep(run["id"], rows)
        self._q("#sweep-summary", Static).update(sweep_summary(run, rows))
        meta = {"kind": "sweep", "run_id": run["id"], "summary": run.get("summary") or {}, "status": status}
        self.views["sweeps"] = meta
        self._sweep_to_chart(meta, rows, opened)
        if opened:
            self.action_show_tab("sweeps")
            if status == "running":
                self.notify(f"Following sweep {run['id']} as it runs.", timeout=4)
            else:
                self.notify(f"Opened sweep {run['id']} ({status}).", timeout=4)
        elif was_running and status != "running":
            self._runlog(f"sweep {run['id']} {status}")
            self.notify(f"Sweep {run['id']} {status}.", timeout=5)
            self.bell()

    def _sweep_to_chart(self, meta: dict[str, Any], rows: list[dict[str, Any]], opened: bool) -> None:
        """The finished experiments as the Ablation tab's bars (their key is the label), unless that tab holds an
        ablation: one running, or one opened or run since (an opened sweep replaces a finished one)."""
        current = self.views.get("ablation")
        if self.running == "ablation" or (not opened and current and current.get("kind") != "sweep"):
            return
        chart = self._q(AblationChart)
        if not current or current.get("run_id") != meta["run_id"]:
            chart.reset()
        self.views["ablation"] = dict(meta)
        for row in rows:
            if row.get("state") != "finished" or row.get("share_detoxified") is None:
                continue
            if chart.rows_by_key.get(str(row.get("key"))) != row:
                chart.add_config(row)

    @on(RunsBrowser.Compare)
    def _compare(self, event: RunsBrowser.Compare) -> None:
        store = self.workbench.store
        try:
            first, second = store.get_run(event.first), store.get_run(event.second)
        except UserError as exc:
            self._error(str(exc))
            return
        self.push_screen(CompareRuns(first, second))

    # ------------------------------------------------------------------ other actions

    def action_show_tab(self, tab: str) -> None:
        """Show a tab and move the focus to its main widget (so the tab's keys work at once)."""
        self._q(TabbedContent).active = tab
        target = TAB_FOCUS.get(tab)
        if target and self.screen is self.screen_stack[0]:
            self._q(target).focus()

    def action_focus_filter(self) -> None:
        self.action_show_tab("prompts")
        self._q("#prompt-filter").focus()

    def action_select_all(self) -> None:
        self._q(PromptPicker).select_all()

    def action_select_none(self) -> None:
        self._q(PromptPicker).select_none()

    def action_select_flagged(self) -> None:
        if not self._q(PromptPicker).select_flagged():
            self.notify(
                "Run a baseline first: flagged prompts are those at or above the threshold.",
                severity="warning",
            )

    def action_add_config(self) -> None:
        if self._q(LayerPicker).add_config():
            self.notify("Added the selected layers to the ablation list.", timeout=2)
        else:
            self.notify("Select layers not already in the ablation list first.", severity="warning")

    def action_detail(self) -> None:
        row = self._q(ResultsTable).selected_row()
        if row is None:
            self.notify("No result rows yet.", severity="warning")
            return
        self.push_screen(PromptDetail(row))

    @on(ResultsTable.OpenDetail)
    def _open_detail(self, event: ResultsTable.OpenDetail) -> None:
        self.push_screen(PromptDetail(event.row))

    @on(ResultsTable.RowHighlightedData)
    def _row_highlighted(self, event: ResultsTable.RowHighlightedData) -> None:
        self._q(ScoreBars).show_row(event.row)

    def _export_rows(self) -> tuple[str, list[dict[str, Any]]]:
        view = self._view_of_tab()
        if view == "ablation":
            return "ablation", list(self._q(AblationChart).rows_by_key.values())
        if view == "trace":
            return "trace", list(self.trace_rows)
        if view == "sweeps":
            view_rows = self._q(SweepsView).rows_by_id
            return "sweep", [view_rows[key] for key in sorted(view_rows)]
        table = self._q(ResultsTable)
        return table.mode, [r for r in table.rows_data if not r.get("pending")]

    def action_export(self) -> None:
        """Export the current tab's table through a dialog."""
        kind, rows = self._export_rows()
        if not rows:
            self.notify("There are no rows to export yet.", severity="warning")
            return
        view = self.views.get(self._view_of_tab(), {})
        run_id = view.get("run_id")
        if not run_id:
            self.notify("The run has not been stored yet; export when it has started.", severity="warning")
            return
        default = str(Path.cwd() / f"detox-{kind}-{run_id}.csv")

        def write(request: ExportRequest | None) -> None:
            if request is None:
                return
            from detox_tui.pipeline.results import export_files

            meta = {
                "run_id": run_id,
                "kind": kind,
                "status": view.get("status") or "running",
                "model": self.model_name,
                "summary": view.get("summary") or {},
            }
            try:
                # A clash between the format and the file's extension is refused here too (a UserError).
                paths = export_files(
                    rows,
                    request.path,
                    request.fmt,
                    meta=meta,
                    overwrite=True,
                    columns=request.columns,
                    kind=kind,
                )
            except UserError as exc:
                self._error(str(exc))
                return
            path = paths[0]
            also = f" (summary in {paths[1].name})" if len(paths) > 1 else ""
            self._runlog(f"exported {len(rows)} rows to {path}{also}")
            self.notify(f"Wrote {len(rows)} rows to {path}{also}.", markup=False)

        self.push_screen(ExportDialog(default), write)

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        tab = event.pane.id if event.pane is not None else None
        if tab == "trace" and not self.running:
            self._prefill_trace()

    @on(Input.Submitted, "#trace-prompt, #trace-cont, #trace-window")
    def _trace_submitted(self) -> None:
        self.action_trace()

    @on(MethodForm.MethodChanged)
    def _method_changed(self, event: MethodForm.MethodChanged) -> None:
        if self.workbench is not None:
            picker = self._q(LayerPicker)
            picker.set_default(self._default_layers(event.method), select=True)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        keys: dict[str, list[str]] = {}
        for c in COMMANDS:
            keys.setdefault(c.action, []).append(self.get_key_display(Binding(c.key, c.action)))
        for c in COMMANDS:
            if c.action not in keys or c.action == "quit":
                continue
            shown = ", ".join(keys.pop(c.action))
            yield SystemCommand(f"{c.title}  ({shown})", c.help, getattr(self, f"action_{c.action}"))
        for tab, action, title, help_text in WIDGET_COMMANDS:
            yield SystemCommand(title, help_text, lambda t=tab, a=action: self._widget_action(t, a))
        for i, (tab, title) in enumerate(TABS):
            yield SystemCommand(
                f"Go to {title}  ({i + 1})", f"Show the {title} tab", lambda t=tab: self.action_show_tab(t)
            )

    def _widget_action(self, tab: str, action: str) -> None:
        self.action_show_tab(tab)
        widget = self._q(TAB_FOCUS[tab])
        method = getattr(widget, f"action_{action}", None)
        if method is not None:
            method()
