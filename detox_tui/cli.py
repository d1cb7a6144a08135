"""Typer CLI: `detox-tui` opens the app; subcommands run the same engine headless."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import signal
import sys
import threading
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from detox_tui.config import (
    DEFAULT_MODEL,
    DEFAULT_SCORER,
    ExperimentConfig,
    GenerationConfig,
    ModelConfig,
    ScoringConfig,
    SideEffectConfig,
    VerdictConfig,
)
from detox_tui.errors import Cancelled, UserError
from detox_tui.text import plain, visible

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="Find where a language model keeps its toxic behaviour, remove it with real knowledge edits "
    "(MEMIT, ROME, FT, DINM, AurA), and prove it worked. Run without a command to open the app.",
)
runs_app = typer.Typer(help="Browse and export runs in the run store.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

err = Console(stderr=True)
console = Console()
_DEBUG = {"on": False}
# --trust-checkpoint (a global option): carried into each run's config (ScoringConfig.trust_checkpoint).
_TRUST = {"on": False}

# ------------------------------------------------------------------------------------------ shared options

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id or local directory.")]
PromptsOpt = Annotated[
    str, typer.Option("--prompts", "-p", help="builtin, a .json/.jsonl/.csv/.txt file, or hf:<dataset>.")
]
ScorerOpt = Annotated[
    str,
    typer.Option(
        "--scorer", "-s", help="detoxify[:original|unbiased|multilingual|FILE], hf:<model>, profanity."
    ),
]
SamplesOpt = Annotated[int, typer.Option("--samples", "-k", min=0, help="Sampled continuations per prompt.")]
TokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens per continuation.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the whole table.")]
TempOpt = Annotated[float, typer.Option("--temperature", min=0.0)]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="0 disables top-k.")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)]
GreedyOpt = Annotated[bool, typer.Option("--greedy/--no-greedy", help="Also score one greedy continuation.")]
ThresholdOpt = Annotated[float, typer.Option("--threshold", min=0.0, max=1.0, help="Share-above threshold.")]
WithPromptOpt = Annotated[
    bool,
    typer.Option("--score-with-prompt", help="Score prompt + continuation (default: continuation only)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, float32, float16 or bfloat16.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per generation batch.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="Use only the first N prompts.")]
OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Write the table (.csv, .json, .md, .jsonl).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Run store and caches (default: DETOX_TUI_HOME or platform dirs)."),
]
ResumeOpt = Annotated[
    str | None, typer.Option("--resume", help="Resume a run by id: finished parts are skipped.")
]
MethodOpt = Annotated[str, typer.Option("--method", help="memit, alphaedit, rome, ft, dinm or aura.")]
ModeOpt = Annotated[str, typer.Option("--mode", help="replace (raise p(target)) or erase (lower p(toxic)).")]
ProtocolOpt = Annotated[
    bool,
    typer.Option(
        "--per-prompt/--batch",
        help="Edit each prompt alone on the original weights, or all selected prompts in one mass edit.",
    ),
]
HparamOpt = Annotated[
    list[str] | None, typer.Option("--hparam", "-H", help="Override a preset value: key=value (repeatable).")
]
HoldoutOpt = Annotated[
    str | None, typer.Option("--holdout", help="Prompts evaluated but never edited (--batch).")
]
StatsCorpusOpt = Annotated[str, typer.Option("--stats-corpus", help="builtin, a text file, or hf:<dataset>.")]
StatsTokensOpt = Annotated[int | None, typer.Option("--stats-tokens", min=1, help="Covariance token budget.")]
StatsDeviceOpt = Annotated[
    str,
    typer.Option(
        "--stats-device",
        help="Where covariance statistics accumulate: auto (the model's device) or cpu (keeps them off the GPU).",
    ),
]
RectOpt = Annotated[
    float | None,
    typer.Option(
        "--rect",
        help="RECT: keep this percent of each edited weight's entries (largest |dW|/|W|), zero the rest; the paper keeps 20.",
    ),
]
NeutralOpt = Annotated[str, typer.Option("--neutral-corpus", help="Text for side-effect perplexity.")]
NeutralPromptsOpt = Annotated[
    str, typer.Option("--neutral-prompts", help="Prompts for side-effect KL/toxicity.")
]
CollapseOpt = Annotated[
    float, typer.Option("--collapse-factor", min=1.0, help="Perplexity ratio flagged collapsed.")
]
EvalProtocolOpt = Annotated[
    str | None,
    typer.Option(
        "--protocol",
        help="An evaluation protocol from the literature: rtp = 25 samples of 20 tokens, top-p 0.9, temperature 1, "
        "continuation only (Gehman et al. 2020).",
    ),
]
MinReductionOpt = Annotated[
    float,
    typer.Option(
        "--min-reduction", min=0.0, max=1.0, help="Smallest fall in mean toxicity that counts as detoxified."
    ),
]
AlphaOpt = Annotated[
    float,
    typer.Option("--alpha", min=0.0, max=1.0, help="Significance level of the per-prompt paired test."),
]
PplModelOpt = Annotated[
    str | None,
    typer.Option(
        "--ppl-model",
        help="Reference model (hub id or folder; 'self' = the model under study) for the generations' "
        "conditional perplexity, e.g. gpt2-xl.",
    ),
]


ChatTemplateOpt = Annotated[
    str,
    typer.Option(
        "--chat-template",
        help="auto: wrap each prompt in the tokenizer's chat template (a user turn + the assistant's opening) when "
        "it has one; none: raw prompts.",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        envvar="DETOX_TUI_THREADS",
        show_envvar=True,
        help="torch intra-op threads (default: torch's choice, or OMP_NUM_THREADS when set).",
    ),
]
VerifyOpt = Annotated[
    bool,
    typer.Option("--verify-weights", help="Hash the weights after every revert (also with --debug)."),
]


@dataclass
class RunOptions:
    """The options of every command that generates and scores (baseline, edit, ablate).

    One field is one command-line option: adding an option here adds it to all three commands.
    """

    model: ModelOpt = DEFAULT_MODEL
    prompts: PromptsOpt = "builtin"
    scorer: ScorerOpt = DEFAULT_SCORER
    samples: SamplesOpt = 5
    max_new_tokens: TokensOpt = 20
    seed: SeedOpt = 0
    temperature: TempOpt = 1.0
    top_k: TopKOpt = 0
    top_p: TopPOpt = 0.9
    greedy: GreedyOpt = False
    threshold: ThresholdOpt = 0.1
    score_with_prompt: WithPromptOpt = False
    device: DeviceOpt = "auto"
    dtype: DtypeOpt = "auto"
    batch_size: BatchOpt = 16
    limit: LimitOpt = None
    out: OutOpt = None
    as_json: JsonOpt = False
    data_dir: DataDirOpt = None
    resume: ResumeOpt = None
    protocol: EvalProtocolOpt = None
    ppl_model: PplModelOpt = None
    min_reduction: MinReductionOpt = 0.1
    alpha: AlphaOpt = 0.05
    chat_template: ChatTemplateOpt = "auto"
    threads: ThreadsOpt = None

    def config(self, **edit: Any) -> ExperimentConfig:
        """The engine's configuration; ``edit`` sets the edit fields (method, layers, ...)."""
        from detox_tui.backends.chat import check_chat_template_mode

        check_chat_template_mode(self.chat_template, "--chat-template")
        cfg = ExperimentConfig(
            model=ModelConfig(name=self.model, device=self.device, dtype=self.dtype),
            generation=GenerationConfig(
                samples=self.samples,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                greedy=self.greedy,
                seed=self.seed,
                batch_size=self.batch_size,
            ),
            scoring=ScoringConfig(
                scorer=self.scorer,
                threshold=self.threshold,
                score_with_prompt=self.score_with_prompt,
                trust_checkpoint=_TRUST["on"],
            ),
            prompts=self.prompts,
            chat_template=self.chat_template,
            verdict=VerdictConfig(
                min_reduction=self.min_reduction, alpha=self.alpha, ppl_model=self.ppl_model
            ),
        )
        for key, value in edit.items():
            setattr(cfg, key, value)
        return cfg


