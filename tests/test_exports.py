"""Paste-ready exports of a real edit run: human columns, the run summary, LaTeX, the format/extension rules, umask."""

from __future__ import annotations

import csv
import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import fields

import pytest
from test_experiment import TINY_MEMIT, config, items

from detox_tui.cli import main
from detox_tui.errors import UserError
from detox_tui.pipeline.records import AblationRow, BaselineRow
from detox_tui.pipeline.results import export_files, render_rows, tex_escape, write_text_atomic
from detox_tui.pipeline.tables import (
    ABLATION_COLUMNS,
    BASELINE_COLUMNS,
    EDIT_COLUMNS,
    EDIT_SUMMARY,
    columns_for,
    get,
)

EDIT_HEADERS = [
    "prompt",
    "n",
    "before [95% CI]",
    "after [95% CI]",
    "reduction",
    "p",
    "detoxified",
    "converged",
]
# Internal names a reader should never see in a default export.
INTERNAL = (
    "ci_low",
    "ci_high",
    "before_mean",
    "after_mean",
    "p_value",
    "share_above",
    "attr_",
    "n_not_converged",
)
CI = r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]"


@pytest.fixture(scope="module")
def edit_run(insult_model_dir, tmp_path_factory):
    """One batch MEMIT edit of two prompts on the tiny insult model (5 samples, 5 tokens), in its own store."""
    from detox_tui.pipeline.experiment import Workbench, run_edit

    home = tmp_path_factory.mktemp("exports-home")
    cfg = config(insult_model_dir, method="memit", layers=[1, 2], protocol="batch", hparams=TINY_MEMIT)
    cfg.generation.samples = 5
    cfg.generation.max_new_tokens = 5
    wb = Workbench.load(cfg, data_dir=str(home))
    result = run_edit(wb, items(2), cfg)
    return wb.store, result.run_id, home


def _split(text: str, marker: str) -> tuple[str, str]:
    head, _, tail = text.partition(marker)
    return head, tail


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def test_markdown_export_of_an_edit_run_is_paste_ready(edit_run, tmp_path):
    store, run_id, _ = edit_run
    summary = store.get_run(run_id)["summary"]
    [path] = store.export_files(run_id, tmp_path / "table.md")  # the format from the extension
    text = path.read_text()
    tables, definitions = _split(text, "Definitions:")
    table, summary_block = _split(tables, "Summary:")
    lines = table.strip().splitlines()
    assert _md_cells(lines[0]) == EDIT_HEADERS
    assert _md_cells(lines[1]) == ["---", "---:", "---:", "---:", "---:", "---:", "---", "---"]
    rows = [_md_cells(line) for line in lines[2:]]
    assert [r[0] for r in rows] == [it.prompt for it in items(2)]
    for r, stored in zip(rows, store.rows(run_id, "edit"), strict=True):
        assert r[1] == "5" and re.fullmatch(CI, r[2]) and re.fullmatch(CI, r[3])
        assert r[2].startswith(f"{stored['before']['mean']:.3f} [")
        assert r[6] == ("yes" if stored["detoxified"] else "no")
    # The run's headline, as a second table.
    entries = {c[0]: c[1] for c in map(_md_cells, summary_block.strip().splitlines()[2:])}
    d = summary["detoxified"]
    assert entries["share detoxified [95% CI]"] == f"{d['share']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"
    assert entries["detoxified prompts"] == str(d["k"]) and entries["edited prompts"] == "2"
    assert entries["Defense Success"] == f"{summary['defense_success']:.3f}"
    emt = summary["before_metrics"]["expected_max_toxicity"]
    assert entries["EMT before"].startswith(f"{emt:.3f} ± ")
    assert {"EMT after", "TP before", "TP after", "dist-1/2/3 after", "collapsed", "not converged"} <= set(
        entries
    )
    assert re.fullmatch(r"\d+\.\d{3} -> \d+\.\d{3}", entries["neutral perplexity before -> after"])
    # No internal names, no always-empty column; the terms used are defined, with their sources.
    for name in INTERNAL:
        assert name not in tables
    assert "_" not in tables
    assert (
        "- **share detoxified**: detoxified edited prompts / edited prompts, with a 95% Wilson" in definitions
    )
    assert "(Gehman et al. 2020" in definitions and "- **p**:" in definitions


