"""Neutral text corpora (covariance statistics, perplexity) and neutral prompt lists (side effects)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from detox_tui.errors import UserError
from detox_tui.prompts.loaders import open_hf_dataset, parse_hf_source

log = logging.getLogger(__name__)

BUILTIN = "builtin"
CORPUS_EXTENSIONS = (".txt", ".md")
# Without max_docs, an hf: corpus stops after this many documents (streamed, never fully downloaded).
DEFAULT_HF_MAX_DOCS = 5000

# Known hf: corpora and the config/split/column they need.
HF_CORPORA: dict[str, dict[str, str]] = {
    "Salesforce/wikitext": {"config": "wikitext-103-raw-v1", "split": "train", "field": "text"},
    "wikitext": {"config": "wikitext-103-raw-v1", "split": "train", "field": "text"},
    "wikimedia/wikipedia": {"config": "20231101.en", "split": "train", "field": "text"},
}
_HF_OPTIONS = ("config", "split", "field", "limit", "min_chars")
_WIKITEXT_HEADING = re.compile(r"^\s*=+ .* =+\s*$")


def builtin_data_path(name: str) -> Path:
    """Path of a file shipped in detox_tui/data (neutral.txt, neutral_prompts.txt, ...)."""
    return Path(str(resources.files("detox_tui.data").joinpath(name)))


def load_corpus(source: str | os.PathLike[str] = BUILTIN, *, max_docs: int | None = None) -> list[str]:
    """Neutral documents for covariance statistics and perplexity.

    "builtin": the lines of detox_tui/data/neutral.txt; a local .txt/.md file: its paragraphs (separated by
    blank lines), or its lines when it has no blank lines; "hf:<dataset id>[:split][?config=&field=&limit=]":
    a streamed dataset's ``text`` column (Salesforce/wikitext and wikimedia/wikipedia get their usual config;
    empty lines and wikitext headings are skipped; at most ``DEFAULT_HF_MAX_DOCS`` documents unless
    ``max_docs`` says otherwise). ``max_docs`` keeps the first N documents.
    """
    if max_docs is not None and max_docs < 1:
        raise UserError(f"The corpus document limit must be at least 1, not {max_docs}.")
    text = os.fspath(source)
    if text == BUILTIN:
        docs = _lines(_read(builtin_data_path("neutral.txt"), "builtin neutral.txt"))
    elif text.startswith("hf:"):
        docs = _load_hf_corpus(text, max_docs)
    else:
        path = _local_file(text, "Corpus", CORPUS_EXTENSIONS)
        docs = _paragraphs(_read(path, text))
    if max_docs is not None:
        docs = docs[:max_docs]
    if not docs:
        raise UserError(f"The corpus '{text}' contains no text.")
    return docs


def load_neutral_prompts(source: str | os.PathLike[str] = BUILTIN) -> list[str]:
    """Neutral prompts for side-effect generations: "builtin" or a .txt file, one prompt per line.

    Blank lines and lines starting with # are skipped.
    """
    text = os.fspath(source)
    if text == BUILTIN:
        prompts = _lines(_read(builtin_data_path("neutral_prompts.txt"), "builtin neutral_prompts.txt"))
    else:
        path = _local_file(text, "Neutral prompt file", (".txt",))
        prompts = _lines(_read(path, text))
    if not prompts:
        raise UserError(f"{text} contains no prompts.")
    return prompts


# --------------------------------------------------------------------------------------------- helpers


def _local_file(source: str, kind: str, extensions: tuple[str, ...]) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{kind} '{source}' does not exist.")
    if path.is_dir():
        raise UserError(f"{kind} '{source}' is a directory, not a file.")
    if path.suffix.lower() not in extensions:
        shown = path.suffix or "(none)"
        raise UserError(
            f"{kind} '{source}' has an unsupported extension '{shown}'; use {', '.join(extensions)}."
        )
    return path


def _read(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{label} is not UTF-8 text (byte {exc.start}).") from None
    except OSError as exc:
        raise UserError(f"{label} cannot be read: {exc.strerror or exc}.") from None


def _lines(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            out.append(stripped)
    return out


def _paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines; the non-empty lines when there is no blank separator."""
    blocks = [block.strip() for block in re.split(r"\n[ \t]*\n", text.strip().replace("\r\n", "\n"))]
    blocks = [block for block in blocks if block]
    if len(blocks) > 1:
        return ["\n".join(line.strip() for line in block.splitlines()) for block in blocks]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _int_option(options: Mapping[str, str], key: str, source: str) -> int | None:
    if key not in options:
        return None
    try:
        value = int(options[key])
    except ValueError:
        raise UserError(f"'{source}': {key} must be an integer, not '{options[key]}'.") from None
    if value < 0 or (key == "limit" and value < 1):
        raise UserError(f"'{source}': {key} must be positive, not {value}.")
    return value


def _load_hf_corpus(source: str, max_docs: int | None) -> list[str]:
    dataset_id, split, options = parse_hf_source(source)
    unknown = sorted(set(options) - set(_HF_OPTIONS))
    if unknown:
        raise UserError(
            f"'{source}': unknown option '{unknown[0]}'; known options: {', '.join(_HF_OPTIONS)}."
        )
    known = HF_CORPORA.get(dataset_id, {})
    config = options.get("config") or known.get("config")
    split = split or options.get("split") or known.get("split") or "train"
    field = options.get("field") or known.get("field") or "text"
    cap = _int_option(options, "limit", source)
    if max_docs is not None:
        cap = max_docs if cap is None else min(cap, max_docs)
    if cap is None:
        cap = DEFAULT_HF_MAX_DOCS
    min_chars = _int_option(options, "min_chars", source) or 1
    rows = open_hf_dataset(source, dataset_id, config, split, what="corpora")
    docs = hf_corpus_texts(rows, source=source, field=field, max_docs=cap, min_chars=min_chars)
    log.info("loaded %d documents from %s", len(docs), source)
    return docs


def hf_corpus_texts(
    rows: Iterable[Mapping[str, Any]], *, source: str, field: str = "text", max_docs: int, min_chars: int = 1
) -> list[str]:
    """The non-empty ``field`` values of ``rows`` (wikitext headings skipped), at most ``max_docs``."""
    docs: list[str] = []
    for index, row in enumerate(rows, start=1):
        if field not in row:
            columns = ", ".join(sorted(row)) or "none"
            raise UserError(
                f"{source} row {index} has no '{field}' column (columns: {columns}); use ?field=."
            )
        value = row[field]
        if not isinstance(value, str):
            continue
        text = value.strip()
        if len(text) < min_chars or _WIKITEXT_HEADING.match(text):
            continue
        docs.append(text)
        if len(docs) >= max_docs:
            break
    return docs