@dataclass
class EditOptions:
    """The options shared by the commands that edit (edit, ablate)."""

    method: MethodOpt = "memit"
    mode: ModeOpt = "replace"
    per_prompt: ProtocolOpt = True
    hparam: HparamOpt = None
    stats_corpus: StatsCorpusOpt = "builtin"
    stats_tokens: StatsTokensOpt = None
    stats_device: StatsDeviceOpt = "auto"
    rect: RectOpt = None
    neutral_corpus: NeutralOpt = "builtin"
    neutral_prompts: NeutralPromptsOpt = "builtin"
    collapse_factor: CollapseOpt = 2.0
    verify_weights: VerifyOpt = False

    def fields(self, layers: list[int] | None, holdout: str | None = None) -> dict[str, Any]:
        """The ExperimentConfig edit fields; an unknown --mode/--method or a bad --hparam is refused here."""
        if self.mode not in ("replace", "erase"):
            raise UserError(f"Unknown --mode '{self.mode}'; use replace or erase.")
        from detox_tui.backends.editing.base import EDITORS
        from detox_tui.backends.editing.rect import check_rect_percent

        if self.method.lower() not in EDITORS:
            raise UserError(f"Unknown --method '{self.method}'; choose one of: {', '.join(EDITORS)}.")
        return {
            "method": self.method.lower(),
            "layers": layers,
            "mode": self.mode,
            "protocol": "per-prompt" if self.per_prompt else "batch",
            "hparams": _parse_hparams(self.hparam),
            "holdout": holdout,
            "stats_corpus": self.stats_corpus,
            "stats_tokens": self.stats_tokens,
            "stats_device": _stats_device(self.stats_device),
            "rect": check_rect_percent(self.rect, "--rect"),
            "side_effects": SideEffectConfig(
                neutral_corpus=self.neutral_corpus,
                neutral_prompts=self.neutral_prompts,
                collapse_factor=self.collapse_factor,
            ),
        }


def _stats_device(value: str) -> str:
    """--stats-device, checked before any work: auto or cpu."""
    from detox_tui.backends.stats import STATS_DEVICES

    if value.lower() not in STATS_DEVICES:
        raise UserError(f"Unknown --stats-device '{value}'; use {' or '.join(STATS_DEVICES)}.")
    return value.lower()