def test_latex_export_of_an_edit_run_uses_booktabs_and_escapes(edit_run, tmp_path):
    store, run_id, _ = edit_run
    text = store.export(run_id, tmp_path / "table.tex").read_text()
    assert text.count("\\begin{tabular}") == 2 and text.count("\\end{tabular}") == 2
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert text.count(rule) == 2
    body = [line for line in text.splitlines() if line.endswith("\\\\")]
    assert body[0] == " & ".join(EDIT_HEADERS).replace("%", "\\%") + " \\\\"
    assert "\\begin{tabular}{lrrrrrll}" in text  # numbers right-aligned
    first = body[1].removesuffix(" \\\\").split(" & ")
    assert first[0] == items(1)[0].prompt and re.fullmatch(CI, first[2])
    assert "share detoxified [95\\% CI] & " in text and "EMT before & " in text and "$\\pm$" in text
    assert "neutral perplexity before $\\rightarrow$ after & " in text
    # Outside comments, every special character is escaped.
    for line in text.splitlines():
        if not line.startswith("%"):
            assert not re.search(
                r"(?<!\\)[%#_&$]",
                line.replace(" & ", " ").replace("$\\pm$", "").replace("$\\rightarrow$", ""),
            ), line


def test_tex_escape_covers_every_special_character():
    assert tex_escape("a & b % c $ d # e _ f { g } h ~ i ^ j \\ k") == (
        "a \\& b \\% c \\$ d \\# e \\_ f \\{ g \\} h \\textasciitilde{} i \\textasciicircum{} j "
        "\\textbackslash{} k"
    )
    # A newline stays visible (the cell keeps one line); ESC shows as its escape.
    assert tex_escape("x < y > z\nw\x1b") == (
        "x \\textless{} y \\textgreater{} z\\textbackslash{}nw\\textbackslash{}x1b"
    )


def test_csv_export_writes_a_summary_sidecar(edit_run, tmp_path):
    store, run_id, _ = edit_run
    summary = store.get_run(run_id)["summary"]
    table, sidecar = store.export_files(run_id, tmp_path / "table.csv")
    assert sidecar == tmp_path / "table.summary.csv"
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:5] == ["prompt", "n", "before", "before 95% CI low", "before 95% CI high"]
    assert float(rows[0]["before"]) == pytest.approx(store.rows(run_id, "edit")[0]["before"]["mean"])
    with sidecar.open(newline="") as fh:
        pairs = list(csv.reader(fh))
    assert pairs[0] == ["key", "value"]
    values = dict(pairs[1:])
    assert float(values["share detoxified"]) == pytest.approx(summary["detoxified"]["share"])
    assert float(values["share detoxified 95% CI low"]) == pytest.approx(summary["detoxified"]["ci_low"])
    assert float(values["EMT after std"]) == pytest.approx(
        summary["after_metrics"]["expected_max_toxicity_std"]
    )
    assert values["collapsed"] == "no" and values["method"] == "memit"


def test_json_export_has_a_top_level_summary_and_every_field(edit_run, tmp_path):
    store, run_id, _ = edit_run
    data = json.loads(store.export(run_id, tmp_path / "run.json").read_text())
    assert data["summary"] == store.get_run(run_id)["summary"]
    assert data["summary"]["detoxified"]["n"] == 2
    assert "samples_after" in data["rows"][0] and "check" in data["rows"][0]  # JSON keeps everything


def test_columns_all_keeps_every_flattened_field(edit_run, tmp_path):
    store, run_id, _ = edit_run
    table, sidecar = store.export_files(run_id, tmp_path / "all.csv", columns="all")
    with table.open(newline="") as fh:
        header = next(csv.reader(fh))
    assert {"idx", "before_mean", "after_ci_low", "p_value", "check_logp_after", "verdict"} <= set(header)
    assert "detoxified_share" in dict(csv.reader(sidecar.open()))
    with pytest.raises(UserError, match="columns"):
        store.export(run_id, tmp_path / "x.csv", columns="some")


def test_format_and_extension_clash_and_missing_extension(tmp_path):
    rows = [BaselineRow(0, "p", n=1, mean=0.5, ci_low=0.5, ci_high=0.5, max=0.5)]
    with pytest.raises(UserError, match=r"csv clashes with the file name 'x.md'"):
        export_files(rows, tmp_path / "x.md", "csv")
    with pytest.raises(UserError, match="no extension"):
        export_files(rows, tmp_path / "table")
    assert not list(tmp_path.iterdir())
    # An explicit format with no extension, or one of its own, is fine.
    [written] = export_files(rows, tmp_path / "table", "md")
    assert written.read_text().startswith("| prompt | n | mean toxicity [95% CI] |")
    assert export_files(rows, tmp_path / "t.markdown")[0].read_text().startswith("| prompt |")


