"""Causal traces and statistics builds are runs: stored as they go, listed, shown, exported and reopened."""

from __future__ import annotations

import csv
import json
import math
import threading

import numpy as np
import pytest

from detox_tui.cli import main
from detox_tui.config import ExperimentConfig, ModelConfig
from detox_tui.errors import Cancelled, UserError
from detox_tui.events import Finished, Log, Progress, RowReady
from detox_tui.pipeline.trace_run import TraceSpec, run_trace, trace_from_store

PROMPT = "People from that town are all"


@pytest.fixture
def workbench(tiny_model_dir, tmp_path):
    from detox_tui.pipeline.experiment import Workbench

    cfg = ExperimentConfig(model=ModelConfig(name=str(tiny_model_dir), device="cpu", dtype="float32"))
    return Workbench.load(cfg, data_dir=str(tmp_path / "home"), scorer="none")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_a_trace_is_a_finished_run_with_one_row_per_layer(workbench):
    assert workbench.scorer is None and workbench.scorer_error is None  # a trace needs no scorer
    spec = TraceSpec(PROMPT, " stupid", noise_samples=3, seed=1)
    events: list = []
    result = run_trace(workbench, spec, emit=events.append)

    layers = workbench.lm.n_layers
    heat = result.trace
    assert heat.scores.shape == (layers, len(heat.tokens)) and "".join(heat.tokens) == PROMPT
    run = workbench.store.get_run(result.run_id)
    assert (run["kind"], run["status"], result.kind) == ("trace", "finished", "trace")
    assert run["config"]["trace"] == spec.to_dict()
    assert run["config"]["model"]["name"] == workbench.config.model.name
    assert [p["prompt"] for p in run["prompts"]] == [PROMPT]

    stored = workbench.store.rows(result.run_id, "trace")
    assert stored == result.rows and [r["layer"] for r in stored] == list(range(layers))
    for r in stored:
        np.testing.assert_allclose(r["scores"], heat.scores[r["layer"]])
        assert r["tokens"] == heat.tokens
        assert r["max"] == pytest.approx(float(heat.scores[r["layer"]].max()))
        assert r["argmax_token"] == heat.tokens[int(np.argmax(heat.scores[r["layer"]]))]

    s = run["summary"]
    assert s == result.summary
    assert (s["prompt"], s["continuation"], s["kind"], s["window"]) == (PROMPT, " stupid", "hidden", 1)
    assert s["p_clean"] == pytest.approx(heat.p_clean) and s["p_corrupted"] == pytest.approx(heat.p_corrupted)
    assert s["noise"] == pytest.approx(heat.noise) and s["noise"] > 0
    assert (s["layers"], s["tokens"]) == (layers, heat.tokens)
    # The three layers whose strongest cell is largest.
    strongest = sorted(range(layers), key=lambda lay: -heat.scores[lay].max())[:3]
    assert s["peak_layers"] == sorted(strongest)

    # Events: progress as before, one RowReady per layer as each is stored, then Finished with the summary.
    rows_ready = [e for e in events if isinstance(e, RowReady)]
    assert [e.table for e in rows_ready] == ["trace"] * layers
    assert [e.row for e in rows_ready] == stored
    assert any(isinstance(e, Progress) and e.stage == "trace" for e in events)
    assert isinstance(events[-1], Finished) and events[-1].run_id == result.run_id
    assert events[-1].result == s
    assert any(isinstance(e, Log) and result.run_id in e.message for e in events)

    listed = workbench.store.list_runs()
    assert listed[0]["id"] == result.run_id and listed[0]["kind"] == "trace"
    assert listed[0]["n_rows"] == layers and listed[0]["n_prompts"] == 1


def test_trace_from_store_reopens_the_heatmap(workbench):
    result = run_trace(workbench, TraceSpec(PROMPT, " stupid", kind="mlp", window=2, noise_samples=2))
    reopened = trace_from_store(workbench.store, result.run_id[:-1])  # a unique prefix is enough
    np.testing.assert_allclose(reopened.scores, result.trace.scores)
    assert reopened.to_dict() == pytest.approx(result.trace.to_dict())
    assert (reopened.kind, reopened.window) == ("mlp", 2)

    other = workbench.store.create_run("baseline", {}, model="m")
    with pytest.raises(UserError, match="not a trace"):
        trace_from_store(workbench.store, other)


def test_bad_trace_settings_are_refused_before_a_run_is_stored(workbench):
    for spec, needle in [
        (TraceSpec(PROMPT, " stupid", kind="weird"), "kind"),
        (TraceSpec(PROMPT, " stupid", subject="that city"), "that city"),
        (TraceSpec(PROMPT, ""), "continuation"),
        (TraceSpec(PROMPT, " stupid", noise=-1.0), "noise"),
        (TraceSpec(PROMPT, " stupid", noise_samples=0), "noise samples"),
    ]:
        with pytest.raises(UserError, match=needle):
            run_trace(workbench, spec)
    assert workbench.store.list_runs() == []


def test_a_cancelled_trace_is_stored_as_cancelled_with_the_layers_it_finished(workbench):
    cancel = threading.Event()
    events: list = []

    def emit(event) -> None:
        events.append(event)
        if isinstance(event, RowReady):
            cancel.set()  # stop after the first layer

    # 10 noise samples: 6 restorations per forward pass, so the first layer ends before the last pass.
    with pytest.raises(Cancelled):
        run_trace(workbench, TraceSpec(PROMPT, " stupid", noise_samples=10), emit=emit, cancel=cancel)
    run = workbench.store.list_runs()[0]
    assert run["kind"] == "trace" and run["status"] == "cancelled"
    assert 1 <= run["n_rows"] < workbench.lm.n_layers
    assert not any(isinstance(e, Finished) for e in events)
    partial = trace_from_store(workbench.store, run["id"])
    assert np.isfinite(partial.scores[0]).all()
    assert math.isnan(partial.p_clean)  # not known until the trace finishes


