"""Result rows (plain dicts) and their export to CSV, JSON, JSON Lines, Markdown and LaTeX; no UI here.

By default the csv, md and tex exports hold the columns a reader needs under human names
(``detox_tui.pipeline.tables``) followed by the run's summary (Markdown and LaTeX: a second table; CSV: a
``<name>.summary.csv`` sidecar); ``columns="all"`` gives every flattened field under its internal name. JSON keeps
everything. This module imports neither numpy nor torch at import time: listing and exporting runs stays light.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detox_tui.errors import UserError
from detox_tui.pipeline.records import DEFINITIONS, BaselineRow, Record
from detox_tui.pipeline.tables import (
    COLUMN_CHOICES,
    Column,
    columns_for,
    definitions,
    summary_entries,
)
from detox_tui.text import visible

if TYPE_CHECKING:
    import numpy as np

    from detox_tui.pipeline.generation import PromptGenerations
    from detox_tui.prompts.base import PromptItem

FORMATS = ("csv", "json", "md", "tex", "jsonl")
_SUFFIXES = {
    ".csv": "csv",
    ".json": "json",
    ".md": "md",
    ".markdown": "md",
    ".tex": "tex",
    ".jsonl": "jsonl",
}
_FORMAT_LIST = "csv, json, md, tex or jsonl"


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
    import numpy as np

    from detox_tui.pipeline.metrics import summarize

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


# ------------------------------------------------------------------------------------------ plain values


def _numpy_scalar(value: Any) -> bool:
    np = sys.modules.get("numpy")  # no numpy loaded: no numpy values to convert
    return np is not None and isinstance(value, np.generic)


def _numpy_array(value: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


def _flatten_into(out: dict[str, Any], prefix: str, value: Any) -> None:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten_into(out, f"{prefix}_{key}" if prefix else str(key), sub)
    elif isinstance(value, (list, tuple)) or _numpy_array(value):
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
    return value.item() if _numpy_scalar(value) else value


def jsonable(value: Any) -> Any:
    """A strictly JSON-serialisable copy: numpy -> Python, tuples -> lists, NaN/inf -> None, Paths -> str."""
    if isinstance(value, Record):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if _numpy_array(value):
        return [jsonable(v) for v in value.tolist()]
    if _numpy_scalar(value):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # torch tensors
        return jsonable(value.tolist())
    return value


# ------------------------------------------------------------------------------------------ every column


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
    return _md_text(str(value))


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


# ------------------------------------------------------------------------------------------ table model


class _Table:
    """Headers, alignment and cells of one table, ready for Markdown or LaTeX; csv headers and raw values."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[Column] | None) -> None:
        self.columns = list(columns) if columns is not None else None
        if self.columns is not None:
            self.headers = [c.header for c in self.columns]
            self.numeric = [c.numeric for c in self.columns]
            self.cells = [[(c, r) for c in self.columns] for r in rows]
            self.csv_headers = [h for c in self.columns for h in c.csv_headers()]
            self.csv_rows = [[v for c in self.columns for v in c.csv_values(r)] for r in rows]
        else:  # every flattened column, internal names
            flat = [flatten_row(r) for r in rows]
            names = _columns(flat)
            self.headers = names
            self.numeric = [
                all(isinstance(r.get(n), (int, float)) and not isinstance(r.get(n), bool) for r in flat)
                for n in names
            ]
            self.cells = [[r.get(n) for n in names] for r in flat]
            self.csv_headers = names
            self.csv_rows = [["" if r.get(n) is None else r.get(n) for n in names] for r in flat]

    @staticmethod
    def text(cell: Any, arrow: str) -> str:
        if isinstance(cell, tuple):
            col, row = cell
            return col.cell(row, arrow=arrow)
        if cell is None:
            return ""
        if isinstance(cell, bool):
            return "yes" if cell else "no"
        if isinstance(cell, float):
            return "nan" if math.isnan(cell) else f"{cell:.3f}"
        return visible(str(cell))

    @staticmethod
    def is_text_cell(cell: Any) -> bool:
        """Untrusted text (prompts...) that Markdown must escape; formatted numbers are left alone."""
        if isinstance(cell, tuple):
            return cell[0].kind == "text"
        return isinstance(cell, str)


