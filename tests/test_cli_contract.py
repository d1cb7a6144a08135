"""The CLI's contract with scripts and users: usage errors, --version, options before the subcommand,
Ctrl+C/SIGTERM, --threads, and the shared options every experiment command takes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from detox_tui.cli import main
from detox_tui.pipeline.store import RunStore


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def home() -> str:
    return os.environ["DETOX_TUI_HOME"]


# (arguments, what the one error line must name). None of these loads a model: parsing, or our own
# validation that runs before any model work, refuses each of them.
BAD_INVOCATIONS = [
    # click/typer's parsing
    (["baseline", "--sample", "3"], "--sample"),
    (["baseline", "--seed", "abc"], "--seed"),
    (["baseline", "--samples", "-3"], "--samples"),
    (["baseline", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["baseline", "--top-p", "2"], "--top-p"),
    (["baseline", "--temperature", "-1"], "--temperature"),
    (["baseline", "--batch-size", "0"], "--batch-size"),
    (["baseline", "--limit", "0"], "--limit"),
    (["baseline", "--model"], "--model"),
    (["baseline", "--greedy=yes"], "--greedy"),
    (["baseline", "extra-argument"], "extra-argument"),
    (["edit", "--min-reduction", "1.5"], "--min-reduction"),
    (["edit", "--alpha", "-0.1"], "--alpha"),
    (["edit", "--collapse-factor", "0.5"], "--collapse-factor"),
    (["edit", "--stats-tokens", "0"], "--stats-tokens"),
    (["ablate", "--threads", "0"], "--threads"),
    (["--threads", "abc", "baseline"], "--threads"),
    (["frobnicate"], "frobnicate"),
    (["runs", "frob"], "frob"),
    (["runs", "show"], "run_id"),
    (["runs", "export"], "run_id"),
    (["runs", "list", "--limit", "x"], "--limit"),
    (["stats"], "--layers"),
    (["trace"], "--prompt"),
    (["trace", "--prompt", "hi", "--window", "0"], "--window"),
    (["serve", "--port", "http"], "--port"),
    # an option given before a subcommand that does not take it
    (["--device", "cpu", "runs", "list"], "--device"),
    (["--scorer", "profanity", "stats", "--layers", "1"], "--scorer"),
    # our own validation, before any model is loaded
    (["edit", "--hparam", "x"], "--hparam"),
    (["edit", "--layers", "1,x"], "--layers"),
    (["edit", "--mode", "sideways"], "--mode"),
    (["ablate", "--configs", "1;x"], "configuration"),
    (["baseline", "--prompts", "MISSING.jsonl"], "MISSING.jsonl"),
    (["baseline", "--out", "OUT.xlsx"], "xlsx"),
    (["baseline", "--out", "/nonexistent-dir/table.csv"], "/nonexistent-dir"),
    (["baseline", "--protocol", "unknown"], "--protocol"),
    (["baseline", "--protocol", "rtp", "--samples", "3"], "--samples"),
    (["edit", "--protocol", "rtp", "--max-new-tokens", "5"], "--max-new-tokens"),
    (["trace", "--prompt", "hello", "--kind", "weird"], "--kind"),
    (["trace", "--prompt", "hello", "--out", "OUT.xlsx"], "xlsx"),
    (["stats", "--layers", "x"], "--layers"),
    (["runs", "show", "no-such-run"], "no-such-run"),
    (["apply-delta", "MISSING.safetensors"], "MISSING.safetensors"),
]


@pytest.mark.parametrize("args, needle", BAD_INVOCATIONS, ids=[" ".join(a) for a, _ in BAD_INVOCATIONS])
def test_bad_invocation_is_one_line_naming_the_problem_with_exit_2(capsys, tmp_path, args, needle):
    args = [
        a.replace("MISSING", str(tmp_path / "missing")).replace("OUT", str(tmp_path / "out")) for a in args
    ]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2, (out, err)
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert RunStore.open(home()).list_runs() == []


def test_at_least_25_bad_invocations_are_covered():
    assert len(BAD_INVOCATIONS) >= 25


def test_unknown_option_suggests_the_close_one(capsys):
    rc, _, err = run_cli(capsys, "baseline", "--sample", "3")
    assert rc == 2
    assert err.startswith("error: detox-tui baseline: No such option: --sample (did you mean --samples?)")


def test_version(capsys):
    from detox_tui import __version__

    rc, out, err = run_cli(capsys, "--version")
    assert (rc, out, err) == (0, f"detox-tui {__version__}\n", "")


def test_help_and_group_without_command_exit_0(capsys):
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0 and "baseline" in out and "--version" in out
    rc, out, _ = run_cli(capsys, "runs")
    assert rc == 0 and "list" in out and "show" in out


def test_options_before_the_subcommand_are_its_defaults(capsys, tmp_path):
    data = tmp_path / "elsewhere"
    store = RunStore.open(str(data))
    run_id = store.create_run("baseline", {"model": {"name": "m"}}, model="m")
    rc, out, err = run_cli(capsys, "--data-dir", str(data), "runs", "list", "--json")
    assert rc == 0, err
    assert [r["id"] for r in json.loads(out)["runs"]] == [run_id]
    # The subcommand's own option wins over the one given before it.
    rc, out, err = run_cli(
        capsys, "--data-dir", str(data), "runs", "list", "--data-dir", str(tmp_path / "empty"), "--json"
    )
    assert rc == 0 and json.loads(out)["runs"] == []


def test_model_before_the_subcommand_is_the_model_used(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--model", str(tmp_path / "before"), "baseline", "--scorer", "profanity")
    assert rc == 2 and str(tmp_path / "before") in err
    rc, _, err = run_cli(
        capsys,
        *("--model", str(tmp_path / "before"), "baseline"),
        *("--model", str(tmp_path / "after"), "--scorer", "profanity"),
    )
    assert rc == 2 and str(tmp_path / "after") in err and str(tmp_path / "before") not in err


def test_shared_options_are_the_same_on_every_experiment_command():
    """baseline, edit and ablate take every shared option, under the same name and with the same default."""
    import dataclasses

    import typer

    from detox_tui.cli import EditOptions, RunOptions, app

    group = typer.main.get_command(app)
    commands = {name: group.commands[name] for name in ("baseline", "edit", "ablate")}  # type: ignore[attr-defined]
    params = {name: {p.name: p for p in cmd.params} for name, cmd in commands.items()}
    for f in dataclasses.fields(RunOptions):
        for name in commands:
            assert f.name in params[name], (name, f.name)
            assert params[name][f.name].opts == params["baseline"][f.name].opts
            assert params[name][f.name].default == f.default
    for f in dataclasses.fields(EditOptions):
        for name in ("edit", "ablate"):
            assert params[name][f.name].default == f.default
    assert params["ablate"]["configs"].default is None  # None: configurations scaled to the model's depth
    assert "--threads" in params["baseline"]["threads"].opts


# ------------------------------------------------------------------------------------------ --threads


@pytest.fixture
def thread_calls(monkeypatch) -> list[int]:
    import torch

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.delenv("DETOX_TUI_THREADS", raising=False)
    return calls


@pytest.mark.parametrize(
    "args",
    [
        ["baseline", "--threads", "3"],
        ["edit", "--threads", "3"],
        ["ablate", "--threads", "3"],
        ["--threads", "3", "baseline"],
    ],
)
def test_threads_reach_torch_before_any_work(capsys, tmp_path, thread_calls, args):
    # The missing prompt file stops the command right after the threads are set: no model is loaded.
    rc, _, err = run_cli(capsys, *args, "--prompts", str(tmp_path / "missing.jsonl"))
    assert rc == 2 and "missing.jsonl" in err
    assert thread_calls == [3]


def test_threads_from_the_environment(capsys, tmp_path, thread_calls, monkeypatch):
    monkeypatch.setenv("DETOX_TUI_THREADS", "2")
    rc, _, _ = run_cli(capsys, "trace", "--prompt", "hello", "--kind", "weird")
    assert rc == 2 and thread_calls == [2]
    rc, _, _ = run_cli(capsys, "stats", "--layers", "x", "--threads", "4")  # the option wins
    assert rc == 2 and thread_calls == [2, 4]


def test_without_threads_torch_chooses(capsys, tmp_path, thread_calls):
    rc, _, _ = run_cli(capsys, "baseline", "--prompts", str(tmp_path / "missing.jsonl"))
    assert rc == 2 and thread_calls == []


# ------------------------------------------------------------------------------------------ signals


def _wait_for_running_run(store: RunStore, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in store.list_runs() if r["status"] == "running"]
        if runs and runs[0]["n_prompts"]:
            return runs[0]["id"]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it was interrupted: {proc.communicate()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("no run appeared in the store")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_cancels_the_run_and_prints_how_to_resume(tmp_path, tiny_model_dir, signum, code):
    data = tmp_path / "data"
    env = {**os.environ, "DETOX_TUI_HOME": str(data), "HF_HUB_OFFLINE": "1", "DETOX_TUI_THREADS": "1"}
    cmd = [sys.executable, "-m", "detox_tui", "baseline", "--model", str(tiny_model_dir)]
    cmd += [
        "--scorer",
        "profanity",
        "--samples",
        "5000",
        "--batch-size",  # one prompt's 5000 samples at a time: well inside the memory check on a small runner
        "1",
        "--max-new-tokens",
        "20",
        "--device",
        "cpu",
        "--json",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id = _wait_for_running_run(RunStore.open(str(data)), proc)
        time.sleep(0.5)  # inside generation
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted")
    assert f"detox-tui baseline --resume {run_id}" in last
    assert out == ""
    assert RunStore.open(str(data)).get_run(run_id)["status"] == "cancelled"
