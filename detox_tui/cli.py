"""Typer CLI: `detox-tui` opens the app; subcommands run the same engine headless."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
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
    Paths,
    ScoringConfig,
    SideEffectConfig,
    VerdictConfig,
)
from detox_tui.errors import Cancelled, UserError

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
MethodOpt = Annotated[str, typer.Option("--method", help="memit, rome, ft, dinm or aura.")]
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


def _config(
    *,
    model: str,
    device: str,
    dtype: str,
    prompts: str,
    scorer: str,
    samples: int,
    max_new_tokens: int,
    seed: int,
    temperature: float,
    top_k: int,
    top_p: float,
    greedy: bool,
    threshold: float,
    score_with_prompt: bool,
    batch_size: int,
    min_reduction: float = 0.1,
    alpha: float = 0.05,
    ppl_model: str | None = None,
    **edit: Any,
) -> ExperimentConfig:
    cfg = ExperimentConfig(
        model=ModelConfig(name=model, device=device, dtype=dtype),
        generation=GenerationConfig(
            samples=samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
            seed=seed,
            batch_size=batch_size,
        ),
        scoring=ScoringConfig(scorer=scorer, threshold=threshold, score_with_prompt=score_with_prompt),
        prompts=prompts,
        verdict=VerdictConfig(min_reduction=min_reduction, alpha=alpha, ppl_model=ppl_model),
    )
    for key, value in edit.items():
        setattr(cfg, key, value)
    return cfg


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


def _workbench(cfg: ExperimentConfig, data_dir: Path | None, quiet: bool):
    from detox_tui.pipeline.experiment import Workbench

    with (
        err.status(f"Loading {cfg.model.name} and the {cfg.scoring.scorer} scorer...", spinner="dots")
        if not quiet
        else _null()
    ):
        return Workbench.load(cfg, data_dir=str(data_dir) if data_dir else None)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _run_engine(fn, quiet: bool):
    """Run an engine call with Rich progress; Ctrl+C sets the cancel flag so weights are restored."""
    from detox_tui.console import EventRenderer

    cancel = threading.Event()
    with EventRenderer(err, quiet=quiet) as render:
        try:
            return fn(render, cancel)
        except KeyboardInterrupt:
            cancel.set()
            raise


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


def _export(rows: list[dict[str, Any]], path: Path | None, meta: dict[str, Any]) -> None:
    if path is None:
        return
    from detox_tui.pipeline.results import export_rows, format_from_path

    export_rows(rows, path, format_from_path(path), meta=_jsonable(meta))
    err.print(f"wrote {path}")


# ------------------------------------------------------------------------------------------ commands


@app.callback(invoke_without_command=True)
def main_callback(
    ctx: typer.Context,
    model: ModelOpt = DEFAULT_MODEL,
    prompts: PromptsOpt = "builtin",
    scorer: ScorerOpt = DEFAULT_SCORER,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    data_dir: DataDirOpt = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """Without a command, open the Textual app."""
    if debug:
        _DEBUG["on"] = True
    if ctx.invoked_subcommand is not None:
        return
    from detox_tui.app import DetoxApp

    DetoxApp(
        model=model,
        prompts=None if prompts == "builtin" else prompts,
        scorer=scorer,
        device=device,
        dtype=dtype,
        data_dir=str(data_dir) if data_dir else None,
    ).run()


@app.command()
def baseline(
    model: ModelOpt = DEFAULT_MODEL,
    prompts: PromptsOpt = "builtin",
    scorer: ScorerOpt = DEFAULT_SCORER,
    samples: SamplesOpt = 5,
    max_new_tokens: TokensOpt = 20,
    seed: SeedOpt = 0,
    temperature: TempOpt = 1.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 0.9,
    greedy: GreedyOpt = False,
    threshold: ThresholdOpt = 0.1,
    score_with_prompt: WithPromptOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = 16,
    limit: LimitOpt = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
    resume: ResumeOpt = None,
    protocol: EvalProtocolOpt = None,
    ppl_model: PplModelOpt = None,
    min_reduction: MinReductionOpt = 0.1,
    alpha: AlphaOpt = 0.05,
    *,
    ctx: typer.Context,
) -> None:
    """Score seeded sampled continuations of each prompt on the original model."""
    from detox_tui.console import baseline_table, summary_lines
    from detox_tui.pipeline.experiment import run_baseline

    cfg = _config(**_common(locals()))
    _apply_eval_protocol(ctx, cfg, protocol)
    _check_out(out)
    items = _load_items(prompts, limit)
    wb = _workbench(cfg, data_dir, as_json)
    result = _run_engine(
        lambda emit, cancel: run_baseline(wb, items, cfg, emit=emit, cancel=cancel, resume=resume), as_json
    )
    _export(result.rows, out, {"run_id": result.run_id, "config": cfg.to_dict(), "summary": result.summary})
    if as_json:
        _print_json(
            {"run_id": result.run_id, "config": cfg.to_dict(), "rows": result.rows, "summary": result.summary}
        )
        return
    console.print(baseline_table(result.rows, threshold))
    s = result.summary
    console.print(
        f"run {result.run_id}: mean toxicity {s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}], "
        f"{100 * s['share_prompts_above']:.1f}% of prompts at or above {threshold:g}"
    )
    for line in summary_lines(s):
        console.print(line)


def _common(local: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "model device dtype prompts scorer samples max_new_tokens seed temperature top_k top_p greedy threshold "
        "score_with_prompt batch_size min_reduction alpha ppl_model"
    ).split()
    return {k: local[k] for k in keys}


def _edit_fields(local: dict[str, Any], layers: list[int] | None) -> dict[str, Any]:
    if local["mode"] not in ("replace", "erase"):
        raise UserError(f"Unknown --mode '{local['mode']}'; use replace or erase.")
    from detox_tui.backends.editing.base import EDITORS

    if local["method"].lower() not in EDITORS:
        raise UserError(f"Unknown --method '{local['method']}'; choose one of: {', '.join(EDITORS)}.")
    return {
        "method": local["method"].lower(),
        "layers": layers,
        "mode": local["mode"],
        "protocol": "per-prompt" if local["per_prompt"] else "batch",
        "hparams": _parse_hparams(local["hparam"]),
        "holdout": local.get("holdout"),
        "stats_corpus": local["stats_corpus"],
        "stats_tokens": local["stats_tokens"],
        "side_effects": SideEffectConfig(
            neutral_corpus=local["neutral_corpus"],
            neutral_prompts=local["neutral_prompts"],
            collapse_factor=local["collapse_factor"],
        ),
    }


@app.command()
def edit(
    method: MethodOpt = "memit",
    layers: Annotated[
        str | None, typer.Option("--layers", "-l", help="e.g. 4,5,6,7,8 (default: preset).")
    ] = None,
    mode: ModeOpt = "replace",
    per_prompt: ProtocolOpt = True,
    hparam: HparamOpt = None,
    holdout: HoldoutOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    prompts: PromptsOpt = "builtin",
    scorer: ScorerOpt = DEFAULT_SCORER,
    samples: SamplesOpt = 5,
    max_new_tokens: TokensOpt = 20,
    seed: SeedOpt = 0,
    temperature: TempOpt = 1.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 0.9,
    greedy: GreedyOpt = False,
    threshold: ThresholdOpt = 0.1,
    score_with_prompt: WithPromptOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = 16,
    limit: LimitOpt = None,
    stats_corpus: StatsCorpusOpt = "builtin",
    stats_tokens: StatsTokensOpt = None,
    neutral_corpus: NeutralOpt = "builtin",
    neutral_prompts: NeutralPromptsOpt = "builtin",
    collapse_factor: CollapseOpt = 2.0,
    save_delta: Annotated[
        Path | None, typer.Option("--save-delta", help="Save the edit (safetensors).")
    ] = None,
    verify_weights: Annotated[
        bool,
        typer.Option("--verify-weights", help="Hash the weights after every revert (also with --debug)."),
    ] = False,
    out: OutOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
    resume: ResumeOpt = None,
    protocol: EvalProtocolOpt = None,
    ppl_model: PplModelOpt = None,
    min_reduction: MinReductionOpt = 0.1,
    alpha: AlphaOpt = 0.05,
    *,
    ctx: typer.Context,
) -> None:
    """Edit the model (per prompt or in one batch) and compare toxicity before and after, with side effects."""
    from detox_tui.console import edit_table, summary_lines
    from detox_tui.pipeline.experiment import run_edit

    cfg = _config(**_common(locals()), **_edit_fields(locals(), _parse_layers(layers)))
    _apply_eval_protocol(ctx, cfg, protocol)
    _check_out(out)
    items = _load_items(prompts, limit)
    held = _load_items(holdout, None) if holdout else []
    wb = _workbench(cfg, data_dir, as_json)
    if cfg.layers:
        wb.lm.check_layers(cfg.layers)
    verify = verify_weights or _DEBUG["on"]
    result = _run_engine(
        lambda emit, cancel: run_edit(
            wb,
            items,
            cfg,
            holdout=held,
            emit=emit,
            cancel=cancel,
            resume=resume,
            save_delta=str(save_delta) if save_delta else None,
            verify=verify,
        ),
        as_json,
    )
    _export(result.rows, out, {"run_id": result.run_id, "config": cfg.to_dict(), "summary": result.summary})
    if as_json:
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
        console.print(f"saved edit delta: {path}")
    console.print(f"run {result.run_id}")


@app.command()
def ablate(
    configs: Annotated[
        str, typer.Option("--configs", "-c", help="Layer sets, e.g. '1;5;6;5,6;6,7;4,5,6'.")
    ] = ("1;5;6;5,6;6,7;4,5,6"),
    method: MethodOpt = "memit",
    mode: ModeOpt = "replace",
    per_prompt: ProtocolOpt = True,
    hparam: HparamOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    prompts: PromptsOpt = "builtin",
    scorer: ScorerOpt = DEFAULT_SCORER,
    samples: SamplesOpt = 5,
    max_new_tokens: TokensOpt = 20,
    seed: SeedOpt = 0,
    temperature: TempOpt = 1.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 0.9,
    greedy: GreedyOpt = False,
    threshold: ThresholdOpt = 0.1,
    score_with_prompt: WithPromptOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = 16,
    limit: LimitOpt = None,
    stats_corpus: StatsCorpusOpt = "builtin",
    stats_tokens: StatsTokensOpt = None,
    neutral_corpus: NeutralOpt = "builtin",
    neutral_prompts: NeutralPromptsOpt = "builtin",
    collapse_factor: CollapseOpt = 2.0,
    verify_weights: Annotated[
        bool, typer.Option("--verify-weights", help="Hash the weights after every config.")
    ] = False,
    out: OutOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
    resume: ResumeOpt = None,
    protocol: EvalProtocolOpt = None,
    ppl_model: PplModelOpt = None,
    min_reduction: MinReductionOpt = 0.1,
    alpha: AlphaOpt = 0.05,
    *,
    ctx: typer.Context,
) -> None:
    """Compare layer configurations, each edit starting from the original weights."""
    from detox_tui.console import ablation_table
    from detox_tui.pipeline.experiment import parse_configs, run_ablation

    config_list = parse_configs(configs)
    cfg = _config(**_common(locals()), **_edit_fields(locals(), None))
    _apply_eval_protocol(ctx, cfg, protocol)
    _check_out(out)
    items = _load_items(prompts, limit)
    wb = _workbench(cfg, data_dir, as_json)
    for c in config_list:
        wb.lm.check_layers(c)
    verify = verify_weights or _DEBUG["on"]
    result = _run_engine(
        lambda emit, cancel: run_ablation(
            wb, items, cfg, config_list, emit=emit, cancel=cancel, resume=resume, verify=verify
        ),
        as_json,
    )
    _export(
        result.configs or [],
        out,
        {"run_id": result.run_id, "config": cfg.to_dict(), "summary": result.summary},
    )
    if as_json:
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
        console.print(f"run {result.run_id}: best configuration {best} ({100 * share:.1f}% detoxified)")


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
) -> None:
    """Causal tracing: which (layer, token) states decide the continuation."""
    from detox_tui.backends.models import load_model
    from detox_tui.backends.tracing import peak_layers
    from detox_tui.backends.tracing import trace as run_trace

    if kind not in ("hidden", "mlp", "attn"):
        raise UserError(f"Unknown --kind '{kind}'; use hidden, mlp or attn.")
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise UserError(f"Cannot write '{out}': trace output must end in .csv or .json.")
    _check_out(out)
    if subject is not None and subject not in prompt:
        raise UserError(f"The subject '{subject}' does not occur in the prompt.")
    lm = load_model(model, device=device, dtype=dtype)
    if continuation is None:
        from detox_tui.pipeline.generation import generate_continuations

        gens = generate_continuations(
            lm,
            [prompt],
            GenerationConfig(samples=0, greedy=True, max_new_tokens=continuation_tokens, seed=seed),
        )
        continuation = gens[0].greedy or ""
        if not continuation:
            raise UserError("The model's greedy continuation is empty; pass --continuation.")
    result = _run_engine(
        lambda emit, cancel: run_trace(
            lm,
            prompt,
            continuation,
            kind=kind,
            window=window,
            samples=noise_samples,
            subject=subject,
            noise=noise,
            seed=seed,
            emit=emit,
            cancel=cancel,
        ),
        as_json,
    )
    data = result.to_dict()
    if out is not None:
        _write_trace(out, data)
        err.print(f"wrote {out}")
    if as_json:
        _print_json(data)
        return
    _print_heatmap(data)
    console.print(f"peak layers: {peak_layers(result)}")


def _write_trace(path: Path, data: dict[str, Any]) -> None:
    import csv

    try:
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(_jsonable(data), indent=2), encoding="utf-8")
            return
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["layer"] + [f"{i}:{t}" for i, t in enumerate(data["tokens"])])
            for layer, row in enumerate(data["scores"]):
                w.writerow([layer] + [f"{v:.6f}" for v in row])
    except OSError as exc:
        raise UserError(f"Cannot write '{path}': {exc.strerror or exc}.") from exc


def _print_heatmap(data: dict[str, Any]) -> None:
    from rich.table import Table

    scores = data["scores"]
    flat = [v for row in scores for v in row] or [0.0]
    hi = max(max(flat), 1e-9)
    table = Table(
        title=f"Causal trace ({data['kind']}) of {data['continuation']!r}: p_restored - p_corrupted"
    )
    table.add_column("layer")
    for t in data["tokens"]:
        table.add_column(t.replace("\n", "\\n"), justify="right")
    for layer, row in enumerate(scores):
        cells = []
        for v in row:
            level = max(0.0, min(1.0, v / hi))
            shade = ["", "on grey23", "on dark_red", "on red3", "on red1"][min(4, int(level * 4.999))]
            cells.append(f"[{shade}]{v:+.2f}[/]" if shade else f"{v:+.2f}")
        table.add_row(str(layer), *cells)
    console.print(table)
    console.print(f"p(clean) = {data['p_clean']:.4f}, p(corrupted) = {data['p_corrupted']:.4f}")


@app.command()
def stats(
    layers: Annotated[str, typer.Option("--layers", "-l", help="Layers to collect, e.g. 4,5,6,7,8.")],
    model: ModelOpt = DEFAULT_MODEL,
    corpus: StatsCorpusOpt = "builtin",
    tokens: StatsTokensOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Precompute covariance statistics for MEMIT/ROME (one pass for all layers, cached)."""
    from detox_tui.backends.models import load_model
    from detox_tui.backends.stats import covariance, default_stats_tokens

    layer_list = _parse_layers(layers) or []
    if not layer_list:
        raise UserError("No layers given; e.g. --layers 4,5,6,7,8.")
    paths = Paths.resolve(str(data_dir) if data_dir else None)
    lm = load_model(model, device=device, dtype=dtype)
    lm.check_layers(layer_list)
    budget = tokens or default_stats_tokens(lm)
    result = _run_engine(
        lambda emit, cancel: covariance(
            lm, layer_list, corpus=corpus, tokens=budget, cache_dir=paths.cache_dir, emit=emit, cancel=cancel
        ),
        as_json,
    )
    info = {
        "model": model,
        "layers": layer_list,
        "corpus": corpus,
        "tokens": budget,
        "cache_dir": str(paths.stats_dir),
        "shapes": {str(k): list(v.shape) for k, v in result.items()},
    }
    if as_json:
        _print_json(info)
    else:
        console.print(
            f"covariance statistics for layers {layer_list} ({budget} tokens) cached in {paths.stats_dir}"
        )


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
) -> None:
    """Load a saved edit onto a model; optionally save the edited model or compare continuations."""
    from detox_tui.backends.editing.base import EditDelta
    from detox_tui.backends.models import load_model
    from detox_tui.pipeline.generation import generate_continuations

    d = EditDelta.load(delta)
    if save_model is not None and save_model.exists() and any(save_model.iterdir()):
        raise UserError(f"'{save_model}' exists and is not empty; choose a new folder for --save-model.")
    lm = load_model(model, device=device, dtype=dtype)
    if d.model_name not in (model, "?") and Path(d.model_name).name != Path(model).name:
        err.print(f"[yellow]note: the delta was computed on '{d.model_name}', applying it to '{model}'[/]")
    gcfg = GenerationConfig(samples=0, greedy=True, max_new_tokens=max_new_tokens)
    before = generate_continuations(lm, prompt, gcfg) if prompt else []
    d.apply(lm.model)
    after = generate_continuations(lm, prompt, gcfg) if prompt else []
    for p, b, a in zip(prompt or [], before, after):
        console.print(f"[bold]{p}[/]\n  before: {b.greedy!r}\n  after:  {a.greedy!r}")
    console.print(f"applied {d.method} edit on layers {d.layers} ({len(d.deltas)} tensors)")
    if save_model is not None:
        try:
            lm.model.save_pretrained(save_model)
            lm.tokenizer.save_pretrained(save_model)
        except OSError as exc:
            raise UserError(f"Cannot save the model to '{save_model}': {exc.strerror or exc}.") from exc
        console.print(f"saved edited model to {save_model}")