def with_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Expand each parameter of ``func`` typed as an options dataclass into that dataclass's options.

    Typer sees one keyword parameter per dataclass field (names, types, defaults and help from the
    field); ``func`` receives the filled-in dataclass instance.
    """
    hints = typing.get_type_hints(func, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for p in inspect.signature(func).parameters.values():
        annotation = hints.get(p.name, p.annotation)
        if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
            field_hints = typing.get_type_hints(annotation, include_extras=True)
            names = [f.name for f in dataclasses.fields(annotation)]
            for f in dataclasses.fields(annotation):
                params.append(
                    inspect.Parameter(
                        f.name,
                        inspect.Parameter.KEYWORD_ONLY,
                        annotation=field_hints[f.name],
                        default=f.default,
                    )
                )
            groups[p.name] = (annotation, names)
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=annotation))
    seen = [p.name for p in params]
    if len(seen) != len(set(seen)):
        raise TypeError(
            f"{func.__name__}: an option is declared twice: {sorted(n for n in seen if seen.count(n) > 1)}"
        )

    @functools.wraps(func)
    def command(**kwargs: Any) -> Any:
        for name, (cls, names) in groups.items():
            kwargs[name] = cls(**{n: kwargs.pop(n) for n in names})
        return func(**kwargs)

    del command.__wrapped__  # typer must read the expanded signature, not the original one
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _before_model_work(threads: int | None) -> None:
    """First step of every command that loads a model (the reads never import torch or transformers).

    ``--threads``/DETOX_TUI_THREADS set torch's intra-op threads; without them torch chooses (it follows
    OMP_NUM_THREADS when that is set).
    """
    if not _DEBUG["on"]:
        _quiet_libraries()
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)


def _apply_eval_protocol(ctx: typer.Context, cfg: ExperimentConfig, protocol: str | None) -> None:
    """Set what ``--protocol`` fixes; an option given on the command line that contradicts it is refused."""
    if protocol is None:
        return
    from detox_tui.config import EVAL_PROTOCOLS

    if protocol not in EVAL_PROTOCOLS:
        raise UserError(f"Unknown --protocol '{protocol}'; choose one of: {', '.join(EVAL_PROTOCOLS)}.")
    for section, values in EVAL_PROTOCOLS[protocol].items():
        for key, value in values.items():
            # By name: typer may bring its own copy of click's ParameterSource enum.
            source = ctx.get_parameter_source(key)
            given = source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
            if given and getattr(getattr(cfg, section), key) != value:
                option = "--" + key.replace("_", "-")
                raise UserError(
                    f"--protocol {protocol} sets {option} to {value}; drop {option} or the protocol."
                )
    cfg.apply_eval_protocol(protocol)


def _parse_hparams(pairs: list[str] | None) -> dict[str, Any]:
    hp: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"Bad --hparam '{pair}': use key=value, e.g. --hparam mom2_update_weight=15000.")
        key, raw = pair.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        hp[key.strip()] = value
    return hp


def _parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return sorted({int(x) for x in text.replace(";", ",").split(",") if x.strip()})
    except ValueError as exc:
        raise UserError(f"Bad --layers '{text}': use comma-separated layer numbers, e.g. 4,5,6,7,8.") from exc


def _load_items(source: str, limit: int | None):
    from detox_tui.prompts import load_prompts

    items = load_prompts(source, limit=limit)
    if not items:
        raise UserError(f"The prompt source '{source}' gave no prompts.")
    return items


def _check_out(path: Path | None) -> None:
    """Fail before any model work if the output file cannot be written."""
    if path is None:
        return
    from detox_tui.pipeline.results import format_from_path

    format_from_path(path)
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        raise UserError(f"Cannot write '{path}': the folder '{parent}' does not exist.")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"Cannot write '{path}': permission denied.")


def _workbench(cfg: ExperimentConfig, data_dir: Path | None, quiet: bool, scorer: str = "required"):
    """The engine session; ``scorer="none"`` loads the model alone (trace, stats)."""
    from detox_tui.pipeline.experiment import Workbench

    what = cfg.model.name if scorer == "none" else f"{cfg.model.name} and the {cfg.scoring.scorer} scorer"
    with err.status(f"Loading {what}...", spinner="dots") if not quiet else _null():
        return Workbench.load(cfg, data_dir=str(data_dir) if data_dir else None, scorer=scorer)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class RunInterrupted(Exception):
    """Ctrl+C (or SIGTERM) during a run: names the stored run so the CLI can print how to resume it.

    Not a KeyboardInterrupt: typer turns those into a silent exit 130 and the run id would be lost.
    """

    def __init__(self, command: str, run_id: str | None):
        super().__init__(run_id or "")
        self.command = command
        self.run_id = run_id


def _run_engine(fn, quiet: bool, wb=None, command: str | None = None, resume: str | None = None):
    """Run an engine call with Rich progress; Ctrl+C sets the cancel flag so weights are restored.

    With ``wb`` and ``command``, an interruption is re-raised as RunInterrupted naming the run it left
    (stored as cancelled by the engine), so that main() can print the resume command.
    """
    from detox_tui.console import EventRenderer

    cancel = threading.Event()
    before = _newest_run_ids(wb) if wb is not None else set()
    with EventRenderer(err, quiet=quiet) as render:
        try:
            return fn(render, cancel)
        except (KeyboardInterrupt, Cancelled) as exc:
            cancel.set()
            if wb is None or command is None:
                raise
            raise RunInterrupted(command, _interrupted_run(wb, before, resume)) from exc


def _newest_run_ids(wb) -> set[str]:
    return {r["id"] for r in wb.store.list_runs(limit=20)}


def _interrupted_run(wb, before: set[str], resume: str | None) -> str | None:
    """The run an interrupted engine call worked on: the resumed one, or the one it created."""
    try:
        if resume:
            return wb.store.resolve_id(resume)
        new = [r["id"] for r in wb.store.list_runs(limit=20) if r["id"] not in before]
        return new[0] if new else None
    except Exception:  # noqa: BLE001 - the hint is a courtesy; never hide the interruption behind it
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item())
    return value


def _print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(_jsonable(obj), indent=2) + "\n")


def _export(
    rows: list[dict[str, Any]], path: Path | None, meta: dict[str, Any], columns: str = "default"
) -> None:
    """Write --out in the format its extension names, with the run summary (CSV: a .summary.csv beside it)."""
    if path is None:
        return
    from detox_tui.pipeline.results import export_files

    for written in export_files(rows, path, meta=_jsonable(meta), columns=columns):
        err.print(plain(f"wrote {written}"))


# ------------------------------------------------------------------------------------------ commands


def _version(value: bool) -> None:
    if value:
        from detox_tui import __version__

        sys.stdout.write(f"detox-tui {__version__}\n")
        raise typer.Exit(0)


# Options the app takes before a subcommand (`detox-tui --model X baseline`): they become the defaults of
# the subcommand's options of the same name; one the subcommand does not have is refused.
_GLOBAL_OPTIONS = ("model", "prompts", "scorer", "device", "dtype", "data_dir", "threads")


@app.callback(invoke_without_command=True)
def main_callback(
    ctx: typer.Context,
    model: ModelOpt = DEFAULT_MODEL,
    prompts: PromptsOpt = "builtin",
    scorer: ScorerOpt = DEFAULT_SCORER,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    data_dir: DataDirOpt = None,
    threads: ThreadsOpt = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    trust_checkpoint: Annotated[
        bool,
        typer.Option(
            "--trust-checkpoint",
            help="Load a scorer checkpoint that needs pickle (which can run code), with a warning; without it such a "
            "file is refused. Only for files you trust.",
        ),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Without a command, open the Textual app."""
    if debug:
        _DEBUG["on"] = True
    _TRUST["on"] = trust_checkpoint
    if ctx.invoked_subcommand is not None:
        _pass_global_options(ctx, locals())
        return
    _before_model_work(threads)
    from detox_tui.app import DetoxApp

    DetoxApp(
        model=model,
        prompts=None if prompts == "builtin" else prompts,
        scorer=scorer,
        device=device,
        dtype=dtype,
        data_dir=str(data_dir) if data_dir else None,
        trust_checkpoint=trust_checkpoint,
    ).run()


def _on_command_line(ctx: typer.Context, name: str) -> bool:
    # By name: typer may bring its own copy of click's ParameterSource enum.
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _pass_global_options(ctx: typer.Context, values: dict[str, Any]) -> None:
    """Make options given before the subcommand its defaults (an option given after it still wins)."""
    given = {name: values[name] for name in _GLOBAL_OPTIONS if _on_command_line(ctx, name)}
    if not given:
        return
    name = ctx.invoked_subcommand
    sub = ctx.command.get_command(ctx, name)  # type: ignore[attr-defined]
    leaves = list(getattr(sub, "commands", {}).values()) or [sub]
    for key in given:
        if not any(key in {p.name for p in leaf.params} for leaf in leaves):
            option = "--" + key.replace("_", "-")
            raise UserError(f"{option} given before '{name}' does not apply to it; drop {option}.")
    if hasattr(sub, "commands"):
        ctx.default_map = {name: {leaf: dict(given) for leaf in sub.commands}}
    else:
        ctx.default_map = {name: dict(given)}


