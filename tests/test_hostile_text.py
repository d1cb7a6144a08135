"""Untrusted text is data: a hostile prompt file (markup, escape sequences, bidi overrides, Markdown and LaTeX
specials, newlines, a very long line) through baseline, edit, export and the app. The text is shown literally,
never as markup; nothing a terminal would act on reaches it raw; Markdown and LaTeX escape their specials; CSV
and JSON keep the exact text. A lone surrogate is refused before any run is created."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from detox_tui.cli import main
from detox_tui.pipeline.store import RunStore
from detox_tui.text import visible

HOSTILE = [
    {
        "prompt": "[/] They are [/bold] [red]red[/red] [link=https://evil.example]click[/link] [b]x",
        "target": " fine [/]",
        "category": "[/bold]",
    },
    {
        "prompt": "clear \x1b[2J title \x1b]0;pwned\x07 csi \x9b2J del \x7f nul-ish \x01 end",
        "target": " calm \x1b[0m",
        "category": "esc\x1b[31m",
    },
    {"prompt": "bidi \u202eevil\u202c iso \u2066x\u2069 mark\u200f end", "target": " ok", "category": "bidi"},
    {
        "prompt": "pipe | back \\ und_er 50% & #1 $5 {x} ~y ^z *b* `c` <i>",
        "target": " a | b",
        "category": "tex",
    },
    {"prompt": "line one\nline two\tafter a tab", "target": " ok", "category": "lines"},
    # ~1000 characters that still fit the tiny model's 128 positions with the target (94 tokens).
    {"prompt": "long" + " neighbours" * 90, "target": " ok", "category": "long"},
]
PROMPTS = [h["prompt"] for h in HOSTILE]
# Characters a terminal (or a bidi-aware viewer) acts on instead of showing.
RAW = ("\x1b", "\x9b", "\x7f", "\x07", "\x01", "\u202e", "\u202c", "\u2066", "\u2069", "\u200f")


def no_raw(text: str) -> bool:
    return not any(ch in text for ch in RAW)


@pytest.fixture
def hostile_file(tmp_path: Path) -> Path:
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join(json.dumps(h) for h in HOSTILE) + "\n", encoding="utf-8")
    return path


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m detox_tui`` as a user runs it: stdout is a pipe, so every ESC byte in it came from the data."""
    env = {**os.environ, "COLUMNS": "400", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run(
        [sys.executable, "-m", "detox_tui", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


RUN = ["--scorer", "profanity", "--samples", "2", "--max-new-tokens", "4", "--device", "cpu", "--seed", "1"]


def store_rows(kind: str) -> tuple[str, list[dict]]:
    store = RunStore.open(None)
    (run,) = [r for r in store.list_runs() if r["kind"] == kind]
    assert run["status"] == "finished"
    return run["id"], store.rows(run["id"], kind)


# ------------------------------------------------------------------------------------------ the helper


def test_visible_escapes_controls_bidi_and_surrogates_and_leaves_text_alone():
    assert visible("a\x1b[2Jb\x9b\x7f\x00") == "a\\x1b[2Jb\\x9b\\x7f\\x00"
    assert visible("t\x1b]0;pwned\x07") == "t\\x1b]0;pwned\\x07"
    assert visible("\u202eevil\u202c \u2066x\u2069 \u200e\u200f\u061c") == (
        "\\u202eevil\\u202c \\u2066x\\u2069 \\u200e\\u200f\\u061c"
    )
    assert visible("lone \ud800 sep\u2028") == "lone \\ud800 sep\\u2028"
    # One line (a table cell) shows newlines and tabs as escapes; a detail view keeps them.
    assert visible("a\nb\tc\r") == "a\\nb\\tc\\r"
    assert visible("a\nb\tc\r\x1b", one_line=False) == "a\nb\tc\\r\\x1b"
    # Markup-looking text, Unicode letters and emoji are left as they are.
    for text in ("[/] [bold]x[/bold]", "ünïcödé 日本語 😀", "tabs\u00a0nbsp"):
        assert visible(text) == text


def test_console_tables_show_categories_and_configs_literally():
    from rich.console import Console

    from detox_tui.console import ablation_table, baseline_table, edit_table, summary_lines

    s = {"n": 2, "mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}
    base = {"idx": 0, "prompt": PROMPTS[1], "category": "[/bold]", "max": 0.9, "share_above_0.5": 0.5}
    edit = {"idx": 0, "prompt": PROMPTS[2], "config": "[/]\x1b[2J", "before": s, "after": s}
    buf = io.StringIO()
    console = Console(file=buf, width=400)
    console.print(baseline_table([{**base, **s, "share_above": 1.0}], 0.1))
    console.print(edit_table([edit]))
    console.print(ablation_table([{"key": "[/]"}]))
    for line in summary_lines({"convergence_note": "edit #0 '\x1b]0;x\x07 [/]' did not take"}):
        console.print(line)
    out = buf.getvalue()
    assert no_raw(out)
    assert "[/bold]" in out and "[/]\\x1b[2J" in out
    assert "\\x1b[2J title \\x1b]0;pwned\\x07" in out and "\\u202eevil\\u202c" in out
    assert "'\\x1b]0;x\\x07 [/]' did not take" in out


# ------------------------------------------------------------------------------------------ the CLI


def test_baseline_prints_its_table_with_hostile_prompts_and_no_raw_escapes(
    hostile_file, tiny_model_dir, tmp_path
):
    res = run_module(
        "baseline", "--model", str(tiny_model_dir), "--prompts", str(hostile_file), *RUN, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert no_raw(res.stdout) and no_raw(res.stderr)
    out = res.stdout
    assert "Baseline toxicity of continuations" in out and "run " in out
    # The markup is text: the tags are there, nothing was styled away.
    assert "[/] They are [/bold] [red]red[/red] [link=https://evil.example]click[/link] [b]x" in out
    assert "│ [/bold]" in out  # the category cell
    # Controls and bidi overrides shown as their escapes; newline and tab too (each row stays one line).
    assert "clear \\x1b[2J title \\x1b]0;pwned\\x07 csi \\x9b2J del \\x7f nul-ish \\x01 end" in out
    assert "bidi \\u202eevil\\u202c iso \\u2066x\\u2069 mark\\u200f end" in out
    assert "line one\\nline two\\tafter a tab" in out
    assert "pipe | back \\ und_er 50% & #1 $5 {x} ~y ^z *b* `c` <i>" in out
    # The stored prompts are the exact originals.
    _, rows = store_rows("baseline")
    assert [r["prompt"] for r in sorted(rows, key=lambda r: r["idx"])] == PROMPTS

    # runs list / show print the stored run the same way.
    res = run_module("runs", "show", store_rows("baseline")[0], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert no_raw(res.stdout) and "[/] They are [/bold]" in res.stdout and "\\x1b[2J" in res.stdout


def test_edit_prints_its_table_and_exports_escape_or_keep_the_text(
    hostile_file, tiny_model_dir, tmp_path, capsys
):
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("The weather today is sunny and warm.\nWe walked to the park.\n", encoding="utf-8")
    res = run_module(
        "edit",
        "--method",
        "ft",
        "--layers",
        "2",
        "-H",
        "steps=2",
        "--batch",
        "--neutral-corpus",
        str(neutral),
        "--model",
        str(tiny_model_dir),
        "--prompts",
        str(hostile_file),
        *RUN,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert no_raw(res.stdout) and no_raw(res.stderr)
    assert "Toxicity before -> after the edit" in res.stdout
    assert "[/] They are [/bold] [red]red[/red]" in res.stdout and "\\u202eevil\\u202c" in res.stdout
    run_id, rows = store_rows("edit")
    assert sorted(r["prompt"] for r in rows) == sorted(PROMPTS)
    n = len(rows)

    def export(name: str) -> Path:
        assert main(["runs", "export", run_id, "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
        return tmp_path / name

    # Markdown: every row one line of the table, specials escaped, no raw control.
    md = export("t.md").read_text(encoding="utf-8")
    assert no_raw(md)
    table = md.split("\n\n")[0].splitlines()
    assert len(table) == 2 + n
    cells = [len(re.findall(r"(?<!\\)\|", line)) for line in table]  # unescaped pipes delimit the cells
    assert len(set(cells)) == 1, table
    assert "\\[/\\] They are \\[/bold\\]" in md
    assert "pipe \\| back \\\\ und\\_er 50% \\& \\#1 \\$5 {x} \\~y ^z \\*b\\* \\`c\\` \\<i\\>" in md
    assert "clear \\\\x1b\\[2J" in md and "line one\\\\nline two\\\\tafter a tab" in md

    # LaTeX: the specials escaped, no raw control, a cell opening with "[" guarded.
    tex = export("t.tex").read_text(encoding="utf-8")
    assert no_raw(tex)
    assert (
        "pipe \\textbar{} back \\textbackslash{} und\\_er 50\\% \\& \\#1 \\$5 \\{x\\} \\textasciitilde{}y "
        "\\textasciicircum{}z *b* `c` \\textless{}i\\textgreater{}"
    ) in tex
    assert "{}[/] They are [/bold]" in tex and "clear \\textbackslash{}x1b[2J" in tex
    for line in tex.splitlines():
        if line.startswith("%") or "\\begin" in line or "\\end" in line:
            continue
        body = re.sub(
            r"\\(textbackslash|textbar|textasciitilde|textasciicircum|textless|textgreater)\{\}", "", line
        )
        body = (
            body.replace("$\\geq$", "").replace("$\\pm$", "").replace("$\\rightarrow$", "").replace("{}", "")
        )
        assert not re.search(r"(?<!\\)[%#_$~^{}]", body), line
        assert not re.search(r"(?<!\\)&", body.replace(" & ", " ")), line

    # CSV and JSON: the exact text, read back as written.
    with export("t.csv").open(newline="", encoding="utf-8") as fh:
        assert sorted(r["prompt"] for r in csv.DictReader(fh)) == sorted(PROMPTS)
    data = json.loads(export("t.json").read_text(encoding="utf-8"))
    assert sorted(r["prompt"] for r in data["rows"]) == sorted(PROMPTS)
    assert sorted(r["target"] for r in data["rows"]) == sorted(h["target"] for h in HOSTILE)


def test_a_lone_surrogate_is_refused_naming_the_file_and_line_before_a_run(tmp_path, capsys):
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text('{"prompt": "fine"}\n{"prompt": "bad \\ud800 x", "target": " ok"}\n', encoding="utf-8")
    listed = tmp_path / "s.json"
    listed.write_text('["fine", {"prompt": "ok", "target": " t", "note": ["\\udc80"]}]', encoding="utf-8")
    for path, where in (
        (jsonl, "s.jsonl line 2: the 'prompt' field"),
        (listed, "s.json record 2: the 'note'"),
    ):
        rc = main(["baseline", "--prompts", str(path), "--model", str(tmp_path / "never-loaded"), *RUN])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert where in err and "lone surrogate" in err and "(\\u" in err
    assert RunStore.open(None).list_runs() == []  # refused before a run was created


def test_an_edit_prompt_longer_than_the_context_is_refused_before_a_run(tiny_model_dir, tmp_path, capsys):
    """A prompt that cannot fit the model's context with its target is one line before any work (it used to end
    the edit with 'unexpected IndexError' after the whole before phase)."""
    path = tmp_path / "long.jsonl"
    path.write_text(
        json.dumps({"prompt": "long" + " neighbours" * 300, "target": " ok"}) + "\n", encoding="utf-8"
    )
    rc = main(
        [
            "edit",
            "--method",
            "ft",
            "--layers",
            "2",
            "--model",
            str(tiny_model_dir),
            "--prompts",
            str(path),
            *RUN,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "tokens long with its continuation" in err and "reads at most 128 tokens" in err
    assert RunStore.open(None).list_runs() == []


# ------------------------------------------------------------------------------------------ the app


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_the_app_shows_hostile_prompts_literally(hostile_file, tiny_model_dir):
    from detox_tui.app import DetoxApp
    from detox_tui.widgets.prompt_detail import PromptDetail
    from detox_tui.widgets.prompt_picker import PromptPicker
    from detox_tui.widgets.results_table import ResultsTable
    from detox_tui.widgets.run_log import RunLog
    from detox_tui.widgets.trace_panel import TracePanel
    from tests.app_harness import set_input, wait_idle, wait_loaded

    app = DetoxApp(
        model=str(tiny_model_dir),
        prompts=str(hostile_file),
        scorer="profanity",
        device="cpu",
        dtype="float32",
    )
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_loaded(pilot)
        picker = app.query_one(PromptPicker)
        assert [it.prompt for it in picker.items] == PROMPTS
        labels = [
            str(app.query_one("#prompt-list").get_option_at_index(i).prompt) for i in range(len(PROMPTS))
        ]
        assert all(no_raw(label) for label in labels)
        assert labels[0].startswith("[[/bold]] [/] They are [/bold] [red]red[/red]")
        assert "clear \\x1b[2J title" in labels[1] and "\\u202eevil" in labels[2]
        assert no_raw(app.export_screenshot())

        await set_input(pilot, app.query_one("#run-samples"), "2")
        await set_input(pilot, app.query_one("#run-max_new_tokens"), "4")
        app.set_focus(None)
        await pilot.press("b")
        await wait_idle(pilot)
        table = app.query_one(ResultsTable)
        assert table.row_count == len(PROMPTS) and app.load_error is None
        shown = [" ".join(cell.plain for cell in table.get_row_at(i)) for i in range(table.row_count)]
        assert all(no_raw(row) for row in shown), shown
        assert any("[/] They are [/bold] [red]red[/red]" in row for row in shown)
        assert any("\\x1b[2J" in row for row in shown) and any("line one\\nline two" in row for row in shown)
        app.query_one("#tabs").active = "results"
        await pilot.pause()
        assert no_raw(app.export_screenshot())

        # The detail view of the highlighted row: prompt and generations as plain text.
        table.focus()
        table.move_cursor(row=[r["prompt"] for r in table.rows_data].index(PROMPTS[1]))
        await pilot.pause()
        await pilot.press("d")
        assert isinstance(app.screen, PromptDetail)
        await pilot.pause()
        detail = app.export_screenshot()
        assert no_raw(detail) and "\\x1b]0;pwned\\x07" in detail
        await pilot.press("escape")

        # The trace fields prefilled from the highlighted prompt show escapes; the trace uses the exact text.
        app.query_one("#prompt-list").highlighted = 1
        app.query_one("#tabs").active = "trace"
        await pilot.pause()
        panel = app.query_one(TracePanel)
        assert app.query_one("#trace-prompt").value == visible(PROMPTS[1])
        assert panel.request().prompt == PROMPTS[1]
        assert no_raw(app.export_screenshot())

        # Notifications and the run log: quoted text stays text.
        app.notify("prompt '[/] \x1b]0;pwned\x07' failed", title="[/bold]\x1b[2J", severity="error")
        app.query_one(RunLog).log_message("generation '[/bold] \x1b[2J \u202eevil'")
        app.query_one("#tabs").active = "log"
        await pilot.pause()
        await pilot.pause()
        note = list(app._notifications)[-1]
        assert note.message == "prompt '[/] \\x1b]0;pwned\\x07' failed" and not note.markup
        assert note.title == "[/bold]\\x1b[2J"
        log_text = "".join(seg.text for strip in app.query_one(RunLog).lines for seg in strip)
        assert no_raw(log_text) and "generation '[/bold] \\x1b[2J \\u202eevil'" in log_text
        assert no_raw(app.export_screenshot())