def _summary_table(
    summary: Mapping[str, Any] | None, columns: str
) -> tuple[list[tuple[str, Any]], list[Column]]:
    """The summary block as (label, cell) pairs, and the entries used (for their definitions)."""
    if not summary:
        return [], []
    if columns == "all":
        return [(k, v) for k, v in flatten_row(summary).items()], []
    entries = summary_entries(summary)
    return [(c.header, (c, summary)) for c in entries], entries


def _summary_csv_rows(summary: Mapping[str, Any] | None, columns: str) -> list[list[Any]]:
    if not summary:
        return []
    if columns == "all":
        return [[k, "" if v is None else v] for k, v in flatten_row(summary).items()]
    out = []
    for c in summary_entries(summary):
        out.extend([h, v] for h, v in zip(c.csv_headers(), c.csv_values(summary), strict=True))
    return out


# ------------------------------------------------------------------------------------------ Markdown

# Characters Markdown (CommonMark and GitHub's tables, strikethrough and math) would act on, each escaped with a
# backslash; controls, bidi and newlines become visible escapes first, so a cell stays one line of the table.
_MD_SPECIAL = str.maketrans({ch: "\\" + ch for ch in "\\|*_`<>[]~&$#"})


def _md_text(text: str) -> str:
    """Untrusted text safe inside a Markdown table cell: it shows literally and cannot end the cell or row."""
    return visible(text).translate(_MD_SPECIAL)


def _md_table(headers: Sequence[str], numeric: Sequence[bool], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(visible(h).replace("|", "\\|") for h in headers) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _markdown(rows, summary, columns: str, cols: list[Column] | None) -> str:
    if cols is None:  # every column, as rows_to_markdown writes them
        lines = rows_to_markdown(rows).splitlines()
    else:
        table = _Table(rows, cols)
        cells = [
            [_md_text(table.text(c, "->")) if table.is_text_cell(c) else table.text(c, "->") for c in r]
            for r in table.cells
        ]
        lines = _md_table(table.headers, table.numeric, cells)
    pairs, entries = _summary_table(summary, columns)
    if pairs:
        values = [
            _md_text(_Table.text(v, "->")) if _Table.is_text_cell(v) else _Table.text(v, "->")
            for _, v in pairs
        ]
        lines += ["", "Summary:", ""]
        lines += _md_table(
            ["measure", "value"],
            [False, False],
            [[visible(k).replace("|", "\\|"), v] for (k, _), v in zip(pairs, values, strict=True)],
        )
    notes = _notes(rows, cols, entries, columns)
    if notes:
        lines += ["", "Definitions:", ""] + [f"- **{label}**: {text}" for label, text in notes]
    return "\n".join(lines) + "\n" if lines else ""


def _notes(rows, cols, entries, columns: str) -> list[tuple[str, str]]:
    if columns == "all" or cols is None:
        used = {c for r in rows for c in flatten_row(r)}
        return [(k, v) for k, v in DEFINITIONS.items() if _mentions(used, k)]
    return definitions([*cols, *entries])


def _mentions(columns: set[str], key: str) -> bool:
    stems = [part.replace("_n", "_") for part in key.split("/")]
    return any(stem in column for column in columns for stem in stems)


# ------------------------------------------------------------------------------------------ LaTeX

_TEX = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
    "|": r"\textbar{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "≥": r"$\geq$",
    "≤": r"$\leq$",
    "±": r"$\pm$",
    "→": r"$\rightarrow$",
}
_TEX_TABLE = str.maketrans(_TEX)


def tex_escape(text: str) -> str:
    """Text safe inside a LaTeX tabular cell: the special characters & % $ # _ { } ~ ^ \\ < > | escaped,
    controls and newlines shown as visible escapes. A cell that starts with "[" gets "{}" first: after a row's
    ``\\\\`` (or booktabs' rules) a "[" would be read as an optional argument."""
    out = visible(text).translate(_TEX_TABLE)
    return "{}" + out if out.startswith("[") else out


