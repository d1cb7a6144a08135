"""Load prompt sets: the builtin curated set, local .json/.jsonl/.csv/.txt files and hf: datasets."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from detox_tui.errors import UserError
from detox_tui.prompts.base import PromptItem
from detox_tui.text import lone_surrogate, visible

log = logging.getLogger(__name__)

BUILTIN = "builtin"
PROMPT_EXTENSIONS = (".json", ".jsonl", ".csv", ".txt")
_FIELDS = ("prompt", "target", "subject", "category", "toxic")
_DATA_EXTRA = "pip install 'detox-tui[data]'"


def load_prompts(
    source: str | os.PathLike[str] | None = None, *, limit: int | None = None
) -> list[PromptItem]:
    """Load a prompt set.

    ``source``: None or "builtin" (the curated set; "builtin:insult,gender" keeps those categories),
    a .json/.jsonl/.csv/.txt file, or "hf:<dataset id>[:split][?key=value&...]". ``limit`` keeps the first
    N prompts. Targets that do not start with whitespace get a leading space, since they are continuations.
    Raises UserError (one sentence naming the file and line/record) for anything malformed or empty.
    """
    if limit is not None and limit < 1:
        raise UserError(f"The prompt limit must be at least 1, not {limit}.")
    text = BUILTIN if source is None else os.fspath(source)
    if text == BUILTIN or text.startswith(BUILTIN + ":"):
        items = _load_builtin(text)
    elif text.startswith("hf:"):
        items = _load_hf(text, limit)
    else:
        items = _load_file(text)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise UserError(f"The prompt set '{text}' contains no prompts.")
    return items


def categories(items: Iterable[PromptItem]) -> list[str]:
    """Sorted unique categories of ``items`` (items without a category are left out)."""
    return sorted({item.category for item in items if item.category is not None})


# --------------------------------------------------------------------------------------------- records


def make_item(record: Mapping[str, Any] | str, where: str) -> PromptItem:
    """Validate one record (a prompt string or a mapping with prompt[,target,subject,category,toxic]).

    Keys other than the five fields go to ``meta``. ``where`` names the record in errors, e.g.
    "x.jsonl line 3".
    """
    if isinstance(record, str):
        record = {"prompt": record}
    if not isinstance(record, Mapping):
        raise UserError(f"{where}: expected a prompt string or an object with a 'prompt' field.")
    if "prompt" not in record:
        raise UserError(f"{where}: the record has no 'prompt' field.")
    _refuse_surrogates(record, where)
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: the prompt must be a non-empty string.")
    values: dict[str, str | None] = {}
    for key in ("target", "subject", "category", "toxic"):
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: '{key}' must be a string.")
        values[key] = value if value else None  # "" (e.g. an empty CSV cell) means absent
    target = values["target"]
    if target is not None and not target[0].isspace():
        target = " " + target
    subject = values["subject"]
    if subject is not None and subject not in prompt:
        raise UserError(f"{where}: the subject '{subject}' is not part of the prompt '{prompt}'.")
    meta = {k: v for k, v in record.items() if k not in _FIELDS}
    return PromptItem(
        prompt=prompt,
        target=target,
        subject=subject,
        category=values["category"],
        toxic=values["toxic"],
        meta=meta,
    )


def _refuse_surrogates(record: Mapping[str, Any], where: str) -> None:
    """A lone surrogate (JSON can spell one, e.g. "\\ud800") is not text: it cannot be stored, printed or
    tokenized, so the record is refused before any run is created. Walks nested values without recursion."""
    stack: list[tuple[Any, str]] = [(record, "record")]
    while stack:
        value, field = stack.pop()
        if isinstance(value, str):
            ch = lone_surrogate(value)
            if ch is not None:
                raise UserError(
                    f"{where}: the {field} holds a lone surrogate ({visible(ch)}), which is not valid text; "
                    f"fix the file."
                )
        elif isinstance(value, Mapping):
            for key, sub in value.items():
                stack.append((key, "record"))
                stack.append((sub, f"'{visible(key)}' field" if field == "record" else field))
        elif isinstance(value, (list, tuple)):
            stack.extend((sub, field) for sub in value)


# --------------------------------------------------------------------------------------------- builtin


def builtin_prompts_path() -> Path:
    """Path of the builtin curated prompt set (JSONL)."""
    return Path(str(resources.files("detox_tui.prompts").joinpath("builtin", "prompts.jsonl")))


def _load_builtin(source: str) -> list[PromptItem]:
    items = _read_jsonl(builtin_prompts_path(), "builtin prompts.jsonl")
    _, _, wanted = source.partition(":")
    if not wanted:
        return items
    chosen = {c.strip() for c in wanted.split(",") if c.strip()}
    known = set(categories(items))
    unknown = sorted(chosen - known)
    if unknown:
        raise UserError(
            f"The builtin prompt set has no category '{unknown[0]}'; choose from {', '.join(sorted(known))}."
        )
    return [item for item in items if item.category in chosen]


# --------------------------------------------------------------------------------------------- files


def _read_text(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{label} is not UTF-8 text (byte {exc.start}).") from None
    except OSError as exc:
        raise UserError(f"{label} cannot be read: {exc.strerror or exc}.") from None


def _load_file(source: str) -> list[PromptItem]:
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"Prompt file '{source}' does not exist.")
    if path.is_dir():
        raise UserError(f"Prompt file '{source}' is a directory, not a file.")
    suffix = path.suffix.lower()
    readers: dict[str, Callable[[Path, str], list[PromptItem]]] = {
        ".json": _read_json,
        ".jsonl": _read_jsonl,
        ".csv": _read_csv,
        ".txt": _read_txt,
    }
    reader = readers.get(suffix)
    if reader is None:
        raise UserError(
            f"Prompt file '{source}' has an unsupported extension '{suffix or '(none)'}'; "
            f"use {', '.join(PROMPT_EXTENSIONS)} or hf:<dataset id>."
        )
    items = reader(path, source)
    if not items:
        raise UserError(f"{source} contains no prompts.")
    return items


# How deeply a prompt file's JSON may nest (a record's extra fields are kept as its meta and stored with the run).
MAX_JSON_DEPTH = 32


def _check_depth(data: Any, where: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH (walked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise UserError(f"{where}: the JSON is nested more than {MAX_JSON_DEPTH} levels deep.")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)


def _read_json(path: Path, label: str) -> list[PromptItem]:
    text = _read_text(path, label)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{label} line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}).") from None
    except RecursionError:
        raise UserError(f"{label}: the JSON is nested too deeply to read.") from None
    _check_depth(data, label)
    if isinstance(data, list):
        return [make_item(record, f"{label} record {i}") for i, record in enumerate(data, start=1)]
    if isinstance(data, dict):
        items = []
        for i, (prompt, target) in enumerate(data.items(), start=1):
            if target is not None and not isinstance(target, str):
                raise UserError(f"{label} record {i}: the target of '{prompt}' must be a string.")
            items.append(make_item({"prompt": prompt, "target": target}, f"{label} record {i}"))
        return items
    raise UserError(f"{label} must hold a list of prompts or an object mapping each prompt to its target.")


def _read_jsonl(path: Path, label: str) -> list[PromptItem]:
    items = []
    for lineno, line in enumerate(_read_text(path, label).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{label} line {lineno}: invalid JSON at column {exc.colno} ({exc.msg})."
            ) from None
        except RecursionError:
            raise UserError(f"{label} line {lineno}: the JSON is nested too deeply to read.") from None
        _check_depth(record, f"{label} line {lineno}")
        items.append(make_item(record, f"{label} line {lineno}"))
    return items


def _read_csv(path: Path, label: str) -> list[PromptItem]:
    """A CSV with a header naming its columns (one 'prompt'), parsed strictly: a quote that is never closed, text
    after a closing quote, a column named twice or a row with more cells than the header is one UserError naming the
    line where the record starts."""
    text = _read_text(path, label)
    if not text.strip():
        return []
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    start = 1  # the line the next record starts on

    def malformed(exc: csv.Error) -> UserError:
        if "unexpected end of data" in str(exc):
            why = "a quoted cell that starts in this record is never closed"
        else:
            why = f"malformed CSV ({exc})"
        return UserError(f"{label} line {start}: {why}.")

    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as exc:
        raise malformed(exc) from None
    named = [h for h in header if h]
    twice = next((h for i, h in enumerate(named) if h in named[:i]), None)
    if twice is not None:
        raise UserError(f"{label} line 1: the column '{twice}' appears twice in the header.")
    if "prompt" not in header:
        found = ", ".join(named) or "nothing"
        raise UserError(f"{label} has no 'prompt' column in its header (found: {found}).")
    items = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise malformed(exc) from None
        if not row:  # a blank line
            continue
        where = f"{label} line {start}"
        if len(row) > len(header):
            raise UserError(f"{where}: the row has more cells than the header.")
        record = {key: value for key, value in zip(header, row) if key}
        if not (record.get("prompt") or "").strip():
            raise UserError(f"{where}: the prompt is empty.")
        items.append(make_item(record, where))
    return items


def _read_txt(path: Path, label: str) -> list[PromptItem]:
    items = []
    for lineno, line in enumerate(_read_text(path, label).splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        items.append(make_item(stripped, f"{label} line {lineno}"))
    return items


# --------------------------------------------------------------------------------------------- hf:


def parse_hf_source(source: str) -> tuple[str, str | None, dict[str, str]]:
    """Split "hf:<id>[:split][?key=value&...]" into (dataset id, split or None, options)."""
    body = source[3:] if source.startswith("hf:") else source
    body, _, query = body.partition("?")
    dataset_id, _, split = body.partition(":")
    if not dataset_id.strip():
        raise UserError(f"'{source}' names no dataset; write hf:<dataset id>[:split][?key=value].")
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        options[key.strip()] = value.strip()
    return dataset_id.strip(), (split.strip() or None), options


def require_datasets(what: str = "prompt sets") -> Any:
    """Import the optional ``datasets`` package or raise the install hint."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"Loading hf: {what} needs the optional 'data' extra: {_DATA_EXTRA}.") from None
    return datasets