@app.command()
@with_options
def baseline(run: RunOptions, *, ctx: typer.Context) -> None:
    """Score seeded sampled continuations of each prompt on the original model."""
    _before_model_work(run.threads)
    from detox_tui.console import baseline_table, summary_lines
    from detox_tui.pipeline.experiment import run_baseline

    cfg = run.config()
    _apply_eval_protocol(ctx, cfg, run.protocol)
    _check_out(run.out)
    items = _load_items(run.prompts, run.limit)
    wb = _workbench(cfg, run.data_dir, run.as_json)
    result = _run_engine(
        lambda emit, cancel: run_baseline(wb, items, cfg, emit=emit, cancel=cancel, resume=run.resume),
        run.as_json,
        wb,
        "baseline",
        run.resume,
    )
    _export(
        result.rows, run.out, {"run_id": result.run_id, "config": cfg.to_dict(), "summary": result.summary}
    )
    if run.as_json:
        _print_json(
            {"run_id": result.run_id, "config": cfg.to_dict(), "rows": result.rows, "summary": result.summary}
        )
        return
    threshold = run.threshold
    console.print(baseline_table(result.rows, threshold))
    s = result.summary
    console.print(
        f"run {result.run_id}: mean toxicity {s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}], "
        f"{100 * s['share_prompts_above']:.1f}% of prompts at or above {threshold:g}"
    )
    for line in summary_lines(s):
        console.print(line)


@app.command()
@with_options
def edit(
    layers: Annotated[
        str | None, typer.Option("--layers", "-l", help="e.g. 4,5,6,7,8 (default: preset).")
    ] = None,
    holdout: HoldoutOpt = None,
    save_delta: Annotated[
        Path | None,
        typer.Option(
            "--save-delta",
            help="Save each edit (safetensors) under this file name, e.g. out/edit.safetensors: every edit is written "
            "beside it as edit_L<layers>[_p<prompt>].safetensors. An existing folder is refused.",
        ),
    ] = None,
    *,
    ed: EditOptions,
    run: RunOptions,
    ctx: typer.Context,
) -> None:
    """Edit the model (per prompt or in one batch) and compare toxicity before and after, with side effects."""
    _before_model_work(run.threads)
    from detox_tui.console import edit_table, summary_lines
    from detox_tui.pipeline.experiment import run_edit
    from detox_tui.pipeline.validation import validate_edit

    cfg = run.config(**ed.fields(_parse_layers(layers), holdout))
    _apply_eval_protocol(ctx, cfg, run.protocol)
    _check_out(run.out)
    if save_delta is not None and save_delta.expanduser().is_dir():
        raise UserError(
            f"--save-delta '{save_delta}' is a folder; give a file name in it, e.g. "
            f"{save_delta / 'edit.safetensors'} (each edit is saved beside that name)."
        )
    items = _load_items(run.prompts, run.limit)
    held = _load_items(holdout, None) if holdout else []
    wb = _workbench(cfg, run.data_dir, run.as_json)
    # Method, layers, hyperparameters and prompts checked against the model: one line, before any generation.
    validate_edit(wb.lm, cfg, items, held)
    verify = ed.verify_weights or _DEBUG["on"]
    result = _run_engine(
        lambda emit, cancel: run_edit(
            wb,
            items,
            cfg,
            holdout=held,
            emit=emit,
            cancel=cancel,
            resume=run.resume,
            save_delta=str(save_delta) if save_delta else None,
            verify=verify,
        ),
        run.as_json,
        wb,
        "edit",
        run.resume,
    )
    _export(
        result.rows, run.out, {"run_id": result.run_id, "config": cfg.to_dict(), "summary": result.summary}
    )
    if run.as_json:
        _print_json(
            {
                "run_id": result.run_id,
                "config": cfg.to_dict(),
                "rows": result.rows,
                "side_effects": result.side_effects,
                "stats": result.summary,
                "summary": result.summary,
                "deltas": result.deltas,
            }
        )
        return
    console.print(edit_table(result.rows))
    for line in summary_lines(result.summary):
        console.print(line)
    for path in result.deltas:
        console.print(plain(f"saved edit delta: {path}"))
    console.print(f"run {result.run_id}")


@app.command()
@with_options
def ablate(
    configs: Annotated[
        str | None,
        typer.Option(
            "--configs",
            "-c",
            help="Layer sets, e.g. '1;5;6;5,6;6,7;4,5,6' (default: scaled to the model's depth).",
        ),
    ] = None,
    *,
    ed: EditOptions,
    run: RunOptions,
    ctx: typer.Context,
) -> None:
    """Compare layer configurations, each edit starting from the original weights."""
    _before_model_work(run.threads)
    from detox_tui.console import ablation_table
    from detox_tui.pipeline.experiment import parse_configs, run_ablation
    from detox_tui.pipeline.validation import validate_edit

    # None: configurations scaled to the model's depth (presets.default_ablation_configs).
    config_list = parse_configs(configs) if configs is not None else None
    cfg = run.config(**ed.fields(None))
    _apply_eval_protocol(ctx, cfg, run.protocol)
    _check_out(run.out)
    items = _load_items(run.prompts, run.limit)
    wb = _workbench(cfg, run.data_dir, run.as_json)
    validate_edit(wb.lm, cfg, items, configs=config_list, ablation=True)  # one line, before any generation
    verify = ed.verify_weights or _DEBUG["on"]
    result = _run_engine(
        lambda emit, cancel: run_ablation(
            wb, items, cfg, config_list, emit=emit, cancel=cancel, resume=run.resume, verify=verify
        ),
        run.as_json,
        wb,
        "ablate",
        run.resume,
    )
    _export(
        result.configs or [],
        run.out,
        {"run_id": result.run_id, "config": cfg.to_dict(), "summary": result.summary},
    )
    if run.as_json:
        _print_json(
            {
                "run_id": result.run_id,
                "config": cfg.to_dict(),
                "configs": result.configs,
                "summary": result.summary,
            }
        )
        return
    console.print(ablation_table(result.configs or []))
    best = result.summary.get("best")
    if best is None:
        console.print(f"run {result.run_id}: no configuration detoxified any prompt")
    else:
        share = result.summary["best_share_detoxified"]
        console.print(
            plain(f"run {result.run_id}: best configuration {best} ({100 * share:.1f}% detoxified)")
        )