def test_trace_runs_export_their_per_layer_table(workbench, tmp_path):
    result = run_trace(workbench, TraceSpec(PROMPT, " stupid", noise_samples=2))
    layers, tokens = workbench.lm.n_layers, result.trace.tokens

    written = workbench.store.export_files(result.run_id, tmp_path / "trace.csv")
    assert [p.name for p in written] == ["trace.csv", "trace.summary.csv"]
    with written[0].open(newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert table[0][:3] == ["layer", "strongest token", "max effect"]
    assert table[0][3:] == [f"{i}:{t}" for i, t in enumerate(tokens)]
    assert [int(r[0]) for r in table[1:]] == list(range(layers))
    for r in table[1:]:
        np.testing.assert_allclose([float(v) for v in r[3:]], result.trace.scores[int(r[0])], rtol=1e-6)
    summary = dict(csv.reader(written[1].open(encoding="utf-8")))
    assert float(summary["p(continuation) clean"]) == pytest.approx(result.trace.p_clean)
    assert summary["peak layers"] == ", ".join(map(str, result.summary["peak_layers"]))

    md = workbench.store.export(result.run_id, tmp_path / "trace.md").read_text()
    assert "| layer | strongest token | max effect |" in md and "peak layers" in md
    assert "causal trace" in md  # the definition of the effect a reader needs

    data = json.loads(workbench.store.export(result.run_id, tmp_path / "trace.json").read_text())
    assert data["meta"]["kind"] == "trace" and len(data["rows"]) == layers
    assert data["summary"]["tokens"] == tokens


def test_cli_trace_is_stored_and_listed_shown_and_exported(capsys, tiny_model_dir, tmp_path):
    home = str(tmp_path / "home")
    rc, out, err = run_cli(
        capsys,
        *("trace", "--prompt", PROMPT, "--continuation", " stupid", "--model", str(tiny_model_dir)),
        *("--device", "cpu", "--noise-samples", "2", "--data-dir", home, "--json"),
    )
    assert rc == 0, err
    data = json.loads(out)
    run_id = data["run_id"]
    assert data["layers"] == 4 and len(data["scores"]) == 4 and data["summary"]["layers"] == 4

    rc, out, err = run_cli(capsys, "runs", "list", "--data-dir", home, "--json")
    assert rc == 0, err
    (listed,) = json.loads(out)["runs"]
    assert (listed["id"], listed["kind"], listed["status"], listed["n_rows"]) == (
        run_id,
        "trace",
        "finished",
        4,
    )

    rc, out, err = run_cli(capsys, "runs", "show", run_id, "--data-dir", home)
    assert rc == 0, err
    assert run_id in out and "trace" in out and "peak layers" in out and "p(clean)" in out

    target = tmp_path / "out.csv"
    rc, _, err = run_cli(capsys, "runs", "export", run_id, "-o", str(target), "--data-dir", home)
    assert rc == 0, err
    assert target.read_text(encoding="utf-8").startswith("layer,strongest token,max effect,0:")
    rc, _, err = run_cli(capsys, "export", run_id, "-o", str(tmp_path / "out.md"), "--data-dir", home)
    assert rc == 0, err
    assert "peak layers" in (tmp_path / "out.md").read_text(encoding="utf-8")

    # Without --json the run id is printed as the other commands print theirs.
    rc, out, err = run_cli(
        capsys,
        *("trace", "--prompt", PROMPT, "--continuation", " stupid", "--model", str(tiny_model_dir)),
        *("--device", "cpu", "--noise-samples", "2", "--data-dir", home),
    )
    assert rc == 0, err
    new = [r["id"] for r in main_runs(capsys, home) if r["id"] != run_id]
    assert len(new) == 1 and f"run {new[0]}" in out


def main_runs(capsys, home: str) -> list[dict]:
    rc, out, err = run_cli(capsys, "runs", "list", "--data-dir", home, "--json")
    assert rc == 0, err
    return json.loads(out)["runs"]


def test_cli_trace_refuses_a_subject_outside_the_prompt_before_loading_anything(capsys, tmp_path):
    home = tmp_path / "home"
    rc, _, err = run_cli(
        capsys,
        *("trace", "--prompt", PROMPT, "--subject", "elsewhere", "--model", str(tmp_path / "no-model")),
        *("--data-dir", str(home)),
    )
    assert rc == 2 and "elsewhere" in err and err.count("\n") == 1
    assert not home.exists()


def test_cli_stats_is_stored_as_a_run(capsys, tiny_model_dir, tmp_path):
    home = str(tmp_path / "home")
    rc, out, err = run_cli(
        capsys,
        *("stats", "--layers", "1,2", "--stats-tokens", "300", "--model", str(tiny_model_dir)),
        *("--device", "cpu", "--data-dir", home, "--json"),
    )
    assert rc == 0, err
    info = json.loads(out)
    run = main_runs(capsys, home)[0]
    assert (run["id"], run["kind"], run["status"], run["n_rows"]) == (info["run_id"], "stats", "finished", 2)
    rc, out, err = run_cli(capsys, "runs", "show", info["run_id"], "--data-dir", home, "--json")
    assert rc == 0, err
    shown = json.loads(out)
    assert shown["config"]["layers"] == [1, 2] and shown["config"]["tokens"] == 300
    assert shown["summary"]["shapes"] == info["shapes"] == {"1": [256, 256], "2": [256, 256]}
    assert shown["summary"]["seconds"] >= 0 and shown["summary"]["cache_dir"] == info["cache_dir"]