@runs_app.command("list")
def runs_list(
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List recorded runs, newest first."""
    from rich.table import Table

    from detox_tui.pipeline.store import RunStore

    store = RunStore.open(str(data_dir) if data_dir else None)
    runs = store.list_runs(limit=limit)
    if as_json:
        _print_json({"runs": runs})
        return
    if not runs:
        console.print(f"no runs yet in {store.path}")
        return
    table = Table(title=f"Runs in {store.path}")
    table.add_column("id", no_wrap=True)
    for col in ("kind", "model", "status", "created", "prompts"):
        table.add_column(col)
    for r in runs:
        table.add_row(
            r["id"], r["kind"], r["model"], r["status"], str(r["created"]), str(r.get("n_prompts", ""))
        )
    console.print(table)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id (a unique prefix is enough).")],
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a run's configuration, status, summary and result rows."""
    from detox_tui.console import ablation_table, baseline_table, edit_table, summary_lines
    from detox_tui.pipeline.store import RunStore

    store = RunStore.open(str(data_dir) if data_dir else None)
    run = store.get_run(run_id)
    rid = run["id"]
    if as_json:
        _print_json({**run, "rows": store.rows(rid)})
        return
    console.print(f"[bold]{rid}[/] {run['kind']} on {run['model']} - {run['status']}")
    if run["kind"] == "baseline":
        console.print(baseline_table(store.rows(rid, "baseline"), run["config"]["scoring"]["threshold"]))
    elif run["kind"] == "edit":
        console.print(edit_table(store.rows(rid, "edit")))
    elif run["kind"] == "ablation":
        console.print(ablation_table(store.rows(rid, "ablation")))
    for line in summary_lines(run.get("summary") or {}):
        console.print(line)


def _export_run(run_id: str, fmt: str, path: Path | None, data_dir: Path | None) -> None:
    from detox_tui.pipeline.store import RunStore

    if fmt not in ("csv", "json", "md", "jsonl"):
        raise UserError(f"Unknown --format '{fmt}'; use csv, json, md or jsonl.")
    store = RunStore.open(str(data_dir) if data_dir else None)
    run = store.get_run(run_id)
    target = path or Path(f"{run['id']}.{fmt}")
    _check_out(target)
    written = store.export(run["id"], target, fmt)
    err.print(f"wrote {written}")


FormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="csv, json, md or jsonl (one generation per line).")
]