@app.command()
def trace(
    prompt: Annotated[str, typer.Option("--prompt", help="The prompt to trace.")],
    continuation: Annotated[
        str | None, typer.Option("--continuation", help="Continuation to trace (default: the greedy one).")
    ] = None,
    kind: Annotated[str, typer.Option("--kind", help="hidden, mlp or attn.")] = "hidden",
    window: Annotated[int, typer.Option("--window", min=1, help="Layers restored together (mlp/attn).")] = 10,
    noise_samples: Annotated[int, typer.Option("--noise-samples", min=1, help="Noise draws.")] = 10,
    subject: Annotated[
        str | None, typer.Option("--subject", help="Corrupt only this span of the prompt.")
    ] = None,
    continuation_tokens: Annotated[int, typer.Option("--continuation-tokens", min=1)] = 5,
    noise: Annotated[
        float | None,
        typer.Option(
            "--noise",
            min=0.0,
            help="Noise std (default: 3 x the std of the corrupted tokens' embeddings, as the reference).",
        ),
    ] = None,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    seed: SeedOpt = 0,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the heatmap (.csv or .json).")
    ] = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Causal tracing: which (layer, token) states decide the continuation; stored as a run."""
    _before_model_work(threads)
    from detox_tui.backends.tracing import check_trace_args
    from detox_tui.console import trace_lines, trace_table
    from detox_tui.pipeline.trace_run import TraceSpec, run_trace

    if kind not in ("hidden", "mlp", "attn"):
        raise UserError(f"Unknown --kind '{kind}'; use hidden, mlp or attn.")
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise UserError(f"Cannot write '{out}': trace output must end in .csv or .json.")
    _check_out(out)
    # Everything but the model's own continuation is checked before the model loads (a placeholder stands for
    # the greedy continuation still to come).
    check_trace_args(
        prompt,
        " " if continuation is None else continuation,
        kind=kind,
        window=window,
        samples=noise_samples,
        subject=subject,
        noise=noise,
    )
    cfg = ExperimentConfig(model=ModelConfig(name=model, device=device, dtype=dtype))
    wb = _workbench(cfg, data_dir, as_json, scorer="none")
    if continuation is None:
        from detox_tui.pipeline.generation import generate_continuations

        gens = generate_continuations(
            wb.lm,
            [prompt],
            GenerationConfig(samples=0, greedy=True, max_new_tokens=continuation_tokens, seed=seed),
        )
        continuation = gens[0].greedy or ""
        if not continuation:
            raise UserError("The model's greedy continuation is empty; pass --continuation.")
    spec = TraceSpec(
        prompt=prompt,
        continuation=continuation,
        kind=kind,
        window=window,
        subject=subject,
        noise=noise,
        noise_samples=noise_samples,
        seed=seed,
    )
    result = _run_engine(lambda emit, cancel: run_trace(wb, spec, emit=emit, cancel=cancel), as_json)
    data = result.trace.to_dict()
    if out is not None:
        _write_trace(out, data)
        err.print(plain(f"wrote {out}"))
    if as_json:
        _print_json({"run_id": result.run_id, **data, "summary": result.summary})
        return
    console.print(trace_table(data["tokens"], data["scores"], data["kind"], data["continuation"]))
    for line in trace_lines(result.summary):
        console.print(line)
    console.print(f"run {result.run_id} (detox-tui runs show {result.run_id})")


def _write_trace(path: Path, data: dict[str, Any]) -> None:
    """The heatmap as .json or .csv, written atomically (a temporary file renamed over the target)."""
    import csv
    import io

    from detox_tui.pipeline.results import write_text_atomic

    if path.suffix.lower() == ".json":
        text = json.dumps(_jsonable(data), indent=2)
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["layer"] + [f"{i}:{t}" for i, t in enumerate(data["tokens"])])
        for layer, row in enumerate(data["scores"]):
            w.writerow([layer] + [f"{v:.6f}" for v in row])
        text = buf.getvalue()
    write_text_atomic(path, text)


@app.command()
def stats(
    layers: Annotated[str, typer.Option("--layers", "-l", help="Layers to collect, e.g. 4,5,6,7,8.")],
    model: ModelOpt = DEFAULT_MODEL,
    corpus: StatsCorpusOpt = "builtin",
    tokens: StatsTokensOpt = None,
    stats_device: StatsDeviceOpt = "auto",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Precompute covariance statistics for MEMIT/ROME (one pass for all layers, cached); stored as a run."""
    _before_model_work(threads)
    from detox_tui.pipeline.experiment import run_stats

    layer_list = _parse_layers(layers) or []
    if not layer_list:
        raise UserError("No layers given; e.g. --layers 4,5,6,7,8.")
    stats_device = _stats_device(stats_device)
    cfg = ExperimentConfig(model=ModelConfig(name=model, device=device, dtype=dtype))
    wb = _workbench(cfg, data_dir, as_json, scorer="none")
    wb.lm.check_layers(layer_list)
    result = _run_engine(
        lambda emit, cancel: run_stats(
            wb, layer_list, corpus=corpus, tokens=tokens, emit=emit, cancel=cancel, stats_device=stats_device
        ),
        as_json,
    )
    s = result.summary
    info = {
        "run_id": result.run_id,
        "model": model,
        "layers": s["layers"],
        "corpus": corpus,
        "tokens": s["tokens"],
        "cache_dir": s["cache_dir"],
        "shapes": s["shapes"],
        "seconds": s["seconds"],
        "stats_device": stats_device,
        "memory": s["memory"],
    }
    if as_json:
        _print_json(info)
    else:
        console.print(
            plain(
                f"covariance statistics for layers {s['layers']} ({s['tokens']} tokens) cached in {s['cache_dir']}"
            )
        )
        console.print(f"run {result.run_id}")


@app.command("apply-delta")
def apply_delta(
    delta: Annotated[Path, typer.Argument(help="A saved edit delta (.safetensors).")],
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    save_model: Annotated[
        Path | None, typer.Option("--save-model", help="Save the edited model here.")
    ] = None,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", help="Show greedy continuations before/after.")
    ] = None,
    max_new_tokens: TokensOpt = 20,
    threads: ThreadsOpt = None,
) -> None:
    """Load a saved edit onto a model; optionally save the edited model or compare continuations."""
    _before_model_work(threads)
    from detox_tui.backends.editing.base import EditDelta
    from detox_tui.backends.models import load_model
    from detox_tui.pipeline.generation import generate_continuations

    d = EditDelta.load(delta)
    if save_model is not None:
        _check_model_folder(save_model)
    lm = load_model(model, device=device, dtype=dtype)
    d.check(lm.model)  # parameters and shapes against this model: one line naming the file, before any output
    if d.model_name not in (model, "?") and Path(d.model_name).name != Path(model).name:
        err.print(
            plain(f"note: the delta was computed on '{d.model_name}', applying it to '{model}'", "yellow")
        )
    gcfg = GenerationConfig(samples=0, greedy=True, max_new_tokens=max_new_tokens)
    before = generate_continuations(lm, prompt, gcfg) if prompt else []
    d.apply(lm.model)
    after = generate_continuations(lm, prompt, gcfg) if prompt else []
    for p, b, a in zip(prompt or [], before, after):
        console.print(
            plain(p, "bold"), plain(f"  before: {b.greedy!r}"), plain(f"  after:  {a.greedy!r}"), sep="\n"
        )
    console.print(plain(f"applied {d.method} edit on layers {d.layers} ({len(d.deltas)} tensors)"))
    if save_model is not None:
        _save_model_atomic(lm, save_model)
        console.print(plain(f"saved edited model to {save_model}"))


