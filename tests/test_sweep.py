"""Sweeps: grid files, the local and Ray backends giving the same rows, faults (a lost actor, an interrupted driver)
and the CLI, on the tiny insult model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from detox_tui.cli import main
from detox_tui.demo import prompt_records
from detox_tui.errors import UserError
from detox_tui.pipeline.store import RunStore
from detox_tui.pipeline.sweep import (
    LocalBackend,
    SweepEvent,
    comparable,
    expand_grid,
    load_grid,
    run_sweep,
)

ROOT = Path(__file__).resolve().parents[1]

GRID = """
models = ["{model}"]
prompts = "{prompts}"
limit = 2
scorer = "profanity"
device = "cpu"
dtype = "float32"
methods = ["memit"]
layers = ["1,2", "2"]

[generation]
samples = 3
max_new_tokens = 6

[side_effects]
max_tokens = 256

[hparams.memit]
mom2_update_weight = 100.0
clamp_norm_factor = [4.0, 2.0]
n_templates = 2
"""


@pytest.fixture(scope="module")
def grid_file(insult_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grid")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_records()), encoding="utf-8")
    path = folder / "grid.toml"
    path.write_text(GRID.format(model=insult_model_dir, prompts=prompts), encoding="utf-8")
    return path


def _store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "home" / "runs.sqlite")


def _run(store: RunStore, grid_file: Path, backend, **kw):
    events: list[SweepEvent] = []
    emit = kw.pop("emit", events.append)
    run_id, summary = run_sweep(store, load_grid(grid_file), backend, emit=emit, **kw)
    return run_id, summary, events


def _results(store: RunStore, run_id: str) -> tuple[list[dict], list[dict]]:
    """The sweep's rows (without worker and times) and every experiment's own run: its rows and generations."""
    rows = store.rows(run_id, "sweep")
    runs = []
    for r in rows:
        dump = store.dump_run(r["run_id"])
        runs.append({"summary": dump["summary"], "rows": dump["rows"], "generations": dump["generations"]})
    return [comparable(r) for r in rows], runs


@pytest.fixture(scope="module")
def local_sweep(grid_file, tmp_path_factory):
    """The 4-experiment grid run in this process: the reference every other way of running it must equal."""
    store = _store(tmp_path_factory.mktemp("local"))
    run_id, summary, events = _run(store, grid_file, LocalBackend(str(store.path.parent)))
    return store, run_id, summary, events


# ------------------------------------------------------------------------------------------------ the grid


def test_grid_expands_every_combination_with_labels_that_name_what_varies(grid_file):
    grid = load_grid(grid_file)
    assert [e.id for e in grid.experiments] == ["e000", "e001", "e002", "e003"]
    assert [e.label for e in grid.experiments] == [
        "L1,2 clamp_norm_factor=4",
        "L1,2 clamp_norm_factor=2",
        "L2 clamp_norm_factor=4",
        "L2 clamp_norm_factor=2",
    ]
    assert grid.experiments[1].hparams == {
        "mom2_update_weight": 100.0,
        "clamp_norm_factor": 2.0,
        "n_templates": 2,
    }
    assert grid.experiments[2].layers == (2,)
    cfg = grid.base_config()
    assert (cfg.generation.samples, cfg.generation.max_new_tokens, cfg.scoring.scorer) == (3, 6, "profanity")
    two = expand_grid({"models": ["a", "b"], "methods": ["memit", "ft"], "layers": ["preset"]})
    assert [e.label for e in two.experiments] == ["a memit", "a ft", "b memit", "b ft"]
    assert two.experiments[0].layers is None


def test_yaml_grid_gives_the_same_experiments(grid_file, tmp_path):
    yaml = pytest.importorskip("yaml")
    from detox_tui.pipeline.sweep import read_grid_file

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(read_grid_file(grid_file)), encoding="utf-8")
    assert load_grid(path).experiments == load_grid(grid_file).experiments


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (
            {"models": ["m"], "methods": ["memit"], "lyers": ["1"]},
            "Unknown grid key 'lyers' (did you mean 'layers'?)",
        ),
        (
            {"models": ["m"], "methods": ["memmit"]},
            "Unknown method 'memmit' in the grid (did you mean 'memit'?)",
        ),
        ({"models": ["m"], "methods": ["memit"], "layers": ["1,x"]}, "Bad layer configuration '1,x'"),
        ({"models": ["m"], "methods": ["memit"], "hparams": {"rome": {"v_lr": 1}}}, "not in its methods"),
        (
            {"models": ["m"], "methods": ["memit"], "generation": {"samples": "5"}},
            "'generation.samples' must be int",
        ),
        ({"models": ["m"], "methods": ["memit"], "generation": {"smaples": 5}}, "did you mean 'samples'"),
        ({"methods": ["memit"]}, "names no models"),
    ],
)
def test_grid_mistakes_are_one_sentence_before_anything_runs(grid, message):
    with pytest.raises(UserError, match=re.escape(message)):
        expand_grid(grid)


# ------------------------------------------------------------------------------------------------ local


def test_local_sweep_stores_each_experiment_as_its_own_edit_run(local_sweep):
    store, run_id, summary, events = local_sweep
    run = store.get_run(run_id)
    assert run["kind"] == "sweep" and run["status"] == "finished"
    assert [e["id"] for e in run["config"]["experiments"]] == ["e000", "e001", "e002", "e003"]
    # The expanded list was stored before the first experiment ran: the first event is the expansion.
    assert events[0].kind == "expanded" and events[0].total == 4
    rows = store.rows(run_id, "sweep")
    assert [r["state"] for r in rows] == ["finished"] * 4
    for r in rows:
        child = store.get_run(r["run_id"])
        assert child["kind"] == "edit" and child["status"] == "finished"
        assert child["config"]["sweep"] == run_id and child["config"]["experiment"] == r["id"]
        assert child["config"]["layers"] == r["layers"] and child["config"]["hparams"] == r["hparams"]
        # The sweep row's headline is the child's edit summary's.
        assert r["share_detoxified"] == child["summary"]["detoxified"]["share"]
        assert r["after_mean"] == child["summary"]["after_mean"]
    # Every experiment is compared with the same before samples (computed once for the model).
    befores = [[x for x in store.dump_run(r["run_id"])["rows"] if x["table"] == "before"] for r in rows]
    assert all(b == befores[0] for b in befores) and len(befores[0]) == 2
    # The edits differ: layers and clamp factors change what comes after.
    afters = {json.dumps(store.rows(r["run_id"], "edit"), sort_keys=True) for r in rows}
    assert len(afters) == 4
    assert summary["n_finished"] == 4 and summary["n_failed"] == 0


def test_sweep_experiment_equals_the_same_edit_run_alone(local_sweep, grid_file, insult_model_dir, tmp_path):
    """Sharing the before phase and the statistics changes nothing: e001 equals `run_edit` with its settings."""
    from detox_tui.pipeline.experiment import Workbench, run_edit
    from detox_tui.pipeline.sweep import experiment_config, load_items

    store, run_id, _, _ = local_sweep
    grid = load_grid(grid_file)
    exp = grid.experiments[1]
    cfg = experiment_config(grid.base_config(), exp, str(insult_model_dir))
    items, held = load_items(grid.settings)
    wb = Workbench.load(cfg, data_dir=str(tmp_path / "alone"))
    alone = run_edit(wb, items, cfg, holdout=held)
    swept = store.rows(run_id, "sweep")[1]
    assert swept["id"] == exp.id
    assert store.rows(swept["run_id"], "edit") == wb.store.rows(alone.run_id, "edit")
    assert store.get_run(swept["run_id"])["summary"] == wb.store.get_run(alone.run_id)["summary"]


def test_a_failed_experiment_is_recorded_and_the_sweep_goes_on(grid_file, tmp_path):
    text = grid_file.read_text(encoding="utf-8").replace('layers = ["1,2", "2"]', 'layers = ["1,2", "9"]')
    text = text.replace("clamp_norm_factor = [4.0, 2.0]", "clamp_norm_factor = 4.0")
    bad = tmp_path / "bad.toml"
    bad.write_text(text, encoding="utf-8")
    store = _store(tmp_path)
    run_id, summary, _ = _run(store, bad, LocalBackend(str(store.path.parent)))
    rows = store.rows(run_id, "sweep")
    assert [r["state"] for r in rows] == ["finished", "failed"]
    assert "Layer 9" in rows[1]["error"] and "out of range" in rows[1]["error"]
    assert summary["n_failed"] == 1 and store.get_run(run_id)["status"] == "finished"


def test_a_model_that_does_not_load_fails_its_experiments_and_the_sweep_goes_on(grid_file, tmp_path):
    from detox_tui.pipeline.sweep import read_grid_file

    data = read_grid_file(grid_file)
    data["models"] = [data["models"][0], str(tmp_path / "no-such-model")]
    data["layers"] = ["1,2"]
    data["hparams"]["memit"]["clamp_norm_factor"] = 4.0
    store = _store(tmp_path)
    run_id, summary = run_sweep(store, expand_grid(data), LocalBackend(str(store.path.parent)))
    rows = store.rows(run_id, "sweep")
    assert [r["state"] for r in rows] == ["finished", "failed"]
    assert "no-such-model" in rows[1]["error"] and rows[1]["run_id"] is None
    assert summary["n_finished"] == 1 and summary["n_failed"] == 1


def test_a_bad_prompt_file_is_refused_before_a_sweep_is_stored(grid_file, tmp_path):
    from detox_tui.pipeline.sweep import read_grid_file

    data = read_grid_file(grid_file)
    data["prompts"] = str(tmp_path / "missing.jsonl")
    store = _store(tmp_path)
    with pytest.raises(UserError, match="missing.jsonl"):
        run_sweep(store, expand_grid(data), LocalBackend(str(store.path.parent)))
    assert store.list_runs() == []


def test_interrupted_driver_keeps_what_finished_and_resume_runs_only_the_rest(
    local_sweep, grid_file, tmp_path
):
    store = _store(tmp_path)

    def interrupt_at_third(event: SweepEvent) -> None:
        if event.kind == "state" and event.row["id"] == "e002" and event.row["state"] == "running":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(store, grid_file, LocalBackend(str(store.path.parent)), emit=interrupt_at_third)
    sweep_id = next(r["id"] for r in store.list_runs() if r["kind"] == "sweep")
    assert store.get_run(sweep_id)["status"] == "cancelled"
    first = {r["id"]: r for r in store.rows(sweep_id, "sweep")}
    assert [first[i]["state"] for i in sorted(first)] == ["finished", "finished", "cancelled", "pending"]

    started: list[str] = []
    run_id, summary, _ = _run(
        store,
        grid_file,
        LocalBackend(str(store.path.parent)),
        resume=sweep_id,
        emit=lambda e: e.kind == "state" and e.row["state"] == "running" and started.append(e.row["id"]),
    )
    assert run_id == sweep_id and started == ["e002", "e003"]
    rows = store.rows(sweep_id, "sweep")
    assert [r["run_id"] for r in rows[:2]] == [first["e000"]["run_id"], first["e001"]["run_id"]]
    assert store.get_run(sweep_id)["status"] == "finished" and summary["n_finished"] == 4
    # Field by field what an uninterrupted sweep stores.
    ref_store, ref_id, _, _ = local_sweep
    assert _results(store, sweep_id) == _results(ref_store, ref_id)


# ------------------------------------------------------------------------------------------------ ray


@pytest.fixture(scope="module")
def ray():
    return pytest.importorskip("ray")


def test_ray_backend_gives_the_same_rows_as_local(ray, local_sweep, grid_file, tmp_path):
    from detox_tui.pipeline.sweep_ray import RayBackend

    store = _store(tmp_path)
    backend = RayBackend(workers=2, cpus_per_worker=1, data_dir=str(store.path.parent))
    run_id, summary, _ = _run(store, grid_file, backend)
    assert not ray.is_initialized()  # the local instance it started is shut down
    rows = store.rows(run_id, "sweep")
    assert {r["worker"] for r in rows} == {"ray:0", "ray:1"}  # both actors worked
    ref_store, ref_id, ref_summary, _ = local_sweep
    assert _results(store, run_id) == _results(ref_store, ref_id)
    assert summary == ref_summary


def test_a_killed_actor_costs_one_retry_and_the_sweep_completes(ray, local_sweep, grid_file, tmp_path):
    from detox_tui.pipeline.sweep_ray import RayBackend

    store = _store(tmp_path)
    messages: list[str] = []
    backend = RayBackend(
        workers=2, cpus_per_worker=1, data_dir=str(store.path.parent), log_message=messages.append
    )
    killed: list[str] = []

    def kill_first_running(event: SweepEvent) -> None:
        if event.kind == "state" and event.row["state"] == "running" and not killed:
            killed.append(event.row["id"])
            ray.kill(backend.actors[event.row["worker"]])  # the experiment is on it now

    run_id, summary, _ = _run(store, grid_file, backend, emit=kill_first_running)
    rows = {r["id"]: r for r in store.rows(run_id, "sweep")}
    assert summary["n_finished"] == 4 and all(r["state"] == "finished" for r in rows.values())
    assert rows[killed[0]]["attempts"] == 2
    assert any("was lost" in m for m in messages)
    ref_store, ref_id, _, _ = local_sweep
    assert _results(store, run_id) == _results(ref_store, ref_id)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_dry_run_shows_the_experiments_and_stores_nothing(grid_file, tmp_path, capsys):
    rc = main(["sweep", str(grid_file), "--dry-run", "--json", "--data-dir", str(tmp_path / "h")])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and [e["id"] for e in out["experiments"]] == ["e000", "e001", "e002", "e003"]
    assert (
        out["experiments"][2]["layers"] == [2]
        and out["experiments"][1]["hparams"]["clamp_norm_factor"] == 2.0
    )
    assert RunStore(tmp_path / "h" / "runs.sqlite").list_runs() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sweep"], "Give a grid file, or --resume RUN_ID"),
        (["sweep", "nope.toml"], "The grid file 'nope.toml' does not exist."),
        (["sweep", "GRID", "--backend", "slurm"], "Unknown --backend 'slurm'; use local or ray."),
        (["sweep", "GRID", "--address", "auto"], "--address needs --backend ray."),
    ],
)
def test_cli_sweep_mistakes_are_one_line_exit_2(args, message, grid_file, capsys):
    args = [str(grid_file) if a == "GRID" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_example_grid_runs_on_the_demo_model_and_exports(tmp_path, capsys):
    """examples/sweep.toml runs with no download; its table exports like any run's, and an edit detoxifies."""
    home = str(tmp_path / "h")
    out = tmp_path / "sweep.csv"
    rc = main(
        ["sweep", str(ROOT / "examples" / "sweep.toml"), "--json", "--data-dir", home, "--out", str(out)]
    )
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    rows = result["experiments"]
    assert len(rows) == len(load_grid(ROOT / "examples" / "sweep.toml").experiments)
    assert all(r["state"] == "finished" for r in rows)
    assert result["summary"]["best"] is not None and result["summary"]["best_share_detoxified"] > 0.5
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(rows) + 1
    assert lines[0].startswith("id,experiment,model,method,state,detoxified,detoxified 95% CI low")
    assert [line.split(",")[0] for line in lines[1:]] == [r["id"] for r in rows]