@runs_app.command("export")
def runs_export(
    run_id: Annotated[str, typer.Argument(help="Run id (a unique prefix is enough).")],
    fmt: FormatOpt = "csv",
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output file (default: <run id>.<format>).")
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Export a run's result table (csv, json, md) or its generations (jsonl)."""
    _export_run(run_id, fmt, out_path, data_dir)


@app.command("export")
def export_cmd(
    run_id: Annotated[str, typer.Argument(help="Run id (a unique prefix is enough).")],
    fmt: FormatOpt = "csv",
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output file (default: <run id>.<format>).")
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Same as `runs export`."""
    _export_run(run_id, fmt, out_path, data_dir)


@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    prompts: PromptsOpt = "builtin",
    scorer: ScorerOpt = DEFAULT_SCORER,
    host: Annotated[str, typer.Option("--host")] = "localhost",
    port: Annotated[int, typer.Option("--port")] = 8000,
) -> None:
    """Serve the app in a browser (needs the optional 'serve' extra: textual-serve)."""
    import shlex

    try:
        from textual_serve.server import Server
    except ImportError as exc:
        raise UserError(
            "Serving in a browser needs the optional extra: pip install 'detox-tui[serve]'."
        ) from exc
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
    Server(command, host=host, port=port).serve()


# ------------------------------------------------------------------------------------------ entry point


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: user errors -> one sentence on stderr and exit code 2."""
    import click

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args = [a for a in args if a != "--debug"]
        _DEBUG["on"] = True
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        _quiet_libraries()
    try:
        rc = app(args=args, prog_name="detox-tui", standalone_mode=False)
        return int(rc or 0)
    except UserError as exc:
        if debug:
            err.print_exception()
        _error_line(str(exc))
        return 2
    except Cancelled:
        err.print("cancelled; the original weights are restored and finished results are in the run store.")
        return 130
    except (KeyboardInterrupt, click.exceptions.Abort):
        err.print("interrupted; finished results are in the run store.")
        return 130
    except click.exceptions.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
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


def _error_line(message: str) -> None:
    """One line on stderr, never wrapped (scripts grep it)."""
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
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