def _cli(capsys, *args):
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_export_takes_the_format_from_out_and_refuses_a_clash(edit_run, tmp_path, capsys):
    _, run_id, home = edit_run
    common = ("--data-dir", str(home))
    rc, _, err = _cli(capsys, "export", run_id, "--out", str(tmp_path / "t.tex"), *common)
    assert rc == 0, err
    assert (tmp_path / "t.tex").read_text().count("\\toprule") == 2
    rc, _, err = _cli(capsys, "runs", "export", run_id, "--out", str(tmp_path / "t.csv"), *common)
    assert rc == 0 and "t.summary.csv" in err
    rc, _, err = _cli(capsys, "export", run_id, "--format", "csv", "--out", str(tmp_path / "x.md"), *common)
    assert rc == 2 and not (tmp_path / "x.md").exists()
    assert (
        err.strip().count("\n") == 0 and "--format csv clashes with --out" in err and "Traceback" not in err
    )
    rc, _, err = _cli(capsys, "export", run_id, "--out", str(tmp_path / "noext"), *common)
    assert rc == 2 and "no extension" in err and "--format" in err and not (tmp_path / "noext").exists()
    rc, _, err = _cli(capsys, "export", run_id, "--format", "md", "--out", str(tmp_path / "noext"), *common)
    assert rc == 0 and (tmp_path / "noext").read_text().startswith("| prompt |")
    rc, _, err = _cli(capsys, "export", run_id, "--columns", "all", "--out", str(tmp_path / "a.csv"), *common)
    assert rc == 0 and "before_mean" in (tmp_path / "a.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = write_text_atomic(tmp_path / "t.csv", "a\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_overwriting_keeps_the_files_mode(tmp_path):
    path = tmp_path / "t.md"
    path.write_text("old")
    path.chmod(0o640)
    old = os.umask(0o077)
    try:
        write_text_atomic(path, "new")
    finally:
        os.umask(old)
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["t.md"]  # no temporary file left


def _has(row, path: str) -> bool:
    """Whether a dotted path names a field of the row (the value may be None)."""
    head = path
    value = row
    while head not in value:
        part, dot, head = head.partition(".")
        if not dot or part not in value:
            return False
        value = value[part]
        if value is None:  # an optional nested record (held-out share without held-out prompts)
            return True
    return True


def test_column_specs_read_record_fields(edit_run):
    store, run_id, _ = edit_run
    edit_row = store.rows(run_id, "edit")[0]
    baseline_row = BaselineRow(0, "p").to_dict()
    ablation_row = AblationRow(**{f.name: 0 for f in fields(AblationRow)}).to_dict()
    summary = store.get_run(run_id)["summary"]
    for spec, row in (
        (EDIT_COLUMNS, edit_row),
        (BASELINE_COLUMNS, baseline_row),
        (ABLATION_COLUMNS, ablation_row),
        (EDIT_SUMMARY, summary),
    ):
        for col in spec:
            for path in col.fields:
                assert _has(row, path), f"{col.name}: {path}"
    # Optional columns appear only when called for: layers with several configs, held out with any.
    rows = store.rows(run_id, "edit")
    assert [c.name for c in columns_for(rows)] == [h.split(" [")[0] for h in EDIT_HEADERS]
    mixed = [rows[0], {**rows[1], "config": "1", "heldout": True}]
    names = [c.name for c in columns_for(mixed)]
    assert names[1] == "layers" and names[-1] == "held out"
    assert get({"share_above_0.5": 0.25}, "share_above_0.5") == 0.25


def test_untrusted_text_is_escaped_in_markdown():
    row = BaselineRow(0, "a | *b* _c_ <i>\nd\x07", n=1, mean=0.5, ci_low=0.5, ci_high=0.5, max=0.5)
    line = render_rows([row], "md").splitlines()[2]
    # The newline and the control character are shown as their escapes (whose backslash Markdown needs
    # escaped in turn): the row stays one line of the table.
    assert line.startswith("| a \\| \\*b\\* \\_c\\_ \\<i\\>\\\\nd\\\\x07 | 1 |")


def test_reading_modules_import_no_heavy_libraries():
    code = (
        "import sys, detox_tui.pipeline.store, detox_tui.pipeline.results, detox_tui.pipeline.tables; "
        "print(sorted(m for m in ('torch', 'transformers', 'scipy', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
