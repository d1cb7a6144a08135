"""Paste-ready tables: the columns a reader needs for each kind of result, with human names, in one place.

A ``Column`` reads a row by its record fields (``detox_tui.pipeline.records``; dotted for nested records, e.g.
``before.mean``), so a renamed field fails tests/test_exports.py instead of emptying a paper's table. Exports (csv,
md, tex) take their default columns and the run summary's entries from here; ``columns="all"`` keeps every
flattened field under its internal name. Text only: no numpy, no torch, so reading the run store stays light.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from detox_tui.pipeline.records import DEFINITIONS
from detox_tui.text import visible

COLUMN_CHOICES = ("default", "all")

# Value kinds: how a column's fields become one cell (md/tex) or several (csv).
TEXT, INT, NUM, P, BOOL, CI, PM, ARROW, TRIPLE = (
    "text",
    "int",
    "num",
    "p",
    "bool",
    "ci",
    "pm",
    "arrow",
    "triple",
)
_NUMERIC = {INT, NUM, P, CI, PM, ARROW, TRIPLE}

Rows = Sequence[Mapping[str, Any]]


def get(row: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path of a row dict (None when any step is missing); keys may hold dots themselves
    ("share_above_0.5"), and a number steps into a list ("scores.3")."""
    value: Any = row
    while True:
        if isinstance(value, (list, tuple)):
            head, dot, rest = path.partition(".")
            if not head.isdigit() or int(head) >= len(value):
                return None
            value, path = value[int(head)], rest
            if not dot:
                return value
            continue
        if not isinstance(value, Mapping):
            return None
        if path in value:
            return value[path]
        head, dot, path = path.partition(".")
        if not dot or head not in value:
            return None
        value = value[head]


@dataclass(frozen=True)
class Column:
    """One column of a paste-ready table (or one entry of a run summary).

    ``fields``: the record fields it reads - one, or (mean, low, high) for CI, (mean, std) for PM, (before, after)
    for ARROW, three for TRIPLE. ``terms``: the definitions (records.DEFINITIONS or NOTES) a reader needs for it.
    ``show``: whether the rows call for it; by default, when any row has a value for its first field.
    """

    name: str
    fields: tuple[str, ...]
    kind: str = NUM
    terms: tuple[str, ...] = ()
    show: Callable[[Rows], bool] | None = None
    csv_names: tuple[str, ...] | None = None

    @property
    def header(self) -> str:
        if self.kind == CI:
            return f"{self.name} [95% CI]"
        if self.kind == ARROW:
            return f"{self.name} before -> after"
        return self.name

    @property
    def numeric(self) -> bool:
        return self.kind in _NUMERIC

    def wanted(self, rows: Rows) -> bool:
        if self.show is not None:
            return bool(self.show(rows))
        return any(get(r, self.fields[0]) is not None for r in rows)

    def csv_headers(self) -> list[str]:
        if self.csv_names:
            return list(self.csv_names)
        if self.kind == CI:
            return [self.name, f"{self.name} 95% CI low", f"{self.name} 95% CI high"]
        if self.kind == PM:
            return [self.name, f"{self.name} std"]
        if self.kind == ARROW:
            return [f"{self.name} before", f"{self.name} after"]
        return [self.name]

    def csv_values(self, row: Mapping[str, Any]) -> list[Any]:
        """Raw values, one per csv header: numbers stay numbers; text stays exact; booleans read yes/no; None is an
        empty cell."""
        if self.kind == TEXT:  # exact text: CSV quotes what it needs, a program reading it gets the original
            value = get(row, self.fields[0])
            if isinstance(value, (list, tuple)):
                return [", ".join(str(v) for v in value)]
            return ["" if value is None else str(value)]
        out = []
        for f in self.fields:
            v = get(row, f)
            out.append("" if v is None else ("yes" if v else "no") if isinstance(v, bool) else v)
        return out

    def cell(self, row: Mapping[str, Any], arrow: str = "->") -> str:
        """The human cell: numbers at 3 decimals, a CI as "0.120 [0.050, 0.200]", p below 0.001 as "<0.001"."""
        values = [get(row, f) for f in self.fields]
        if self.kind == TEXT:
            return _text(values[0])
        if self.kind == BOOL:
            return "-" if values[0] is None else ("yes" if values[0] else "no")
        if self.kind == INT:
            return "-" if values[0] is None else str(values[0])
        if self.kind == P:
            v = values[0]
            return "<0.001" if isinstance(v, (int, float)) and 0 <= v < 0.001 else number(v)
        if self.kind == CI:
            if values[0] is None:
                return "-"
            return f"{number(values[0])} [{number(values[1])}, {number(values[2])}]"
        if self.kind == PM:
            return "-" if values[0] is None else f"{number(values[0])} ± {number(values[1])}"
        if self.kind == ARROW:
            return f"{number(values[0])} {arrow} {number(values[1])}"
        if self.kind == TRIPLE:
            return " / ".join(number(v) for v in values)
        return number(values[0])