def _check_model_folder(folder: Path) -> None:
    """--save-model names a new or empty folder (checked before the model loads)."""
    folder = folder.expanduser()
    if folder.is_dir():
        if any(folder.iterdir()):
            raise UserError(f"'{folder}' exists and is not empty; choose a new folder for --save-model.")
    elif folder.exists():
        raise UserError(f"'{folder}' is a file; choose a new folder for --save-model.")


def _save_model_atomic(lm: Any, folder: Path) -> None:
    """Save the model and tokenizer into a temporary folder beside ``folder``, then rename it into place: an
    interrupted or failed save leaves no half-written model folder. The folder's mode follows the umask."""
    import secrets
    import shutil

    folder = folder.expanduser()
    _check_model_folder(folder)
    tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.tmp")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(0o777)  # the umask applies, as for any new folder
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        if folder.is_dir():
            folder.rmdir()  # empty (checked): the rename takes its place
        os.replace(tmp, folder)
    except OSError as exc:
        raise UserError(f"Cannot save the model to '{folder}': {exc.strerror or exc}.") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@runs_app.command("list")
def runs_list(
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List recorded runs, newest first."""
    from rich.table import Table

    from detox_tui.pipeline.store import RunStore

    store = RunStore.open(str(data_dir) if data_dir else None, read_only=True)
    runs = store.list_runs(limit=limit)
    if as_json:
        _print_json({"runs": runs})
        return
    if not runs:
        console.print(plain(f"no runs yet in {store.path}"))
        return
    table = Table(title=plain(f"Runs in {store.path}"))
    table.add_column("id", no_wrap=True)
    for col in ("kind", "model", "status", "created", "prompts", "rows"):
        table.add_column(col)
    for r in runs:
        table.add_row(
            *(plain(r.get(k)) for k in ("id", "kind", "model", "status", "created")),
            plain(r.get("n_prompts", "")),
            plain(r.get("n_rows", "")),
        )
    console.print(table)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id (a unique prefix is enough).")],
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a run's configuration, status, summary and result rows."""

    from detox_tui.console import (
        ablation_table,
        baseline_table,
        edit_table,
        stats_table,
        summary_lines,
        trace_lines,
        trace_table,
    )
    from detox_tui.pipeline.store import RunStore

    store = RunStore.open(str(data_dir) if data_dir else None, read_only=True)
    run = store.get_run(run_id)
    rid = run["id"]
    if as_json:
        _print_json({**run, "rows": store.rows(rid)})
        return
    console.print(plain(rid, "bold") + plain(f" {run['kind']} on {run['model']} - {run['status']}"))
    if run.get("error"):
        console.print(plain(f"error: {run['error']}", "red", one_line=False))
    if run["kind"] == "trace":
        rows = sorted(store.rows(rid, "trace"), key=lambda r: int(r["layer"]))
        summary = run.get("summary") or {}
        settings = (run.get("config") or {}).get("trace") or {}
        tokens = summary.get("tokens") or (rows[0]["tokens"] if rows else [])
        kind = summary.get("kind") or settings.get("kind") or ""
        continuation = summary.get("continuation") or settings.get("continuation") or ""
        console.print(trace_table(tokens, [r["scores"] for r in rows], kind, continuation))
        for line in trace_lines(summary):
            console.print(line)
        return
    if run["kind"] == "stats":
        console.print(stats_table(store.rows(rid, "stats"), run.get("summary") or {}))
        return
    if run["kind"] == "sweep":
        from detox_tui.console_sweep import sweep_summary_line, sweep_table

        console.print(sweep_table(store.rows(rid, "sweep")))
        console.print(sweep_summary_line(rid, run.get("summary") or {}))
        return
    if run["kind"] == "baseline":
        console.print(baseline_table(store.rows(rid, "baseline"), run["config"]["scoring"]["threshold"]))
    elif run["kind"] == "edit":
        console.print(edit_table(store.rows(rid, "edit")))
    elif run["kind"] == "ablation":
        console.print(ablation_table(store.rows(rid, "ablation")))
    for line in summary_lines(run.get("summary") or {}):
        console.print(line)


def _export_run(
    run_id: str,
    fmt: str | None,
    path: Path | None,
    data_dir: Path | None,
    columns: str = "default",
    force: bool = False,
) -> None:
    """Export a stored run; the format is --format, else --out's extension, else csv (checked before the store opens).

    The store is only read (a read-only or full disk still exports elsewhere); an existing file is replaced only
    with --force; the default file name is the run id's, in the current folder."""
    from detox_tui.pipeline.results import FORMATS, FileExists, export_file_name, suffix_format
    from detox_tui.pipeline.store import RunStore
    from detox_tui.pipeline.tables import COLUMN_CHOICES

    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"Unknown --format '{fmt}'; use {', '.join(FORMATS)}.")
    if columns not in COLUMN_CHOICES:
        raise UserError(f"Unknown --columns '{columns}'; use {' or '.join(COLUMN_CHOICES)}.")
    if path is not None:
        named = suffix_format(path)
        if fmt is not None and named is not None and named != fmt:
            raise UserError(
                f"--format {fmt} clashes with --out '{path}' (a .{named} file); drop --format or change the extension."
            )
        if fmt is None and named is None:
            what = f"'{path.suffix}'" if path.suffix else "no extension"
            raise UserError(
                f"Cannot tell the export format of --out '{path}' ({what}); give --format or use a .csv, .json, "
                ".md, .tex or .jsonl file."
            )
        fmt = fmt or named
    fmt = fmt or "csv"
    store = RunStore.open(str(data_dir) if data_dir else None, read_only=True)
    run = store.get_run(run_id)
    target = path or Path(export_file_name(run["id"], fmt))
    try:
        # Every file (the table, a CSV's summary) is checked before any is written.
        written = store.export_files(run["id"], target, fmt, columns=columns, overwrite=force)
    except FileExists as exc:
        raise UserError(f"'{exc.path}' already exists; pass --force to replace it.") from exc
    for path_written in written:
        err.print(plain(f"wrote {path_written}"))


FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        "-f",
        help="csv, json, md, tex or jsonl (one generation per line); default: --out's extension, else csv.",
    ),
]
ColumnsOpt = Annotated[
    str,
    typer.Option(
        "--columns",
        help="default: the columns a reader needs, with human names, and the run summary; all: every field.",
    ),
]


ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing output file (and its .summary.csv).")
]


@runs_app.command("export")
def runs_export(
    run_id: Annotated[str, typer.Argument(help="Run id (a unique prefix is enough).")],
    fmt: FormatOpt = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output file (default: <run id>.<format>).")
    ] = None,
    columns: ColumnsOpt = "default",
    force: ForceOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Export a run's result table with its summary (csv, json, md, tex) or its generations (jsonl)."""
    _export_run(run_id, fmt, out_path, data_dir, columns, force)


@app.command("export")
def export_cmd(
    run_id: Annotated[str, typer.Argument(help="Run id (a unique prefix is enough).")],
    fmt: FormatOpt = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output file (default: <run id>.<format>).")
    ] = None,
    columns: ColumnsOpt = "default",
    force: ForceOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Same as `runs export`."""
    _export_run(run_id, fmt, out_path, data_dir, columns, force)


@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    prompts: PromptsOpt = "builtin",
    scorer: ScorerOpt = DEFAULT_SCORER,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; one other than loopback needs --allow-remote.")
    ] = "localhost",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    allow_remote: Annotated[
        bool,
        typer.Option(
            "--allow-remote",
            help="Allow a --host other machines can reach (there is no authentication: prefer an SSH port-forward).",
        ),
    ] = False,
) -> None:
    """Serve the app in a browser (needs the optional 'serve' extra: textual-serve); loopback only by default."""
    import shlex

    from detox_tui.serving import check_bind, make_server

    warning = check_bind(host, allow_remote)
    command = " ".join(
        shlex.quote(x)
        for x in [
            sys.executable,
            "-m",
            "detox_tui",
            "--model",
            model,
            "--prompts",
            prompts,
            "--scorer",
            scorer,
        ]
    )
    server = make_server(command, host=host, port=port)
    if warning:
        sys.stderr.write(warning + "\n")  # one line, never wrapped
        sys.stderr.flush()
    server.serve()


@app.command()
def demo(
    headless: Annotated[
        bool,
        typer.Option("--headless", help="Run baseline -> MEMIT edit -> verdict in the terminal; no app."),
    ] = False,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Build the demo model again even if the cached one is whole.")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            envvar="DETOX_TUI_THREADS",
            show_envvar=True,
            help="torch intra-op threads (default for the demo: 1, the fastest for its tiny model).",
        ),
    ] = None,
    resume: ResumeOpt = None,
) -> None:
    """Try detox-tui with no download: a tiny GPT-2 that insults on cue, built once (seconds) and cached.

    The model, its prompts (with the safe targets an edit installs) and the embedded profanity scorer open in
    the app with MEMIT settings that work for it; --headless runs the edit and prints the verdict.
    """
    from detox_tui import demo as demo_mod

    if as_json and not headless:
        raise UserError("--json needs --headless (the app prints no results to read).")
    if resume and not headless:
        raise UserError("--resume needs --headless (the app resumes nothing).")
    _before_model_work(threads if threads is not None else demo_mod.DEFAULT_THREADS)
    built = _run_engine(
        lambda emit, cancel: demo_mod.ensure_demo(
            data_dir, rebuild=rebuild, threads=None, emit=emit, cancel=cancel
        ),
        as_json,
    )
    if not as_json:
        how = f"built in {built.manifest['build_seconds']:.1f} s" if built.built else "cached"
        err.print(plain(f"demo model ({how}): {built.folder}"))
    if not headless:
        from detox_tui.app import DetoxApp

        DetoxApp(**demo_mod.app_options(built, str(data_dir) if data_dir else None)).run()
        return
    from detox_tui.console import edit_table, summary_lines

    with err.status("Loading the demo model and the profanity scorer...") if not as_json else _null():
        wb = demo_mod.load_workbench(built, data_dir)
    result = _run_engine(
        lambda emit, cancel: demo_mod.run_demo_edit(wb, built, emit=emit, cancel=cancel, resume=resume),
        as_json,
        wb=wb,
        command="demo --headless",
        resume=resume,
    )
    info = {
        "folder": str(built.folder),
        "model": str(built.model_dir),
        "prompts": str(built.prompts),
        "built": built.built,
        "build_seconds": built.manifest.get("build_seconds"),
    }
    if as_json:
        _print_json(
            {
                "demo": info,
                "run_id": result.run_id,
                "config": demo_mod.demo_config(built).to_dict(),
                "rows": result.rows,
                "side_effects": result.side_effects,
                "summary": result.summary,
            }
        )
        return
    run = demo_mod.RUN
    console.print(
        f"MEMIT on blocks {','.join(map(str, run['layers']))} of the demo model, "
        f"{run['run_settings']['samples']} sampled continuations per prompt, scored by the embedded "
        f"{run['scorer']} scorer",
        markup=False,
        highlight=False,
    )
    console.print(edit_table(result.rows))
    for line in summary_lines(result.summary):
        console.print(line)
    console.print(
        plain(f"run {result.run_id} (detox-tui runs show {result.run_id}); open the app: detox-tui demo")
    )


@app.command()
def sweep(
    grid: Annotated[
        Path | None,
        typer.Argument(
            help="Grid file (TOML, or YAML with PyYAML): models, methods, layers, hparams, prompts."
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option("--backend", help="local (in this process, in order) or ray (actors, one per GPU).")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ray cluster: auto or ray://host:10001 (default: start a local Ray)."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="At most this many Ray actors.")
    ] = None,
    cpus_per_worker: Annotated[
        int, typer.Option("--cpus-per-worker", min=1, help="CPUs (and torch threads) per Ray actor.")
    ] = 1,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Run only the unfinished experiments of this sweep.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the expanded experiments and stop; nothing is stored.")
    ] = False,
    verify_weights: Annotated[
        bool, typer.Option("--verify-weights", help="Check the weights' fingerprint after every experiment.")
    ] = False,
    out: OutOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Run a grid of edit experiments (models x methods x layers x hyperparameters), each from the original weights."""
    from detox_tui.console_sweep import SweepProgress, experiments_table, sweep_summary_line, sweep_table
    from detox_tui.pipeline.store import RunStore
    from detox_tui.pipeline.sweep import LocalBackend, experiment_rows, load_grid, run_sweep, stored_sweep

    if backend not in ("local", "ray"):
        raise UserError(f"Unknown --backend '{backend}'; use local or ray.")
    if address and backend != "ray":
        raise UserError("--address needs --backend ray.")
    if (grid is None) == (resume is None):
        raise UserError("Give a grid file, or --resume RUN_ID to finish a stored sweep (not both).")
    _check_out(out)
    store = RunStore.open(str(data_dir) if data_dir else None)
    plan = stored_sweep(store, resume)[1] if resume else load_grid(grid)
    if not as_json:
        err.print(experiments_table(experiment_rows(plan)))
    if dry_run:
        if as_json:
            _print_json({"experiments": [e.to_dict() for e in plan.experiments]})
        return
    _before_model_work(threads)
    dd = str(data_dir) if data_dir else None
    if backend == "ray":
        from detox_tui.pipeline.sweep_ray import RayBackend

        engine = RayBackend(
            address=address,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            data_dir=dd,
            verify=verify_weights,
            log_message=lambda m: err.print(plain(m)) if not as_json else None,
        )
    else:
        engine = LocalBackend(dd, verify=verify_weights)
    box: list[str] = []

    def emit(event) -> None:
        if event.kind == "expanded" and not box:
            box.append(event.run_id)
        progress(event)

    try:
        with SweepProgress(err, quiet=as_json) as progress:
            run_id, summary = run_sweep(store, plan, engine, data_dir=dd, resume=resume, emit=emit)
    except (KeyboardInterrupt, Cancelled) as exc:
        raise RunInterrupted("sweep", box[0] if box else resume) from exc
    rows = store.rows(run_id, "sweep")
    if out is not None:
        for written in store.export_files(run_id, out):
            err.print(plain(f"wrote {written}"))
    if as_json:
        _print_json({"run_id": run_id, "experiments": rows, "summary": summary})
        return
    console.print(sweep_table(rows))
    console.print(sweep_summary_line(run_id, summary))


