"""Result rows and every export format: json/jsonl load back, csv has the flattened header, md is a table."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest

from detox_tui.errors import UserError
from detox_tui.pipeline.generation import PromptGenerations
from detox_tui.pipeline.results import (
    baseline_row,
    export_rows,
    flatten_row,
    format_from_path,
    rows_to_markdown,
)
from detox_tui.prompts.base import PromptItem


def _row(idx: int = 0, greedy: bool = True) -> dict:
    item = PromptItem("Those people are", target=" kind.", category="insult")
    gens = PromptGenerations(
        "Those people are", [" nice | polite", " awful\nidiots", " fine"], " ok" if greedy else None
    )
    scores = {
        "toxicity": np.array([0.1, 0.9, 0.2] + ([0.05] if greedy else [])),
        "insult": np.array([0.0, 0.8, 0.1] + ([0.0] if greedy else [])),
    }
    return baseline_row(idx, item, gens, scores, "toxicity", 0.15).to_dict()


def test_baseline_row_summarises_samples_and_keeps_greedy_apart():
    row = _row()
    for key in ("idx", "prompt", "category", "target", "n", "mean", "std", "ci_low", "ci_high", "max"):
        assert key in row
    assert row["n"] == 3
    assert row["mean"] == pytest.approx(0.4)
    assert row["max"] == pytest.approx(0.9)
    assert row["share_above_0.5"] == pytest.approx(1 / 3)
    assert row["share_above"] == pytest.approx(2 / 3)
    assert row["greedy_score"] == pytest.approx(0.05)
    assert row["samples"] == pytest.approx([0.1, 0.9, 0.2])
    assert row["generations"] == [" nice | polite", " awful\nidiots", " fine"]
    assert row["attributes"]["insult"]["mean"] == pytest.approx(0.3)
    assert row["attributes"]["toxicity"]["n"] == 3
    assert _row(greedy=False)["greedy_score"] is None


def test_greedy_only_rows_summarise_the_greedy_continuation():
    item = PromptItem("p")
    row = baseline_row(
        2, item, PromptGenerations("p", [], " bad"), {"toxicity": np.array([0.7])}, "toxicity", 0.1
    ).to_dict()
    assert row["n"] == 1 and row["mean"] == pytest.approx(0.7) and row["greedy_score"] == pytest.approx(0.7)
    assert row["generations"] == [" bad"]


def test_flatten_row_prefixes_nested_dicts_and_drops_lists():
    row = {
        "idx": 1,
        "before": {"mean": 0.5, "ci_low": 0.4},
        "after": {"mean": 0.1, "ci_low": 0.0},
        "attributes": {"insult": {"mean": 0.3}},
        "samples_before": [0.1, 0.2],
        "delta": np.float64(-0.4),
    }
    flat = flatten_row(row)
    assert flat == {
        "idx": 1,
        "before_mean": 0.5,
        "before_ci_low": 0.4,
        "after_mean": 0.1,
        "after_ci_low": 0.0,
        "attr_insult_mean": 0.3,
        "delta": -0.4,
    }
    assert type(flat["delta"]) is float


def test_json_export_round_trips_with_meta_and_nan_as_null(tmp_path):
    rows = [_row(0), _row(1)]
    rows[1]["ci_low"] = float("nan")
    summary = {"n_prompts": 2, "mean": 0.4, "scorer": "profanity", "metrics": {"dist_1": float("nan")}}
    path = export_rows(rows, tmp_path / "out.json", "json", meta={"run_id": "r1", "summary": summary})
    data = json.loads(path.read_text())
    assert data["meta"]["run_id"] == "r1"
    # The run's summary is a top-level object (and stays in meta for older readers).
    assert data["summary"]["mean"] == 0.4 and data["summary"]["metrics"]["dist_1"] is None
    assert data["meta"]["summary"] == data["summary"]
    # Every JSON export says what its numbers mean, with sources.
    assert "Gehman et al. 2020" in data["meta"]["definitions"]["expected_max_toxicity"]
    assert data["rows"][0]["attributes"]["insult"]["mean"] == pytest.approx(0.3)
    assert data["rows"][0]["generations"] == rows[0]["generations"]
    assert data["rows"][1]["ci_low"] is None


def test_jsonl_export_one_row_per_line(tmp_path):
    rows = [_row(0), _row(1), _row(2)]
    path = export_rows(rows, tmp_path / "out.jsonl", "jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert [json.loads(line)["idx"] for line in lines] == [0, 1, 2]


def test_csv_export_all_columns_has_flattened_header_and_values(tmp_path):
    rows = [_row(0), _row(1)]
    path = export_rows(rows, tmp_path / "out.csv", "csv", columns="all")
    with path.open(newline="") as fh:
        read = list(csv.DictReader(fh))
    assert len(read) == 2
    header = list(read[0])
    assert header[:4] == ["idx", "prompt", "category", "target"]
    assert "attr_insult_mean" in header and "share_above_0.5" in header
    assert "samples" not in header and "generations" not in header
    assert float(read[1]["mean"]) == pytest.approx(0.4)


def test_csv_export_default_columns_are_the_readers(tmp_path):
    rows = [_row(0), _row(1)]
    path = export_rows(rows, tmp_path / "out.csv")  # the format from the extension
    with path.open(newline="") as fh:
        read = list(csv.DictReader(fh))
    assert list(read[0]) == [
        "prompt",
        "n",
        "mean toxicity",
        "mean toxicity 95% CI low",
        "mean toxicity 95% CI high",
        "max",
        "share ≥ 0.5",
    ]
    # Numbers stay numbers in CSV (a CI is three columns), the prompt is kept as it was.
    assert float(read[0]["mean toxicity"]) == pytest.approx(0.4) and float(read[0]["max"]) == pytest.approx(
        0.9
    )
    assert read[0]["prompt"] == "Those people are"
    assert not (tmp_path / "out.summary.csv").exists()  # no summary given, no sidecar


def test_markdown_table_lines_and_escaping(tmp_path):
    rows = [_row(0), _row(1)]
    rows[0]["prompt"] = "a | b\nc"
    text = rows_to_markdown(rows)
    lines = text.strip().splitlines()
    assert len(lines) == 2 + 2  # header, separator, two rows
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert set(lines[1].replace("|", "").split()) == {"---"}
    assert "0.400" in lines[2]  # floats at 3 decimals
    assert "a \\| b\\\\nc" in lines[2]  # the pipe escaped, the newline shown as \n (escaped for Markdown)
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in lines]
    assert len({len(c) for c in cells}) == 1  # the escaped pipe does not add a column
    path = export_rows(rows, tmp_path / "out.md", "md", columns="all")
    assert path.read_text() == text


def test_export_errors_are_user_errors(tmp_path):
    rows = [_row(0)]
    existing = export_rows(rows, tmp_path / "x.csv", "csv")
    with pytest.raises(UserError, match="already exists"):
        export_rows(rows, existing, "csv", overwrite=False)
    with pytest.raises(UserError, match="does not exist"):
        export_rows(rows, tmp_path / "missing" / "x.csv", "csv")
    with pytest.raises(UserError, match="format"):
        export_rows(rows, tmp_path / "x.xlsx", "xlsx")
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_format_from_path():
    assert format_from_path("a/b.CSV") == "csv"
    assert format_from_path("r.json") == "json"
    assert format_from_path("r.markdown") == "md"
    assert format_from_path("r.jsonl") == "jsonl"
    assert format_from_path("paper/table.tex") == "tex"
    with pytest.raises(UserError, match="xlsx"):
        format_from_path("out.xlsx")
    with pytest.raises(UserError):
        format_from_path("no_extension")


def test_nan_in_markdown_and_csv_is_visible_not_a_crash(tmp_path):
    row = _row(0)
    row["std"] = math.nan
    assert "nan" in rows_to_markdown([row])
    export_rows([row], tmp_path / "n.csv", "csv")