def _tex_table(headers: Sequence[str], numeric: Sequence[bool], rows: Sequence[Sequence[str]]) -> list[str]:
    spec = "".join("r" if n else "l" for n in numeric)
    lines = [
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(tex_escape(h.replace(" -> ", " → ")) for h in headers) + r" \\",
    ]
    lines.append("\\midrule")
    lines += [" & ".join(r) + r" \\" for r in rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return lines


def _latex(rows, summary, columns: str, cols: list[Column] | None) -> str:
    table = _Table(rows, cols)
    lines = ["% detox-tui export; needs \\usepackage{booktabs}"]
    if table.headers:
        cells = [[tex_escape(table.text(c, "→")) for c in r] for r in table.cells]
        lines += _tex_table(table.headers, table.numeric, cells)
    pairs, entries = _summary_table(summary, columns)
    if pairs:
        lines += ["", "\\medskip", ""]
        lines += _tex_table(
            ["measure", "value"],
            [False, False],
            [[tex_escape(k.replace(" -> ", " → ")), tex_escape(_Table.text(v, "→"))] for k, v in pairs],
        )
    notes = _notes(rows, cols, entries, columns)
    if notes:
        lines += ["", "% Definitions:"] + [f"% {visible(label)}: {visible(text)}" for label, text in notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ formats


def suffix_format(path: str | os.PathLike) -> str | None:
    """The export format a file's extension names (.csv, .json, .md/.markdown, .tex, .jsonl), else None."""
    return _SUFFIXES.get(Path(path).suffix.lower())


def format_from_path(path: str | os.PathLike) -> str:
    """The export format a file name asks for; a UserError when its extension names none."""
    fmt = suffix_format(path)
    if fmt is not None:
        return fmt
    suffix = Path(path).suffix
    what = f"'{suffix}'" if suffix else "no extension"
    raise UserError(
        f"Cannot tell the export format of '{path}' ({what}); use a .csv, .json, .md, .tex or .jsonl file."
    )


def resolve_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The format to write ``path`` in: ``fmt`` when given (refused when the extension names another one),
    else the one the extension names (a UserError when it names none)."""
    if fmt is None or fmt == "":
        return format_from_path(path)
    check_format(fmt)
    named = suffix_format(path)
    if named is not None and named != fmt:
        raise UserError(
            f"The format {fmt} clashes with the file name '{Path(path).name}' (a .{named} file); "
            f"change the extension or the format."
        )
    return fmt


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f"Unknown export format '{fmt}'; use {_FORMAT_LIST}.")
    return fmt


def check_columns(columns: str) -> str:
    if columns not in COLUMN_CHOICES:
        raise UserError(f"Unknown columns choice '{columns}'; use default or all.")
    return columns


def summary_path(path: str | os.PathLike) -> Path:
    """Where a CSV export's summary goes: ``table.csv`` -> ``table.summary.csv``."""
    p = Path(path).expanduser()
    stem = p.stem if p.suffix.lower() == ".csv" else p.name
    return p.with_name(f"{stem}.summary.csv")


def export_file_name(stem: str, fmt: str) -> str:
    """A default export file name ``<stem>.<fmt>`` built from names the user did not type (a run id, a kind).

    Only letters, digits, ``.``, ``_`` and ``-`` are kept (anything else becomes ``_``) and leading dots and dashes
    are dropped, so the name is one plain file in the current folder: never a path elsewhere, a hidden file or an
    option.
    """
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "_" for c in stem)
    safe = safe.lstrip(".-")[:120] or "export"
    return f"{safe}.{check_format(fmt)}"


def _csv_text(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    return buf.getvalue()


def render_rows(
    rows: Sequence[Mapping[str, Any] | Record],
    fmt: str,
    meta: Mapping[str, Any] | None = None,
    *,
    columns: str = "default",
    kind: str | None = None,
) -> str:
    """The main file's text ``export_rows`` writes; JSON, Markdown and LaTeX carry the metrics' definitions.

    ``meta["summary"]`` (the run's summary) becomes Markdown's and LaTeX's second table and JSON's ``summary``.
    """
    check_format(fmt)
    check_columns(columns)
    rows = [_as_dict(r) for r in rows]
    summary = _as_dict((meta or {}).get("summary")) or None
    if fmt == "json":
        full = {**(meta or {}), "definitions": DEFINITIONS}
        data = {"meta": full, "summary": summary or {}, "rows": list(rows)}
        return json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in rows)
    cols = None if columns == "all" else columns_for(rows, kind)
    if fmt == "csv":
        if cols is None:
            return rows_to_csv(rows)
        table = _Table(rows, cols)
        return _csv_text(table.csv_headers, table.csv_rows)
    if fmt == "md":
        return _markdown(rows, summary, columns, cols)
    return _latex(rows, summary, columns, cols)


def render_files(
    rows: Sequence[Mapping[str, Any] | Record],
    path: str | os.PathLike,
    fmt: str,
    meta: Mapping[str, Any] | None = None,
    *,
    columns: str = "default",
    kind: str | None = None,
) -> list[tuple[Path, str]]:
    """Every file an export writes and its text: the table, and for CSV the run summary's sidecar."""
    out = [(Path(path).expanduser(), render_rows(rows, fmt, meta, columns=columns, kind=kind))]
    if fmt == "csv":
        summary_rows = _summary_csv_rows(_as_dict((meta or {}).get("summary")) or None, columns)
        if summary_rows:
            out.append((summary_path(path), _csv_text(["key", "value"], summary_rows)))
    return out


# ------------------------------------------------------------------------------------------ writing


class FileExists(UserError):
    """A file to write exists and overwriting was not allowed; ``path`` names it (a front end says how to allow it)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"Cannot write '{path}': the file already exists.")
        self.path = path


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise FileExists(target)
    if target.is_dir():
        raise UserError(f"Cannot write '{target}': it is a folder.")
    if not target.parent.is_dir():
        raise UserError(f"Cannot write '{target}': the folder '{target.parent}' does not exist.")


def _temp_file(target: Path) -> tuple[int, Path]:
    """A new file beside ``target``, created with mode 0o666 so the kernel applies the user's umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, so a crash never leaves half a file.

    A new file gets the mode the user's umask gives (0o666 & ~umask, as ``open`` would); an overwritten file keeps
    its mode.
    """
    target = Path(path).expanduser()
    _check_target(target, overwrite)
    try:
        fd, tmp = _temp_file(target)
    except OSError as exc:
        raise UserError(f"Cannot write '{target}': {exc.strerror or exc}.") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        try:
            mode = stat.S_IMODE(target.stat().st_mode)
        except FileNotFoundError:
            mode = None
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"Cannot write '{target}': {exc.strerror or exc}.") from exc
    return target


def export_files(
    rows: Sequence[Mapping[str, Any] | Record],
    path: str | os.PathLike,
    fmt: str | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    columns: str = "default",
    kind: str | None = None,
) -> list[Path]:
    """Write result rows and return every file written (the table first, then a CSV export's summary sidecar).

    ``fmt``: csv, md, tex (the columns a reader needs, or every flattened one with ``columns="all"``, and the
    run summary from ``meta["summary"]``), json ({"meta", "summary", "rows"}, full nesting) or jsonl (one row a
    line); None takes it from the extension. Nothing is written when any of the files cannot be.
    """
    fmt = resolve_format(path, fmt)
    files = render_files(rows, path, fmt, meta, columns=columns, kind=kind)
    for target, _ in files:
        _check_target(target, overwrite)
    return [write_text_atomic(target, text, overwrite=overwrite) for target, text in files]


def export_rows(
    rows: Sequence[Mapping[str, Any] | Record],
    path: str | os.PathLike,
    fmt: str | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    columns: str = "default",
    kind: str | None = None,
) -> Path:
    """``export_files``, returning the table's path."""
    return export_files(rows, path, fmt, meta=meta, overwrite=overwrite, columns=columns, kind=kind)[0]