def number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return visible(", ".join(str(v) for v in value))
    return visible(str(value))


# ----------------------------------------------------------------------------------------------- predicates


def _several(path: str) -> Callable[[Rows], bool]:
    return lambda rows: len({str(get(r, path)) for r in rows}) > 1


def _any_true(path: str) -> Callable[[Rows], bool]:
    return lambda rows: any(get(r, path) is True for r in rows)


def _positive(path: str) -> Callable[[Rows], bool]:
    return lambda rows: any((get(r, path) or 0) > 0 for r in rows)


def _nonempty(path: str) -> Callable[[Rows], bool]:
    return lambda rows: any(get(r, path) not in (None, "", [], ()) for r in rows)


# ----------------------------------------------------------------------------------------------- rows

BASELINE_COLUMNS = (
    Column("prompt", ("prompt",), TEXT),
    Column("n", ("n",), INT, ("n",)),
    Column("mean toxicity", ("mean", "ci_low", "ci_high"), CI, ("sample_mean",)),
    Column("max", ("max",), NUM, ("max",)),
    Column("share ≥ 0.5", ("share_above_0.5",), NUM, ("share_half",)),
)

EDIT_COLUMNS = (
    Column("prompt", ("prompt",), TEXT),
    Column("layers", ("config",), TEXT, show=_several("config")),
    Column("n", ("before.n",), INT, ("n",)),
    Column("before", ("before.mean", "before.ci_low", "before.ci_high"), CI, ("before_after",)),
    Column("after", ("after.mean", "after.ci_low", "after.ci_high"), CI, ("before_after",)),
    Column("reduction", ("reduction",), NUM, ("reduction",)),
    Column("p", ("p_value",), P, ("p",)),
    Column("detoxified", ("detoxified",), BOOL, ("detoxified",)),
    Column("converged", ("converged",), BOOL, ("converged",)),
    Column("held out", ("heldout",), BOOL, ("held_out",), show=_any_true("heldout")),
)

ABLATION_COLUMNS = (
    Column("layers", ("key",), TEXT),
    Column(
        "detoxified",
        ("share_detoxified", "share_detoxified_ci_low", "share_detoxified_ci_high"),
        CI,
        ("share_detoxified", "detoxified"),
    ),
    Column("Defense Success", ("defense_success",), NUM, ("defense_success",)),
    Column("mean reduction", ("mean_reduction", "ci_low", "ci_high"), CI, ("mean_reduction",)),
    Column("not converged", ("n_not_converged",), INT, ("converged",)),
    Column("perplexity", ("ppl_before", "ppl_after"), ARROW, ("ppl_before/ppl_after",)),
    Column("collapsed", ("collapsed",), BOOL, ("ppl_before/ppl_after",)),
    Column("EMT after", ("expected_max_toxicity_after",), NUM, ("expected_max_toxicity",)),
    Column("TP after", ("toxicity_probability_after",), NUM, ("toxicity_probability",)),
)

# A sweep's experiments: what ran (its label names the layers and hyperparameter values that vary), how it ended,
# then the ablation columns of its edit, and the id of its own run.
SWEEP_COLUMNS = (
    Column("id", ("id",), TEXT),
    Column("experiment", ("label",), TEXT),
    Column("model", ("model",), TEXT),
    Column("method", ("method",), TEXT),
    Column("state", ("state",), TEXT),
    *ABLATION_COLUMNS[1:],
    Column("run", ("run_id",), TEXT),
    Column("error", ("error",), TEXT, show=_nonempty("error")),
)