def test_cli_sigint_stores_the_sweep_cancelled_and_resume_finishes_it(grid_file, tmp_path):
    """A real Ctrl-C (SIGINT) to a headless sweep: exit 130, the resume command named, finished experiments kept."""
    home = tmp_path / "h"
    env = {**os.environ, "DETOX_TUI_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "detox_tui", "sweep", str(grid_file), "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    store = RunStore(home / "runs.sqlite")
    deadline = time.time() + 240
    while time.time() < deadline:
        runs = [r for r in store.list_runs() if r["kind"] == "sweep"] if store.path.exists() else []
        if runs and any(r["state"] == "finished" for r in store.rows(runs[0]["id"], "sweep")):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    sweep_id = runs[0]["id"]
    assert f"detox-tui sweep --resume {sweep_id}" in err
    assert store.get_run(sweep_id)["status"] == "cancelled"
    states = [r["state"] for r in store.rows(sweep_id, "sweep")]
    assert "finished" in states and set(states) != {"finished"}
    # What the CLI's --resume does, in this process (the experiments left, then the sweep finished).
    run_sweep(store, load_grid(grid_file), LocalBackend(str(home)), data_dir=str(home), resume=sweep_id)
    assert [r["state"] for r in store.rows(sweep_id, "sweep")] == ["finished"] * 4
    assert store.get_run(sweep_id)["status"] == "finished"
