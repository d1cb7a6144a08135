"""Result rows (plain dicts) and their export to CSV, JSON, JSON Lines and Markdown; no UI here."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detox_tui.errors import UserError
from detox_tui.pipeline.generation import PromptGenerations
from detox_tui.pipeline.metrics import summarize
from detox_tui.pipeline.records import DEFINITIONS, BaselineRow, Record
from detox_tui.prompts.base import PromptItem

FORMATS = ("csv", "json", "md", "jsonl")
_SUFFIXES = {".csv": "csv", ".json": "json", ".md": "md", ".markdown": "md", ".jsonl": "jsonl"}


def baseline_row(
    idx: int,
    item: PromptItem,
    gens: PromptGenerations,
    scores: Mapping[str, np.ndarray],
    primary: str,
    threshold: float,
) -> BaselineRow:
    """One prompt's row: the primary attribute's summary of its sampled continuations, every attribute's summary.

    ``scores`` hold one value per text in the order samples..., greedy (when there is one). The greedy
    continuation is reported apart (``greedy_score``) and only summarised when it is all there is.
    """
    k = len(gens.samples)
    has_greedy = gens.greedy is not None

    def sampled(values: Any) -> np.ndarray:
        v = np.asarray(values, dtype=float).ravel()
        return v[:k] if k else v

    if primary not in scores:
        raise ValueError(f"the scores have no '{primary}' attribute (got {sorted(scores)})")
    primary_values = np.asarray(scores[primary], dtype=float).ravel()
    greedy_score = float(primary_values[k]) if has_greedy and primary_values.size > k else None
    main = sampled(primary_values)
    return BaselineRow.from_dict(
        {
            "idx": int(idx),
            "prompt": item.prompt,
            "category": item.category,
            "target": item.target,
            **summarize(main, threshold),
            "greedy_score": greedy_score,
            "attributes": {attr: summarize(sampled(v), threshold) for attr, v in scores.items()},
            "samples": [float(x) for x in main],
            "generations": list(gens.samples) if k else ([gens.greedy] if has_greedy else []),
            "greedy": gens.greedy,
        }
    )


def _flatten_into(out: dict[str, Any], prefix: str, value: Any) -> None:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten_into(out, f"{prefix}_{key}" if prefix else str(key), sub)
    elif isinstance(value, (list, tuple, np.ndarray)):
        return
    else:
        out[prefix] = value


def _as_dict(row: Any) -> Mapping[str, Any]:
    return row.to_dict() if isinstance(row, Record) else row


def flatten_row(row: Mapping[str, Any] | Record) -> dict[str, Any]:
    """Nested dicts become prefixed scalar columns ("before_mean", "attr_insult_mean"); lists are dropped."""
    row = _as_dict(row)
    out: dict[str, Any] = {}
    for key, value in row.items():
        _flatten_into(out, "attr" if key == "attributes" else str(key), value)
    return {k: _scalar(v) for k, v in out.items()}


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def jsonable(value: Any) -> Any:
    """A strictly JSON-serialisable copy: numpy -> Python, tuples -> lists, NaN/inf -> None, Paths -> str."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # torch tensors
        return jsonable(value.tolist())
    return value


def _columns(flat_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in flat_rows:
        for k in r:
            cols.setdefault(k, None)
    return list(cols)


def _md_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def rows_to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub-flavoured Markdown table of the rows' flattened scalar columns (floats at 3 decimals)."""
    flat = [flatten_row(r) for r in rows]
    cols = _columns(flat)
    if not cols:
        return ""
    lines = [
        "| " + " | ".join(_md_cell(c) for c in cols) + " |",
        "| " + " | ".join("---" for _ in cols) + " |",
    ]
    for r in flat:
        lines.append("| " + " | ".join(_md_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def rows_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    flat = [flatten_row(r) for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(flat), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in flat:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def format_from_path(path: str | os.PathLike) -> str:
    """The export format a file name asks for (.csv, .json, .md/.markdown, .jsonl); a UserError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    what = f"'{suffix}'" if suffix else "no extension"
    raise UserError(
        f"Cannot tell the export format of '{path}' ({what}); use a .csv, .json, .md or .jsonl file."
    )


def render_rows(rows: Sequence[Mapping[str, Any]], fmt: str, meta: Mapping[str, Any] | None = None) -> str:
    """The text ``export_rows`` writes; JSON and Markdown carry the metrics' definitions."""
    rows = [_as_dict(r) for r in rows]
    if fmt == "json":
        meta = {**(meta or {}), "definitions": DEFINITIONS}
        return (
            json.dumps(jsonable({"meta": meta or {}, "rows": list(rows)}), indent=2, allow_nan=False) + "\n"
        )
    if fmt == "jsonl":
        return "".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in rows)
    if fmt == "csv":
        return rows_to_csv(rows)
    if fmt == "md":
        used = {c for r in rows for c in flatten_row(r)}
        notes = [f"- **{k}**: {v}" for k, v in DEFINITIONS.items() if _mentions(used, k)]
        return rows_to_markdown(rows) + ("\nDefinitions:\n\n" + "\n".join(notes) + "\n" if notes else "")
    raise UserError(f"Unknown export format '{fmt}'; use csv, json, md or jsonl.")


def _mentions(columns: set[str], key: str) -> bool:
    stems = [part.replace("_n", "_") for part in key.split("/")]
    return any(stem in column for column in columns for stem in stems)


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, so a crash never leaves half a file."""
    target = Path(path).expanduser()
    if target.exists() and not overwrite:
        raise UserError(f"Cannot write '{target}': the file already exists.")
    if target.is_dir():
        raise UserError(f"Cannot write '{target}': it is a folder.")
    parent = target.parent
    if not parent.is_dir():
        raise UserError(f"Cannot write '{target}': the folder '{parent}' does not exist.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise UserError(f"Cannot write '{target}': {exc.strerror or exc}.") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"Cannot write '{target}': {exc.strerror or exc}.") from exc
    return target


def export_rows(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    fmt: str,
    *,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write result rows as csv (flattened), json ({"meta", "rows"}, full nesting), md (table) or jsonl."""
    if fmt not in FORMATS:
        raise UserError(f"Unknown export format '{fmt}'; use csv, json, md or jsonl.")
    return write_text_atomic(path, render_rows(rows, fmt, meta), overwrite=overwrite)