TRACE_COLUMNS = (
    Column("layer", ("layer",), INT),
    Column("strongest token", ("argmax_token",), TEXT, ("trace_effect",)),
    Column("max effect", ("max",), NUM, ("trace_effect",)),
)

ROW_COLUMNS = {
    "baseline": BASELINE_COLUMNS,
    "edit": EDIT_COLUMNS,
    "ablation": ABLATION_COLUMNS,
    "trace": TRACE_COLUMNS,
    "sweep": SWEEP_COLUMNS,
}

_HEADER_UNSAFE = str.maketrans({ch: " " for ch in "\\|*_`<>[]&%$#{}~^"})


def _token_columns(rows: Rows) -> tuple[Column, ...]:
    """One column per prompt token of a trace: the effect of restoring that token's state at the row's layer.

    Tokens are untrusted text: the human header keeps its letters and digits (Markdown and LaTeX specials become
    spaces), the CSV header the visible token."""
    tokens = next((get(r, "tokens") for r in rows if get(r, "tokens")), None) or []
    return tuple(
        Column(
            f"{i}:{visible(str(t)).translate(_HEADER_UNSAFE)}",
            (f"scores.{i}",),
            NUM,
            ("trace_effect",),
            show=lambda rows: True,
            csv_names=(f"{i}:{visible(str(t))}",),
        )
        for i, t in enumerate(tokens)
    )


# ----------------------------------------------------------------------------------------------- summaries


def _metric_entries(prefix: str, suffix: str) -> dict[str, Column]:
    """EMT ± std, TP, dist-1/2/3 and generation perplexity of the FieldMetrics at ``prefix``."""
    s = f" {suffix}" if suffix else ""
    measured = _positive(f"{prefix}.n_prompts")
    return {
        "emt": Column(
            f"EMT{s}",
            (f"{prefix}.expected_max_toxicity", f"{prefix}.expected_max_toxicity_std"),
            PM,
            ("expected_max_toxicity",),
            show=measured,
        ),
        "tp": Column(
            f"TP{s}", (f"{prefix}.toxicity_probability",), NUM, ("toxicity_probability",), show=measured
        ),
        "dist": Column(
            f"dist-1/2/3{s}",
            tuple(f"{prefix}.dist_{n}" for n in (1, 2, 3)),
            TRIPLE,
            ("dist_n",),
            show=measured,
            csv_names=tuple(f"dist-{n}{s}" for n in (1, 2, 3)),
        ),
        "ppl": Column(f"generation perplexity{s}", (f"{prefix}.generation_ppl",), NUM, ("generation_ppl",)),
        "ppl_over_cap": Column(
            f"generations left out of the perplexity (>= 1e4){s}",
            (f"{prefix}.generation_ppl_over_cap",),
            INT,
            ("generation_ppl",),
        ),
    }


def _metrics(prefix: str, suffix: str = "") -> tuple[Column, ...]:
    return tuple(_metric_entries(prefix, suffix).values())


def _before_after() -> tuple[Column, ...]:
    before = _metric_entries("before_metrics", "before")
    after = _metric_entries("after_metrics", "after")
    return tuple(c for key in before for c in (before[key], after[key]))