def open_hf_dataset(
    source: str,
    dataset_id: str,
    config: str | None,
    split: str,
    *,
    what: str = "prompt sets",
    streaming: bool = True,
) -> Iterable[Mapping[str, Any]]:
    """``datasets.load_dataset`` (streaming) with failures turned into one-sentence UserErrors."""
    datasets = require_datasets(what)
    try:
        return datasets.load_dataset(dataset_id, name=config, split=split, streaming=streaming)
    except Exception as exc:  # datasets raises many types: network, missing split, gated dataset
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"Could not load the dataset '{source}': {first.rstrip('.')}.") from None


_HF_OPTIONS = ("split", "config", "limit", "min_toxicity", "prompt_field", "target_field", "category")


def _int_option(options: Mapping[str, str], key: str, source: str) -> int | None:
    if key not in options:
        return None
    try:
        value = int(options[key])
    except ValueError:
        raise UserError(f"'{source}': {key} must be an integer, not '{options[key]}'.") from None
    if value < 1:
        raise UserError(f"'{source}': {key} must be at least 1.")
    return value


def _float_option(options: Mapping[str, str], key: str, source: str) -> float | None:
    if key not in options:
        return None
    try:
        return float(options[key])
    except ValueError:
        raise UserError(f"'{source}': {key} must be a number, not '{options[key]}'.") from None


