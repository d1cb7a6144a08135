"""The Textual app: pick prompts, layers and a method, run the engine in workers, watch results arrive, export."""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, ProgressBar, TabbedContent, TabPane

from detox_tui.config import (
    DEFAULT_MODEL,
    DEFAULT_SCORER,
    ExperimentConfig,
    GenerationConfig,
    ModelConfig,
    ScoringConfig,
)
from detox_tui.errors import Cancelled, UserError
from detox_tui.events import Event, Failed, Finished, Log, Progress, RowReady
from detox_tui.prompts.base import PromptItem
from detox_tui.widgets.ablation_chart import AblationChart
from detox_tui.widgets.export_dialog import ExportDialog, ExportRequest
from detox_tui.widgets.layer_picker import LayerPicker
from detox_tui.widgets.method_form import MethodForm
from detox_tui.widgets.prompt_detail import PromptDetail
from detox_tui.widgets.prompt_picker import PromptPicker
from detox_tui.widgets.results_table import ResultsTable
from detox_tui.widgets.run_log import RunLog
from detox_tui.widgets.runs_browser import CompareRuns, RunsBrowser
from detox_tui.widgets.score_bars import ScoreBars
from detox_tui.widgets.summary_strip import SummaryStrip, summary_text
from detox_tui.widgets.trace_panel import TracePanel

log = logging.getLogger(__name__)

TABS: tuple[tuple[str, str], ...] = (
    ("prompts", "Prompts"),
    ("setup", "Layers & Method"),
    ("results", "Results"),
    ("ablation", "Ablation"),
    ("trace", "Trace"),
    ("runs", "Runs"),
    ("log", "Log"),
)

# The widget that gets the focus when a tab is shown.
TAB_FOCUS: dict[str, str] = {
    "prompts": "#prompt-list",
    "setup": "#layer-toggles",
    "results": "#results-table",
    "ablation": "#ablation-chart",
    "trace": "#trace-scroll",
    "runs": "#runs-browser",
    "log": "#run-log",
}

# How the engine's validation (pipeline.validation.validate_edit) names the app's controls in its messages.
APP_NAMES: dict[str, str] = {
    "method": "the method",
    "mode": "the mode",
    "erase": "the erase mode",
    "layers": "the layer selection",
    "configs": "ablation list",
}

# (action, title, help) for the command palette; every one also has a key binding.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("baseline", "Run baseline", "Sample and score the selected prompts on the original model"),
    (
        "edit",
        "Run edit",
        "Edit with the chosen method and layers, then measure before/after and side effects",
    ),
    ("ablation", "Run ablation", "One edit per layer configuration in the ablation list"),
    ("trace", "Run causal trace", "Trace which layers carry the continuation (Trace tab)"),
    ("cancel", "Cancel run", "Stop the running job at the next step; weights are restored"),
    ("export", "Export table", "Write the current results table to CSV, JSON, Markdown or LaTeX"),
    ("detail", "Prompt detail", "Generations before and after for the highlighted row"),
    ("select_all", "Select all prompts", "Select every prompt the filter shows"),
    ("select_none", "Select no prompts", "Deselect every prompt the filter shows"),
    ("select_flagged", "Select flagged prompts", "Prompts whose baseline mean is at or above the threshold"),
    ("focus_filter", "Filter prompts", "Type to filter the prompt list"),
    ("add_config", "Add layers to ablation list", "Add the selected layers as an ablation configuration"),
    ("reload_runs", "Reload runs", "Refresh the runs list from the store"),
)