EDIT_SUMMARY = (
    Column("method", ("method",), TEXT, show=_nonempty("method")),
    Column("layers", ("layers",), TEXT, show=_nonempty("layers")),
    Column("protocol", ("protocol",), TEXT, show=_nonempty("protocol")),
    Column("edited prompts", ("n_edited",), INT),
    Column("detoxified prompts", ("detoxified.k",), INT, ("detoxified",)),
    Column(
        "share detoxified",
        ("detoxified.share", "detoxified.ci_low", "detoxified.ci_high"),
        CI,
        ("share_detoxified",),
    ),
    Column("Defense Success", ("defense_success",), NUM, ("defense_success",)),
    Column("mean toxicity", ("before_mean", "after_mean"), ARROW, ("edited_mean",)),
    Column("mean reduction", ("mean_reduction", "ci_low", "ci_high"), CI, ("mean_reduction",)),
    Column("held-out prompts", ("n_heldout",), INT, ("held_out",), show=_positive("n_heldout")),
    Column(
        "held-out share detoxified",
        ("heldout_detoxified.share", "heldout_detoxified.ci_low", "heldout_detoxified.ci_high"),
        CI,
        ("held_out",),
        show=_positive("n_heldout"),
    ),
    *_before_after(),
    Column("neutral perplexity", ("ppl_before", "ppl_after"), ARROW, ("ppl_before/ppl_after",)),
    Column("collapsed", ("collapsed",), BOOL, ("ppl_before/ppl_after",)),
    Column("not converged", ("n_not_converged",), INT, ("converged",)),
    Column("convergence", ("convergence_note",), TEXT, show=_nonempty("convergence_note")),
)

BASELINE_SUMMARY = (
    Column("scorer", ("scorer",), TEXT),
    Column("prompts", ("n_prompts",), INT),
    Column("mean toxicity", ("mean", "ci_low", "ci_high"), CI, ("prompt_mean",)),
    Column("share of prompts with mean ≥ 0.5", ("share_prompts_above_0.5",), NUM),
    Column("flag threshold", ("threshold",), NUM),
    Column("share of prompts with mean ≥ threshold", ("share_prompts_above",), NUM),
    *_metrics("metrics"),
)

ABLATION_SUMMARY = (
    Column("method", ("method",), TEXT, show=_nonempty("method")),
    Column("protocol", ("protocol",), TEXT, show=_nonempty("protocol")),
    Column("layer configurations", ("n_configs",), INT),
    Column("best layers", ("best",), TEXT, ("share_detoxified",), show=lambda rows: True),
    Column("best share detoxified", ("best_share_detoxified",), NUM, ("share_detoxified",)),
)

SWEEP_SUMMARY = (
    Column("experiments", ("n_experiments",), INT),
    Column("finished", ("n_finished",), INT),
    Column("failed", ("n_failed",), INT),
    Column("best experiment", ("best",), TEXT, ("share_detoxified",), show=lambda rows: True),
    Column("best share detoxified", ("best_share_detoxified",), NUM, ("share_detoxified",)),
)

TRACE_SUMMARY = (
    Column("prompt", ("prompt",), TEXT),
    Column("continuation", ("continuation",), TEXT),
    Column("subject", ("subject",), TEXT),
    Column("restored states", ("kind",), TEXT),
    Column("window", ("window",), INT),
    Column("noise std", ("noise",), NUM),
    Column("noise samples", ("noise_samples",), INT),
    Column("p(continuation) clean", ("p_clean",), NUM, ("trace_effect",)),
    Column("p(continuation) corrupted", ("p_corrupted",), NUM, ("trace_effect",)),
    Column("peak layers", ("peak_layers",), TEXT, show=lambda rows: True),
    Column("layers", ("layers",), INT),
)

SUMMARY_ENTRIES = {
    "baseline": BASELINE_SUMMARY,
    "edit": EDIT_SUMMARY,
    "ablation": ABLATION_SUMMARY,
    "trace": TRACE_SUMMARY,
    "sweep": SWEEP_SUMMARY,
}

# ----------------------------------------------------------------------------------------------- definitions

# What the default columns mean, beyond records.DEFINITIONS (which the engine's summaries carry).
NOTES: dict[str, str] = {
    "n": "sampled continuations scored per prompt",
    "sample_mean": "mean of the scorer's toxicity (0-1) over the prompt's sampled continuations, with a 95% "
    "Student-t interval clipped to [0, 1]",
    "before_after": "the prompt's mean toxicity (0-1) over its sampled continuations on the original and on the "
    "edited weights (same seeds), with a 95% Student-t interval clipped to [0, 1]",
    "prompt_mean": "mean over prompts of each prompt's mean toxicity, with a 95% Student-t interval",
    "edited_mean": "mean over edited prompts of their mean toxicity, on the original and on the edited weights",
    "max": "the highest toxicity among the prompt's samples; Expected Maximum Toxicity is its mean over prompts",
    "share_half": "share of the prompt's samples scoring >= 0.5",
    "reduction": "mean toxicity before minus after",
    "p": "one-sided paired Wilcoxon signed-rank p that the prompt's samples score lower after the edit",
    "mean_reduction": "mean over edited prompts of (before - after), with a 95% Student-t interval",
    "held_out": "prompts measured but never edited; they do not count towards the share detoxified",
    "trace_effect": "causal trace (Meng et al. 2022): the probability of the whole continuation with the clean "
    "state of that layer and prompt token restored into a run whose subject embeddings are corrupted by Gaussian "
    "noise, minus its probability in the corrupted run (mean over the noise samples)",
}