# ------------------------------------------------------------------------------------------ entry point


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point.

    The contract scripts rely on: a usage or user error prints one line on stderr and exits 2; Ctrl+C
    (or SIGTERM) prints "interrupted" with the command that resumes the run, stores the run as
    cancelled, and exits 130 (143 for SIGTERM); an unexpected error prints one line and exits 1.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args = [a for a in args if a != "--debug"]
    _DEBUG["on"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    signals: list[int] = []
    with _sigterm_as_interrupt(signals):
        return _invoke(args, debug, signals)


def _invoke(args: list[str], debug: bool, signals: list[int]) -> int:
    ce = _click_exceptions()
    aborts = (KeyboardInterrupt, Cancelled, RunInterrupted, typer.Abort, getattr(ce, "Abort", typer.Abort))
    exits = (typer.Exit, getattr(ce, "Exit", typer.Exit))

    def interrupted() -> int:  # 130 for Ctrl+C, 143 for SIGTERM, as shells report them
        return 128 + int(signals[-1] if signals else signal.SIGINT)

    try:
        rc = app(args=args, prog_name="detox-tui", standalone_mode=False)
    except UserError as exc:
        if debug:
            err.print_exception()
        _error_line(str(exc))
        return 2
    except aborts as exc:
        _interrupted_line(exc)
        return interrupted()
    except ce.ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `detox-tui runs`: a request for the group's help
            if exc.format_message().strip():
                sys.stdout.write(exc.format_message() + "\n")
            return 0
        if debug:
            err.print_exception()
        _error_line(_usage_message(exc))
        return 2
    except exits as exc:
        rc = getattr(exc, "exit_code", 0)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one sentence unless --debug
        if debug:
            err.print_exception()
            return 1
        message = _known_runtime_error(exc)
        if message:
            _error_line(message)
            return 2
        _error_line(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return 1
    if rc == 130:  # typer's answer to a KeyboardInterrupt outside a run (loading, parsing, printing)
        _interrupted_line(None)
        return interrupted()
    return int(rc or 0)


def _click_exceptions():
    """The click exceptions typer raises: its vendored copy of click (typer >= 0.26) or click itself."""
    try:
        from typer._click import exceptions
    except ImportError:  # older typer, which depends on click
        from click import exceptions  # type: ignore[no-redef]
    return exceptions


def _usage_message(exc: Exception) -> str:
    """Click's usage errors as one sentence that names the command and the option or argument."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    possibilities = getattr(exc, "possibilities", None)
    option = getattr(exc, "option_name", None)
    if option and possibilities is not None and type(exc).__name__ == "NoSuchOption":
        message = f"No such option: {option}"
        if possibilities:  # the closest one: click offers every option above its cutoff
            import difflib

            closest = difflib.get_close_matches(option, list(possibilities), n=1, cutoff=0.0)
            message += f" (did you mean {closest[0]}?)"
    message = " ".join(message.split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "detox-tui"
    return f"{where}: {message}; see '{where} --help'."


def _interrupted_line(exc: BaseException | None) -> None:
    """'interrupted' and, when a run was stored, the command that resumes it (one line on stderr)."""
    run = exc if isinstance(exc, RunInterrupted) else None
    if run is not None and run.run_id:
        line = (
            f"interrupted; run {run.run_id} is stored as cancelled with what finished; resume it with "
            f"detox-tui {run.command} --resume {run.run_id} (and the same options)"
        )
    else:
        line = "interrupted"
    sys.stderr.write(visible(line) + "\n")
    sys.stderr.flush()


class _sigterm_as_interrupt:
    """While the CLI runs in the main thread, SIGTERM raises KeyboardInterrupt as Ctrl+C does, so the
    engine restores the weights and stores the run as cancelled instead of leaving it "running"."""

    def __init__(self, signals: list[int]):
        self.signals = signals
        self.previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)
        raise KeyboardInterrupt

    def __enter__(self) -> _sigterm_as_interrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _error_line(message: str) -> None:
    """One line on stderr, never wrapped (scripts grep it)."""
    # Messages can quote prompts, file names and file contents: controls, bidi and surrogates shown as escapes.
    sys.stderr.write(f"error: {visible(' '.join(message.split()))}\n")
    sys.stderr.flush()


def _known_runtime_error(exc: Exception) -> str | None:
    """Map errors users cause on big models (out of memory) to one sentence."""
    text = str(exc)
    if "out of memory" in text.lower():
        return "The device ran out of memory; use a smaller --batch-size, --dtype float16, or --device cpu."
    return None


def _quiet_libraries() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - logging setup must never stop the CLI
        pass


if __name__ == "__main__":
    raise SystemExit(main())