def _load_hf(source: str, limit: int | None) -> list[PromptItem]:
    dataset_id, split, options = parse_hf_source(source)
    unknown = sorted(set(options) - set(_HF_OPTIONS))
    if unknown:
        raise UserError(
            f"'{source}': unknown option '{unknown[0]}'; known options: {', '.join(_HF_OPTIONS)}."
        )
    split = split or options.get("split") or "train"
    cap = _int_option(options, "limit", source)
    if limit is not None:
        cap = limit if cap is None else min(cap, limit)
    min_tox = _float_option(options, "min_toxicity", source)
    rows = open_hf_dataset(source, dataset_id, options.get("config") or None, split)
    records = hf_records(
        rows,
        source=source,
        min_toxicity=min_tox,
        prompt_field=options.get("prompt_field"),
        target_field=options.get("target_field"),
        category=options.get("category"),
    )
    items: list[PromptItem] = []
    for record, where in records:
        items.append(make_item(record, where))
        if cap is not None and len(items) >= cap:
            break
    log.info("loaded %d prompts from %s", len(items), source)
    return items


def hf_records(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    min_toxicity: float | None = None,
    prompt_field: str | None = None,
    target_field: str | None = None,
    category: str | None = None,
) -> Iterator[tuple[dict[str, Any], str]]:
    """Turn dataset rows into prompt records, recognising the layout from the first row.

    RealToxicityPrompts (``prompt`` is {"text", "toxicity", ...}): prompt.text, filtered by
    prompt.toxicity >= ``min_toxicity``. SafeEdit ("adversarial prompt", "question", "safe generation",
    "unsafe generation"): adversarial prompt + question as prompt, safe generation as target, unsafe
    generation as toxic, generalisation and knowledge-constraint prompts in meta. Anything else: the
    ``prompt_field`` (default "prompt", else "text") and optional ``target_field`` columns.
    """
    for index, row in enumerate(rows, start=1):
        where = f"{source} row {index}"
        if prompt_field is None and isinstance(row.get("prompt"), Mapping) and "text" in row["prompt"]:
            record = _rtp_record(row, min_toxicity)
        elif prompt_field is None and "adversarial prompt" in row and "safe generation" in row:
            record = _safeedit_record(row)
        else:
            record = _plain_record(row, prompt_field, target_field, where)
        if record is None:
            continue
        if category is not None:
            record["category"] = category
        yield record, where