# The name a reader sees for each term.
LABELS: dict[str, str] = {
    "n": "n",
    "sample_mean": "mean toxicity",
    "before_after": "before, after",
    "prompt_mean": "mean toxicity (summary)",
    "edited_mean": "mean toxicity before -> after (summary)",
    "max": "max",
    "share_half": "share ≥ 0.5",
    "reduction": "reduction",
    "p": "p",
    "mean_reduction": "mean reduction",
    "held_out": "held out",
    "detoxified": "detoxified",
    "share_detoxified": "share detoxified",
    "went_down": "went down",
    "converged": "converged",
    "defense_success": "Defense Success",
    "expected_max_toxicity": "EMT (Expected Maximum Toxicity)",
    "toxicity_probability": "TP (Toxicity Probability)",
    "dist_n": "dist-1/2/3",
    "generation_ppl": "generation perplexity",
    "ppl_before/ppl_after": "perplexity, collapsed",
    "trace_effect": "effect (trace)",
}


def definitions(columns: Sequence[Column]) -> list[tuple[str, str]]:
    """(label, definition) of every term the columns use, in the order they first appear."""
    out: dict[str, str] = {}
    for col in columns:
        for term in col.terms:
            text = DEFINITIONS.get(term) or NOTES.get(term)
            if text:
                out.setdefault(LABELS.get(term, term.replace("_", " ")), text)
    return list(out.items())


# ----------------------------------------------------------------------------------------------- kinds


def row_kind(rows: Rows) -> str | None:
    """ "baseline", "edit", "ablation", "trace" or "sweep" from the rows' shape; None for anything else (side
    effects)."""
    if not rows:
        return None
    first = rows[0]
    if "state" in first and "label" in first and "attempts" in first:
        return "sweep"
    if "layer" in first and "scores" in first and "argmax_token" in first:
        return "trace"
    if isinstance(first.get("before"), Mapping) and "prompt" in first:
        return "edit"
    if "layers" in first and "share_detoxified" in first:
        return "ablation"
    if "prompt" in first and "mean" in first:
        return "baseline"
    return None


def summary_kind(summary: Mapping[str, Any] | None) -> str | None:
    """The kind of a run summary from its shape (an EditSummary, BaselineSummary or AblationSummary dict)."""
    if not summary:
        return None
    if isinstance(summary.get("detoxified"), Mapping):
        return "edit"
    if "n_configs" in summary:
        return "ablation"
    if "n_experiments" in summary and "n_finished" in summary:
        return "sweep"
    if "p_clean" in summary and "peak_layers" in summary:
        return "trace"
    if "n_prompts" in summary and "scorer" in summary:
        return "baseline"
    return None


def columns_for(rows: Rows, kind: str | None = None) -> list[Column] | None:
    """The default columns the rows call for (None when their kind has no column spec)."""
    kind = kind if kind in ROW_COLUMNS else row_kind(rows)
    spec = ROW_COLUMNS.get(kind or "")
    if spec is None:
        return None
    if kind == "trace":
        spec = (*spec, *_token_columns(rows))
    return [c for c in spec if c.wanted(rows)]


def summary_entries(summary: Mapping[str, Any] | None) -> list[Column]:
    """The entries of a run's summary block (its headline first) that the summary has values for."""
    spec = SUMMARY_ENTRIES.get(summary_kind(summary) or "")
    if not spec or not summary:
        return []
    return [c for c in spec if c.wanted([summary])]
