"""The app's tabs and its command table: what every key does, shown in the palette, the help screen and the footer."""

from __future__ import annotations

from dataclasses import dataclass

TABS: tuple[tuple[str, str], ...] = (
    ("prompts", "Prompts"),
    ("setup", "Layers & Method"),
    ("results", "Results"),
    ("ablation", "Ablation"),
    ("trace", "Trace"),
    ("runs", "Runs"),
    ("sweeps", "Sweeps"),
    ("log", "Log"),
)

# The widget that gets the focus when a tab is shown (its keys are the tab's keys).
TAB_FOCUS: dict[str, str] = {
    "prompts": "#prompt-list",
    "setup": "#layer-toggles",
    "results": "#results-table",
    "ablation": "#ablation-chart",
    "trace": "#trace-scroll",
    "runs": "#runs-browser",
    "sweeps": "#sweeps-view",
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


@dataclass(frozen=True)
class Command:
    """One app action: its key, the footer's short label (None: not in the footer), palette title and help."""

    action: str
    key: str
    footer: str | None
    title: str
    help: str
    priority: bool = False


# Every app key, in the order the footer and the help screen show them. Each is also a palette command.
COMMANDS: tuple[Command, ...] = (
    Command(
        "baseline",
        "b",
        "Baseline",
        "Run baseline",
        "Sample and score the selected prompts on the original model",
    ),
    Command(
        "edit",
        "e",
        "Edit",
        "Run edit",
        "Edit with the chosen method and layers, then measure before/after and side effects",
    ),
    Command("ablation", "a", None, "Run ablation", "One edit per layer configuration in the ablation list"),
    Command("trace", "t", None, "Run causal trace", "Trace which layers carry the continuation (Trace tab)"),
    Command("export", "x", None, "Export table", "Write the current table to CSV, JSON, Markdown or LaTeX"),
    Command(
        "cancel",
        "ctrl+x",
        "Cancel",
        "Cancel run",
        "Stop the running job (asks first); the original weights are restored and the run is stored as cancelled",
        priority=True,
    ),
    Command("help", "question_mark", "Help", "Show keys", "The keys of the current tab and the global ones"),
    Command("help", "f1", None, "Show keys", "The keys of the current tab and the global ones"),
    Command(
        "settings",
        "comma",
        None,
        "Settings",
        "Scorer, device, dtype, sampling, evaluation protocol, chat prompts and RECT",
    ),
    Command("detail", "d", None, "Prompt detail", "Generations before and after for the highlighted row"),
    Command("select_all", "ctrl+a", None, "Select all prompts", "Select every prompt the filter shows"),
    Command("select_none", "ctrl+n", None, "Select no prompts", "Deselect every prompt the filter shows"),
    Command(
        "select_flagged",
        "f",
        None,
        "Select flagged prompts",
        "Prompts whose baseline mean is at or above the threshold",
    ),
    Command("focus_filter", "slash", None, "Filter prompts", "Type to filter the prompt list"),
    Command(
        "add_config",
        "plus",
        None,
        "Add layers to ablation list",
        "Add the selected layers as an ablation configuration",
    ),
    Command(
        "reload_runs",
        "r",
        None,
        "Reload runs",
        "Refresh the runs list from the store (it also refreshes by itself)",
    ),
    Command("leave_field", "escape", None, "Leave field", "Leave a text field (Escape never cancels a run)"),
    Command("quit", "q", None, "Quit", "Quit (asks first while a job runs)"),
)

# Palette commands that act on the widget of a tab, not on the app: (tab, widget action, title, help).
WIDGET_COMMANDS: tuple[tuple[str, str, str, str], ...] = (
    (
        "results",
        "sort_menu",
        "Sort results…",
        "Choose the column and direction the results table is sorted by",
    ),
    (
        "ablation",
        "sort_menu",
        "Sort ablation…",
        "Choose the column and direction the ablation table is sorted by",
    ),
    ("runs", "sort_menu", "Sort runs…", "Choose the column the runs list is sorted by"),
    ("runs", "open_run", "Open highlighted run", "Show the run's rows and charts (follows it while it runs)"),
    ("runs", "mark", "Mark run for compare", "Mark the highlighted run (two marked runs can be compared)"),
    ("runs", "compare", "Compare marked runs", "The two marked runs side by side"),
    (
        "sweeps",
        "sort_menu",
        "Sort sweep experiments…",
        "Choose the column the sweep's experiments are sorted by",
    ),
    (
        "sweeps",
        "open_experiment",
        "Open highlighted experiment",
        "Show the run of the experiment highlighted in the Sweeps tab",
    ),
)