class DetoxApp(App[None]):
    """detox-tui's interactive front end; all model work happens in thread workers."""

    CSS_PATH = "app.tcss"
    TITLE = "detox-tui"
    BINDINGS = [
        Binding("b", "baseline", "Baseline"),
        Binding("e", "edit", "Edit"),
        Binding("a", "ablation", "Ablation"),
        Binding("t", "trace", "Trace"),
        Binding("x", "export", "Export"),
        Binding("d", "detail", "Detail", show=False),
        Binding("ctrl+x", "cancel", "Cancel", priority=True),
        Binding("escape", "cancel(True)", "Cancel", show=False),
        Binding("slash", "focus_filter", "Filter", show=False),
        Binding("ctrl+a", "select_all", "All", show=False),
        Binding("ctrl+n", "select_none", "None", show=False),
        Binding("f", "select_flagged", "Flagged", show=False),
        Binding("plus", "add_config", "Add config", show=False),
        *[
            Binding(str(i + 1), f"show_tab('{tab}')", title, show=False)
            for i, (tab, title) in enumerate(TABS)
        ],
        Binding("q", "quit", "Quit", show=False),
    ]

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
    ) -> None:
        super().__init__()
        self.model_name = model
        self.prompts_source = prompts
        self.scorer_name = scorer
        self.device_name = device
        self.dtype_name = dtype
        self.data_dir = data_dir
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
        self.running: str | None = None  # kind of the run in progress
        self.current_run: dict[str, Any] = {}  # run_id, kind, summary of what the results tabs show
        self.baseline_rows: dict[str, dict[str, Any]] = {}
        self.last_trace: Any = None

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
                    "Ablation: share of prompts detoxified (a significant fall of at least --min-reduction, no collapse)",
                    classes="dim",
                )
                yield AblationChart(id="ablation-chart")
            with TabPane("Trace", id="trace"):
                yield TracePanel(id="trace-panel")
            with TabPane("Runs", id="runs"):
                yield Label("enter open  space mark  c compare two marked runs  r reload", classes="dim")
                yield RunsBrowser(id="runs-browser")
            with TabPane("Log", id="log"):
                yield RunLog(id="run-log")
        with Horizontal(id="status-bar"):
            yield Label(self._model_status("loading"), id="model-status")
            yield Label("idle", id="stage")
            yield ProgressBar(total=1, id="progress", show_eta=True, show_percentage=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = self._short_model()
        self.query_one(RunLog).log_message(f"loading {self.model_name} with the {self.scorer_name} scorer")
        self.load_prompts_worker()
        self.load_workbench_worker(self._base_config())
        if self.initial_run_settings:
            self.query_one(MethodForm).set_run_settings(self.initial_run_settings)
        self.query_one("#prompt-list").focus()

    def _short_model(self) -> str:
        return Path(str(self.model_name).rstrip("/")).name or str(self.model_name)

    def _model_status(self, state: str) -> Text:
        text = Text(f"{self._short_model()} ", style="bold")
        if state == "loading":
            text.append("loading…", style="yellow")
        elif state == "error":
            text.append("failed to load", style="bold red")
        else:
            text.append(state, style="green")
        return text

    # ------------------------------------------------------------------ loading

    @work(thread=True, group="prompts", exit_on_error=False)
    def load_prompts_worker(self) -> None:
        from detox_tui.prompts.loaders import load_prompts

        try:
            items = load_prompts(self.prompts_source)
        except UserError as exc:
            self._from_thread(self._error, str(exc))
            return
        self._from_thread(self._prompts_loaded, items)

    def _prompts_loaded(self, items: list[PromptItem]) -> None:
        self.query_one(PromptPicker).set_items(items)
        self.query_one(RunLog).log_message(
            f"{len(items)} prompts from {self.prompts_source or 'the builtin set'}"
        )

    @work(thread=True, group="load", exit_on_error=False)
    def load_workbench_worker(self, cfg: ExperimentConfig) -> None:
        from detox_tui.pipeline.experiment import Workbench

        try:
            wb = Workbench.load(cfg, data_dir=self.data_dir, emit=self._emitter())
        except UserError as exc:
            self._from_thread(self._load_failed, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged with its traceback
            log.exception("loading failed")
            self._from_thread(self._load_failed, f"{type(exc).__name__}: {exc}")
            return
        self._from_thread(self._workbench_loaded, wb)

    def _load_failed(self, message: str) -> None:
        self.load_error = message
        self.query_one("#model-status", Label).update(self._model_status("error"))
        self.query_one("#stage", Label).update("")
        self._error(message)

    def _workbench_loaded(self, wb: Any) -> None:
        self.workbench = wb
        lm = wb.lm
        self.query_one("#model-status", Label).update(
            self._model_status(f"{lm.n_layers} layers · {lm.device} · {wb.scorer.name}")
        )
        form = self.query_one(MethodForm)
        if self.initial_method:
            form.set_method(self.initial_method)
            if self.initial_hparams:
                form.set_defaults(self.initial_method, self.initial_hparams)
        form.set_model(lm)
        self.query_one(LayerPicker).set_model(lm.n_layers, self._default_layers(form.method))
        if self.initial_ablation:
            self.query_one(LayerPicker).set_configs(self.initial_ablation)
        self._set_stage("ready", 1, 1)
        self.query_one(RunLog).log_message(f"loaded {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}")
        self.action_reload_runs()

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

    # ------------------------------------------------------------------ thread plumbing

    def _from_thread(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the UI thread; a no-op once the app has closed."""
        try:
            self.call_from_thread(fn, *args)
        except RuntimeError:
            pass

    def _emitter(self) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            self._from_thread(self.handle_event, event)

        return emit

    def handle_event(self, event: Event) -> None:
        """Route one engine event to the widgets (UI thread)."""
        if isinstance(event, Progress):
            self._set_stage(f"{event.stage} {event.message}".strip(), event.done, event.total)
        elif isinstance(event, RowReady):
            self._row_ready(event.table, event.row)
        elif isinstance(event, Log):
            self.query_one(RunLog).log_message(event.message, event.level)
        elif isinstance(event, Finished):
            self.current_run["run_id"] = event.run_id
            self.current_run["summary"] = event.result
        elif isinstance(event, Failed):
            self.query_one(RunLog).log_message(event.error, "error")

    def _set_stage(self, label: str, done: int, total: int) -> None:
        self.query_one("#stage", Label).update(f"{label} {done}/{total}" if total else label)
        self.query_one(ProgressBar).update(total=max(total, 1), progress=done)

    def _row_ready(self, table: str, row: dict[str, Any]) -> None:
        if table in ("baseline", "before", "edit"):
            self.query_one(ResultsTable).add_result(table, row)
            if table in ("baseline", "before"):
                self.baseline_rows[row["prompt"]] = row
        elif table == "side_effects":
            self.query_one(SummaryStrip).show_side_effects(row)
            flag = "  COLLAPSED" if row.get("collapsed") else ""
            self.query_one(RunLog).log_message(
                f"side effects ({row.get('config') or 'preset'}): neutral ppl {row.get('ppl_before', 0):.2f} -> "
                f"{row.get('ppl_after', 0):.2f}, KL {row.get('kl_neutral', 0):.4f}{flag}",
                "warning" if flag else "info",
            )
        elif table == "ablation":
            self.query_one(AblationChart).add_config(row)

    def _error(self, message: str) -> None:
        self.notify(message, severity="error", timeout=8)
        self.query_one(RunLog).log_message(message, "error")

    # ------------------------------------------------------------------ starting runs

    def _can_run(self) -> bool:
        if self.running:
            self.notify(f"A {self.running} is running; wait or cancel it (ctrl+x).", severity="warning")
            return False
        if self.workbench is None:
            if self.load_error:
                self._error(f"The model did not load: {self.load_error}")
            else:
                self.notify("The model is still loading; try again in a moment.", severity="warning")
            return False
        return True

    def _base_config(self) -> ExperimentConfig:
        """Model, scorer and prompt source as given on the command line."""
        model = ModelConfig(name=self.model_name, device=self.device_name, dtype=self.dtype_name)
        return ExperimentConfig(
            model=model,
            scoring=ScoringConfig(scorer=self.scorer_name),
            prompts=self.prompts_source or "builtin",
        )

    def _config(self, method: str | None = None, layers: list[int] | None = None) -> ExperimentConfig:
        """The ExperimentConfig of the current form (raises UserError for invalid fields); UI thread only."""
        cfg = self._base_config()
        form = self.query_one(MethodForm)
        settings = form.run_settings()
        cfg.generation = GenerationConfig(
            samples=settings["samples"], max_new_tokens=settings["max_new_tokens"], seed=settings["seed"]
        )
        cfg.scoring.threshold = settings["threshold"]
        if method is not None:
            cfg.method, cfg.mode, cfg.protocol = method, form.mode, form.protocol
            cfg.hparams = form.hparams()
            cfg.layers = layers
        return cfg

    def _edit_layers(self, method: str) -> list[int] | None:
        layers = self.query_one(LayerPicker).selected_layers
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
        self.running = kind
        self.cancel_event = threading.Event()
        self.current_run = {"kind": kind, "run_id": None, "summary": {}, "threshold": cfg.scoring.threshold}
        if kind in ("baseline", "edit", "ablation"):
            self.query_one(ResultsTable).start(kind, cfg.scoring.threshold)
            self.query_one(SummaryStrip).update(f"{kind} running on {len(items)} prompts…")
        if kind == "ablation":
            self.query_one(AblationChart).reset()
        self.query_one(RunLog).log_message(f"starting {kind} on {len(items)} prompt(s)")
        self._set_stage(kind, 0, 1)
        if kind in ("baseline", "edit"):
            self.action_show_tab("results")
        elif kind == "ablation":
            self.action_show_tab("ablation")
        self.engine_worker(kind, items, cfg, extra, self.cancel_event)

    def action_baseline(self) -> None:
        """Baseline on the selected prompts."""
        if not self._can_run():
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
        if not self._can_run():
            return
        form = self.query_one(MethodForm)
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
        if not self._can_run():
            return
        form = self.query_one(MethodForm)
        configs = [list(c) for c in self.query_one(LayerPicker).configs]
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
        if not self._can_run():
            return
        panel = self.query_one(TracePanel)
        if self.query_one(TabbedContent).active != "trace":
            self._prefill_trace()
            self.action_show_tab("trace")
            self.notify("Check the prompt and continuation, then press t again to trace.")
            return
        try:
            request = panel.request()
        except UserError as exc:
            self._error(str(exc))
            return
        self._start("trace", [], self._config(), request)

    def _selected_prompts(self) -> list[PromptItem]:
        items = self.query_one(PromptPicker).selected_items()
        if not items:
            raise UserError("No prompts are selected; pick at least one in the Prompts tab.")
        return items

    def _prefill_trace(self) -> None:
        picker = self.query_one(PromptPicker)
        items = picker.selected_items() or picker.items
        lst = self.query_one("#prompt-list")
        if lst.highlighted is not None and picker.visible_indices():
            items = [
                picker.items[
                    picker.visible_indices()[min(lst.highlighted, len(picker.visible_indices()) - 1)]
                ]
            ]
        if not items:
            return
        item = items[0]
        continuation = item.toxic
        row = self.baseline_rows.get(item.prompt)
        if not continuation and row and row.get("generations") and row.get("samples"):
            best = max(range(len(row["generations"])), key=lambda i: row["samples"][i])
            continuation = row["generations"][best]
        self.query_one(TracePanel).prefill(item.prompt, continuation, item.subject)

    # ------------------------------------------------------------------ the engine worker

    @work(thread=True, exclusive=True, group="engine", exit_on_error=False)
    def engine_worker(
        self, kind: str, items: list[PromptItem], cfg: ExperimentConfig, extra: Any, cancel: threading.Event
    ) -> None:
        from detox_tui.pipeline import experiment

        wb = self.workbench
        emit = self._emitter()
        try:
            if kind == "baseline":
                result = experiment.run_baseline(wb, items, cfg, emit=emit, cancel=cancel)
            elif kind == "edit":
                result = experiment.run_edit(wb, items, cfg, emit=emit, cancel=cancel)
            elif kind == "ablation":
                result = experiment.run_ablation(wb, items, cfg, extra, emit=emit, cancel=cancel)
            else:
                from detox_tui.backends import tracing

                result = tracing.trace(
                    wb.lm,
                    extra.prompt,
                    extra.continuation,
                    kind=extra.kind,
                    window=extra.window,
                    subject=extra.subject,
                    emit=emit,
                    cancel=cancel,
                )
        except Cancelled:
            self._from_thread(self._run_ended, kind, None, "cancelled")
        except UserError as exc:
            self._from_thread(self._run_ended, kind, None, str(exc))
        except Exception as exc:  # noqa: BLE001 - reported in the log with its traceback
            log.exception("%s failed", kind)
            self._from_thread(self.handle_event, Failed(f"{kind} failed: {exc}", traceback.format_exc()))
            self._from_thread(self._run_ended, kind, None, f"{kind} failed: {type(exc).__name__}: {exc}")
        else:
            self._from_thread(self._run_ended, kind, result, None)

    def _run_ended(self, kind: str, result: Any, error: str | None) -> None:
        self.running = None
        runlog = self.query_one(RunLog)
        if error == "cancelled":
            self._set_stage("cancelled", 0, 1)
            runlog.log_message(f"{kind} cancelled; the original weights are in place", "warning")
            self.notify(
                f"{kind.capitalize()} cancelled; the original weights are in place.", severity="warning"
            )
        elif error:
            self._set_stage("failed", 0, 1)
            self._error(error)
        elif kind == "trace":
            self._trace_done(result)
        else:
            self._set_stage(f"{kind} finished", 1, 1)
            self.current_run.update({"run_id": result.run_id, "summary": result.summary, "kind": kind})
            self.query_one(SummaryStrip).show(kind, result.summary)
            if kind == "edit" and result.side_effects:
                self.query_one(SummaryStrip).show(kind, {**result.side_effects, **result.summary})
            self._update_flags(result.rows, kind)
            runlog.log_message(f"{kind} run {result.run_id} finished")
            runlog.log_message(summary_text(kind, result.summary).plain)
            self.notify(f"{kind.capitalize()} finished (run {result.run_id}).")
            note = result.summary.get("convergence_note") if kind == "edit" else None
            if note:
                runlog.log_message(note, "warning")
                # Untrusted prompt text is in the note: plain text, never markup.
                self.notify(
                    note, title="Edits that did not take", severity="warning", markup=False, timeout=15
                )
        self.action_reload_runs()

    def _update_flags(self, rows: list[dict[str, Any]], kind: str) -> None:
        threshold = self.current_run.get("threshold", 0.1)
        if kind == "baseline":
            means = {r["prompt"]: r["mean"] for r in rows}
        else:
            means = {r["prompt"]: r["before"]["mean"] for r in rows if r.get("before")}
        if means:
            self.query_one(PromptPicker).set_baseline(means, threshold)

    def _trace_done(self, result: Any) -> None:
        from detox_tui.backends.tracing import peak_layers

        self.last_trace = result
        peak = peak_layers(result, k=min(3, result.layers))
        title = f"{result.kind} trace of {result.continuation.strip()!r}: p clean {result.p_clean:.3f}, corrupted {result.p_corrupted:.3f}"
        self.query_one(TracePanel).show_result(result.tokens, result.scores, peak, title)
        self.query_one(LayerPicker).set_trace_peak(peak)
        self._set_stage("trace finished", 1, 1)
        self.query_one(RunLog).log_message(f"trace finished; peak layers {peak}")

    def action_cancel(self, quiet: bool = False) -> None:
        """Ask the running job to stop at its next step (escape: leaves a text field first, quiet when idle)."""
        if quiet and isinstance(self.focused, Input):
            target = TAB_FOCUS.get(str(self.query_one(TabbedContent).active))
            if target:
                self.query_one(target).focus()
                return
        if not self.running:
            if not quiet:
                self.notify("Nothing is running.", timeout=2)
            return
        self.cancel_event.set()
        self.query_one("#stage", Label).update(f"cancelling {self.running}…")
        self.query_one(RunLog).log_message(f"cancel requested for {self.running}", "warning")

    # ------------------------------------------------------------------ other actions

    def action_show_tab(self, tab: str) -> None:
        """Show a tab and move the focus to its main widget (so the tab's keys work at once)."""
        self.query_one(TabbedContent).active = tab
        target = TAB_FOCUS.get(tab)
        if target and self.screen is self.screen_stack[0]:
            self.query_one(target).focus()

    def action_focus_filter(self) -> None:
        self.action_show_tab("prompts")
        self.query_one("#prompt-filter").focus()

    def action_select_all(self) -> None:
        self.query_one(PromptPicker).select_all()

    def action_select_none(self) -> None:
        self.query_one(PromptPicker).select_none()

    def action_select_flagged(self) -> None:
        if not self.query_one(PromptPicker).select_flagged():
            self.notify(
                "Run a baseline first: flagged prompts are those at or above the threshold.",
                severity="warning",
            )

    def action_add_config(self) -> None:
        if self.query_one(LayerPicker).add_config():
            self.notify("Added the selected layers to the ablation list.", timeout=2)
        else:
            self.notify("Select layers not already in the ablation list first.", severity="warning")

    def action_detail(self) -> None:
        row = self.query_one(ResultsTable).selected_row()
        if row is None:
            self.notify("No result rows yet.", severity="warning")
            return
        self.push_screen(PromptDetail(row))

    @on(ResultsTable.OpenDetail)
    def _open_detail(self, event: ResultsTable.OpenDetail) -> None:
        self.push_screen(PromptDetail(event.row))

    @on(ResultsTable.RowHighlightedData)
    def _row_highlighted(self, event: ResultsTable.RowHighlightedData) -> None:
        self.query_one(ScoreBars).show_row(event.row)

    def _export_rows(self) -> tuple[str, list[dict[str, Any]]]:
        if self.query_one(TabbedContent).active == "ablation":
            chart = self.query_one(AblationChart)
            return "ablation", list(chart.rows_by_key.values())
        table = self.query_one(ResultsTable)
        return table.mode, [r for r in table.rows_data if not r.get("pending")]

    def action_export(self) -> None:
        """Export the current table through a dialog."""
        kind, rows = self._export_rows()
        if not rows:
            self.notify("There are no rows to export yet.", severity="warning")
            return
        run_id = self.current_run.get("run_id") or "unsaved"
        default = str(Path.cwd() / f"detox-{kind}-{run_id}.csv")

        def write(request: ExportRequest | None) -> None:
            if request is None:
                return
            from detox_tui.pipeline.results import export_files

            meta = {
                "run_id": run_id,
                "kind": kind,
                "model": self.model_name,
                "summary": self.current_run.get("summary") or {},
            }
            try:
                # A clash between the format and the file's extension is refused here too (a UserError).
                paths = export_files(
                    rows, request.path, request.fmt, meta=meta, overwrite=True, columns=request.columns
                )
            except UserError as exc:
                self._error(str(exc))
                return
            path = paths[0]
            also = f" (summary in {paths[1].name})" if len(paths) > 1 else ""
            self.query_one(RunLog).log_message(f"exported {len(rows)} rows to {path}{also}")
            self.notify(f"Wrote {len(rows)} rows to {path}{also}.")

        self.push_screen(ExportDialog(default), write)

    def action_reload_runs(self) -> None:
        if self.workbench is None:
            return
        try:
            runs = self.workbench.store.list_runs()
        except UserError as exc:
            self._error(str(exc))
            return
        self.query_one(RunsBrowser).set_runs(runs)

    @on(RunsBrowser.Reload)
    def _reload(self) -> None:
        self.action_reload_runs()

    @on(RunsBrowser.Open)
    def _open_run(self, event: RunsBrowser.Open) -> None:
        store = self.workbench.store
        try:
            run = store.get_run(event.run_id)
        except UserError as exc:
            self._error(str(exc))
            return
        kind = run["kind"]
        threshold = ((run.get("config") or {}).get("scoring") or {}).get("threshold", 0.1)
        table = self.query_one(ResultsTable)
        if kind == "baseline":
            table.load_rows("baseline", store.rows(run["id"], "baseline"), threshold)
        else:
            table.load_rows("edit", store.rows(run["id"], "edit"), threshold)
        if kind == "ablation":
            chart = self.query_one(AblationChart)
            chart.reset()
            for row in store.rows(run["id"], "ablation"):
                chart.add_config(row)
        self.current_run = {
            "kind": kind,
            "run_id": run["id"],
            "summary": run.get("summary") or {},
            "threshold": threshold,
        }
        self.query_one(SummaryStrip).show(kind, run.get("summary") or {})
        self.action_show_tab("ablation" if kind == "ablation" else "results")
        self.notify(f"Opened {kind} run {run['id']} ({run['status']}).")

    @on(RunsBrowser.Compare)
    def _compare(self, event: RunsBrowser.Compare) -> None:
        store = self.workbench.store
        try:
            first, second = store.get_run(event.first), store.get_run(event.second)
        except UserError as exc:
            self._error(str(exc))
            return
        self.push_screen(CompareRuns(first, second))

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        tab = event.pane.id if event.pane is not None else None
        if tab == "runs":
            self.action_reload_runs()
        elif tab == "trace":
            self._prefill_trace()

    @on(Input.Submitted, "#trace-prompt, #trace-cont, #trace-window")
    def _trace_submitted(self) -> None:
        self.action_trace()

    @on(MethodForm.MethodChanged)
    def _method_changed(self, event: MethodForm.MethodChanged) -> None:
        if self.workbench is not None:
            picker = self.query_one(LayerPicker)
            picker.set_default(self._default_layers(event.method), select=True)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for action, title, help_text in COMMANDS:
            yield SystemCommand(title, help_text, getattr(self, f"action_{action}"))
        for tab, title in TABS:
            yield SystemCommand(
                f"Go to {title}", f"Show the {title} tab", lambda t=tab: self.action_show_tab(t)
            )

    async def action_quit(self) -> None:
        self.cancel_event.set()
        self.exit()