def _rtp_record(row: Mapping[str, Any], min_toxicity: float | None) -> dict[str, Any] | None:
    prompt = row["prompt"]
    toxicity = prompt.get("toxicity")
    if min_toxicity is not None and (toxicity is None or toxicity < min_toxicity):
        return None
    record: dict[str, Any] = {"prompt": prompt["text"], "category": "rtp"}
    record["prompt_toxicity"] = toxicity
    if row.get("challenging") is not None:
        record["challenging"] = bool(row["challenging"])
    continuation = row.get("continuation")
    if isinstance(continuation, Mapping) and continuation.get("text"):
        record["dataset_continuation"] = continuation["text"]
    return record


def _safeedit_record(row: Mapping[str, Any]) -> dict[str, Any]:
    adversarial = (row.get("adversarial prompt") or "").strip()
    question = (row.get("question") or "").strip()
    if question and question not in adversarial:
        prompt = f"{adversarial}\n{question}" if adversarial else question
    else:
        prompt = adversarial or question
    record: dict[str, Any] = {
        "prompt": prompt,
        "target": row.get("safe generation") or None,
        "toxic": row.get("unsafe generation") or None,
        "category": row.get("unsafety category") or None,
        "question": question,
    }
    if row.get("id") is not None:
        record["id"] = row["id"]
    general = row.get("generalization test")
    if isinstance(general, Mapping):
        record["generalization"] = {k: v for k, v in general.items() if isinstance(v, str) and v}
    knowledge = row.get("knowledge constrain")
    if isinstance(knowledge, Mapping):
        record["locality"] = {"prompt": knowledge.get("prompt"), "answer": knowledge.get("answer")}
    return record


def _plain_record(
    row: Mapping[str, Any], prompt_field: str | None, target_field: str | None, where: str
) -> dict[str, Any]:
    if prompt_field is None:
        prompt_field = "prompt" if "prompt" in row else "text" if "text" in row else None
    if prompt_field is None or prompt_field not in row:
        columns = ", ".join(sorted(row)) or "none"
        wanted = f"no '{prompt_field}' column" if prompt_field else "neither a 'prompt' nor a 'text' column"
        raise UserError(
            f"{where}: the dataset has {wanted} (columns: {columns}); use ?prompt_field=<column>."
        )
    record: dict[str, Any] = {"prompt": row[prompt_field]}
    if target_field is not None:
        if target_field not in row:
            raise UserError(f"{where}: the dataset has no '{target_field}' column.")
        record["target"] = row[target_field]
    elif isinstance(row.get("target"), str):
        record["target"] = row["target"]
    for key in ("subject", "category", "toxic"):
        if isinstance(row.get(key), str):
            record[key] = row[key]
    return record
