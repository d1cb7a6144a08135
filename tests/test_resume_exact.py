"""A stopped run, resumed, gives what an uninterrupted run gives, field by field; a resume with other settings and
errors a user can cause are refused before any run is stored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from detox_tui.config import ExperimentConfig, GenerationConfig, ModelConfig, ScoringConfig, SideEffectConfig
from detox_tui.errors import Cancelled, UserError
from detox_tui.events import RowReady
from detox_tui.pipeline.results import jsonable
from detox_tui.pipeline.store import RunStore
from detox_tui.prompts.base import PromptItem
from detox_tui.tiny import HELDOUT_PROMPTS, INSULT_PAIRS

TINY_MEMIT = {"mom2_update_weight": 100.0, "clamp_norm_factor": 4.0, "n_templates": 2}


def items(n: int = len(INSULT_PAIRS)) -> list[PromptItem]:
    return [PromptItem(p, target=" " + safe.split()[0], category="insult") for p, _, safe in INSULT_PAIRS[:n]]


def eight_items() -> list[PromptItem]:
    return items() + [PromptItem(p, target=" fine") for p in HELDOUT_PROMPTS]


def config(model_dir, **kw) -> ExperimentConfig:
    # Three prompts per batch: chunks [0, 1, 2], [3, 4, 5], [6, 7], so stops fall inside and between chunks.
    cfg = ExperimentConfig(
        model=ModelConfig(name=str(model_dir), device="cpu", dtype="float32"),
        generation=GenerationConfig(samples=4, max_new_tokens=6, seed=7, batch_size=3, greedy=True),
        scoring=ScoringConfig(scorer="profanity"),
        side_effects=SideEffectConfig(max_tokens=256),
    )
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture
def workbench(insult_model_dir, tmp_path):
    from detox_tui.pipeline.experiment import Workbench

    return Workbench.load(config(insult_model_dir), data_dir=str(tmp_path / "home"))


class Stop(Exception):
    """Raised from the event callback: the run dies there, as a crash would."""


def stop_after(table: str, n: int, how: str, cancel: threading.Event | None = None):
    """An event callback that stops the run after the n-th row of ``table``: by raising (a crash), by Ctrl+C
    (KeyboardInterrupt) or by setting the cancel flag (the app's Stop button)."""
    seen = []

    def emit(event):
        if isinstance(event, RowReady) and event.table == table:
            seen.append(event.row)
            if len(seen) == n:
                if how == "raise":
                    raise Stop(f"stopped after {n} {table} rows")
                if how == "interrupt":
                    raise KeyboardInterrupt
                cancel.set()

    return emit


def stored(store: RunStore, run_id: str) -> dict:
    """Everything a run stored, in a form that does not depend on the order it was written in."""
    run = store.get_run(run_id)
    rows = {}
    for table in store.tables(run_id):
        rows[table] = sorted(json.dumps(r, sort_keys=True) for r in store.rows(run_id, table))
    gens = sorted(
        (g["phase"], g["config_key"], g["prompt_idx"], g["sample_idx"], g["text"], json.dumps(g["scores"]))
        for g in store.generations(run_id)
    )
    return {
        "status": run["status"],
        "error": run["error"],
        "summary": run["summary"],
        "rows": rows,
        "gens": gens,
    }


def same_result(a, b, store: RunStore) -> None:
    assert jsonable(b.rows) == jsonable(a.rows)
    assert jsonable(b.summary) == jsonable(a.summary)
    assert jsonable(b.configs) == jsonable(a.configs)
    assert jsonable(b.side_effects) == jsonable(a.side_effects)
    assert stored(store, b.run_id) == stored(store, a.run_id)


def interrupted(workbench, run, emit, cancel, how: str) -> str:
    errors = {"raise": Stop, "interrupt": KeyboardInterrupt, "cancel": Cancelled}
    with pytest.raises(errors[how]):
        run(emit=emit, cancel=cancel)
    newest = workbench.store.list_runs()[0]
    assert newest["status"] == ("failed" if how == "raise" else "cancelled")
    return newest["id"]


# ------------------------------------------------------------------------------------------ baseline


@pytest.mark.parametrize("n_rows, how", [(1, "raise"), (3, "cancel"), (4, "interrupt"), (7, "raise")])
def test_a_resumed_baseline_equals_an_uninterrupted_one(workbench, insult_model_dir, n_rows, how):
    from detox_tui.pipeline.experiment import run_baseline

    cfg = config(insult_model_dir)
    cfg.generation.temperature = 1.5  # the trained prompts are near-deterministic at 1.0
    whole = run_baseline(workbench, eight_items(), cfg)
    cancel = threading.Event()
    emit = stop_after("baseline", n_rows, how, cancel)
    run_id = interrupted(
        workbench, lambda **kw: run_baseline(workbench, eight_items(), cfg, **kw), emit, cancel, how
    )
    assert len(workbench.store.rows(run_id, "baseline")) == n_rows
    new_rows = []
    resumed = run_baseline(
        workbench,
        eight_items(),
        cfg,
        resume=run_id,
        emit=lambda e: new_rows.append(e.row["idx"]) if isinstance(e, RowReady) else None,
    )
    assert resumed.run_id == run_id
    assert sorted(new_rows) == list(range(n_rows, 8))  # only what was missing is stored again
    same_result(whole, resumed, workbench.store)
    assert workbench.store.get_run(run_id)["error"] is None  # the crash's error is gone


# ------------------------------------------------------------------------------------------ edit


@pytest.mark.parametrize(
    "protocol, table, n_rows, how",
    [
        ("per-prompt", "before", 2, "raise"),  # inside the first chunk of the before phase
        ("per-prompt", "before", 4, "interrupt"),  # inside the second chunk
        ("per-prompt", "edit", 2, "cancel"),  # between edits
        ("batch", "before", 1, "cancel"),
        ("batch", "edit", 3, "raise"),  # while the one batch edit's rows are stored
    ],
)
def test_a_resumed_edit_equals_an_uninterrupted_one(
    workbench, insult_model_dir, protocol, table, n_rows, how
):
    from detox_tui.pipeline.experiment import run_edit

    cfg = config(insult_model_dir, method="memit", layers=[1, 2], protocol=protocol, hparams=TINY_MEMIT)
    cfg.generation.samples = 3
    cfg.generation.temperature = 1.5
    prompts = items(5)
    whole = run_edit(workbench, prompts, cfg)
    cancel = threading.Event()
    emit = stop_after(table, n_rows, how, cancel)
    run_id = interrupted(workbench, lambda **kw: run_edit(workbench, prompts, cfg, **kw), emit, cancel, how)
    resumed = run_edit(workbench, prompts, cfg, resume=run_id)
    assert resumed.run_id == run_id
    same_result(whole, resumed, workbench.store)


def test_each_prompt_of_a_per_prompt_edit_draws_its_own_after_samples(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_edit

    # The same prompt twice gets the same edit; its after samples differ only if each prompt has its own stream.
    cfg = config(insult_model_dir, method="memit", layers=[1, 2], protocol="per-prompt", hparams=TINY_MEMIT)
    cfg.generation = GenerationConfig(samples=6, max_new_tokens=8, seed=3, batch_size=3, temperature=1.5)
    twice = [items(1)[0], items(1)[0]]
    rows = run_edit(workbench, twice, cfg).rows
    assert rows[0]["generations_before"] != rows[1]["generations_before"]
    assert rows[0]["generations_after"] != rows[1]["generations_after"]


# ------------------------------------------------------------------------------------------ ablation


@pytest.mark.parametrize("n_rows, how", [(1, "raise"), (4, "cancel"), (3, "interrupt")])
def test_a_resumed_ablation_equals_an_uninterrupted_one(workbench, insult_model_dir, n_rows, how):
    from detox_tui.pipeline.experiment import run_ablation

    # A collapse factor of 1.0 flags every edit that raises the perplexity: the flags must survive the stop.
    cfg = config(insult_model_dir, method="memit", protocol="per-prompt", hparams=TINY_MEMIT)
    cfg.generation.samples = 3
    cfg.side_effects = SideEffectConfig(max_tokens=256, collapse_factor=1.0)
    prompts = items(3)
    configs = [[1], [2], [1, 2]]
    whole = run_ablation(workbench, prompts, cfg, configs)
    assert any(c["n_collapsed"] for c in whole.configs)
    cancel = threading.Event()
    emit = stop_after("edit", n_rows, how, cancel)  # 3 rows per configuration: inside or between them
    run_id = interrupted(
        workbench, lambda **kw: run_ablation(workbench, prompts, cfg, configs, **kw), emit, cancel, how
    )
    resumed = run_ablation(workbench, prompts, cfg, configs, resume=run_id)
    same_result(whole, resumed, workbench.store)


# ------------------------------------------------------------------------------------------ refusals


def test_a_resume_with_other_settings_or_prompts_is_refused_before_any_work(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_baseline, run_edit

    cfg = config(insult_model_dir)
    with pytest.raises(Stop):
        run_baseline(workbench, eight_items(), cfg, emit=stop_after("baseline", 2, "raise"))
    run_id = workbench.store.list_runs()[0]["id"]
    before = stored(workbench.store, run_id)

    def refused(prompts, changed) -> str:
        with pytest.raises(UserError) as exc:
            run_baseline(workbench, prompts, changed, resume=run_id)
        assert stored(workbench.store, run_id) == before  # nothing written, status and error untouched
        message = str(exc.value)
        assert "\n" not in message and run_id in message
        return message

    other = config(insult_model_dir)
    other.generation.samples = 5
    other.generation.seed = 8
    message = refused(eight_items(), other)
    assert "--samples and --seed differ" in message
    assert "--prompts" in refused(eight_items()[:2], config(insult_model_dir))
    changed_target = eight_items()
    changed_target[0] = PromptItem(changed_target[0].prompt, target=" other")
    assert "--prompts" in refused(changed_target, config(insult_model_dir))
    scorer = config(insult_model_dir)
    scorer.scoring.threshold = 0.5
    assert "--threshold" in refused(eight_items(), scorer)
    with pytest.raises(UserError, match="is a baseline run"):
        run_edit(workbench, items(2), config(insult_model_dir, method="memit", layers=[1]), resume=run_id)
    # Where the run happens is not what it computes: another device name resumes.
    moved = config(insult_model_dir)
    moved.model.device = "auto"
    assert run_baseline(workbench, eight_items(), moved, resume=run_id).run_id == run_id


def test_a_resumed_edit_refuses_other_hyperparameters_and_holdout(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_edit

    cfg = config(insult_model_dir, method="memit", layers=[1, 2], protocol="batch", hparams=TINY_MEMIT)
    held = [PromptItem(p, target=" fine") for p in HELDOUT_PROMPTS]
    with pytest.raises(Stop):
        run_edit(workbench, items(2), cfg, holdout=held, emit=stop_after("before", 1, "raise"))
    run_id = workbench.store.list_runs()[0]["id"]
    other = config(
        insult_model_dir,
        method="memit",
        layers=[1, 2],
        protocol="batch",
        hparams={**TINY_MEMIT, "n_templates": 3},
    )
    with pytest.raises(UserError, match="--hparam n_templates differs"):
        run_edit(workbench, items(2), other, holdout=held, resume=run_id)
    with pytest.raises(UserError, match="--holdout and --prompts differ"):
        run_edit(workbench, items(2), cfg, holdout=held[:1], resume=run_id)
    assert workbench.store.get_run(run_id)["status"] == "failed"


# ------------------------------------------------------------------------------------------ errors before work


def _no_run_after(workbench, call, match: str) -> None:
    with pytest.raises(UserError, match=match) as exc:
        call()
    assert "\n" not in str(exc.value)
    assert workbench.store.list_runs() == []


def test_input_errors_are_refused_before_a_run_is_created(workbench, insult_model_dir, tmp_path):
    from detox_tui.pipeline.experiment import run_ablation, run_baseline, run_edit

    def edit(**kw):
        cfg = config(insult_model_dir, method="memit", layers=[1], hparams=TINY_MEMIT)
        for key, value in kw.items():
            setattr(cfg, key, value)
        return lambda: run_edit(workbench, items(2), cfg)

    missing = str(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    _no_run_after(workbench, edit(stats_corpus=missing), "missing.txt' does not exist")
    _no_run_after(workbench, edit(side_effects=SideEffectConfig(neutral_corpus=missing)), "does not exist")
    _no_run_after(workbench, edit(side_effects=SideEffectConfig(neutral_prompts=str(empty))), "no prompts")
    _no_run_after(workbench, edit(hparams={**TINY_MEMIT, "clamp_norm_factor": float("nan")}), "finite")
    _no_run_after(workbench, edit(hparams={"no_such_thing": 1}), "Unknown memit hyperparameter")
    cfg = config(insult_model_dir, method="memit", layers=[1], hparams=TINY_MEMIT, stats_corpus=missing)
    _no_run_after(workbench, lambda: run_ablation(workbench, items(2), cfg, [[1], [2]]), "does not exist")
    held = [PromptItem("held out", target=" fine")]
    per_prompt = config(insult_model_dir, method="memit", layers=[1], hparams=TINY_MEMIT)
    _no_run_after(workbench, lambda: run_edit(workbench, items(2), per_prompt, holdout=held), "--holdout")
    hot = config(insult_model_dir)
    hot.generation.temperature = 0.0
    _no_run_after(workbench, lambda: run_baseline(workbench, items(2), hot), "temperature")


def test_a_generation_that_cannot_fit_in_memory_is_refused_before_a_run_is_created(
    workbench, insult_model_dir
):
    from detox_tui.pipeline.experiment import run_baseline, run_edit

    huge = config(insult_model_dir)
    huge.generation.samples = 1_000_000
    _no_run_after(workbench, lambda: run_baseline(workbench, items(2), huge), r"needs about .* available")
    edit = config(insult_model_dir, method="memit", layers=[1], hparams=TINY_MEMIT)
    edit.generation = huge.generation
    _no_run_after(workbench, lambda: run_edit(workbench, items(2), edit), "fewer --samples")
    # Ordinary settings pass.
    assert run_baseline(workbench, items(2), config(insult_model_dir)).summary["n_prompts"] == 2


def test_the_cli_refuses_a_huge_sample_count_in_one_line(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    env = {**os.environ, "DETOX_TUI_HOME": str(data), "HF_HUB_OFFLINE": "1", "DETOX_TUI_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "detox_tui",
        "baseline",
        "--model",
        str(tiny_model_dir),
        "--scorer",
        "profanity",
    ]
    cmd += ["--device", "cpu", "--samples", "1000000", "--limit", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Generating 1000000 samples")
    assert RunStore.open(str(data)).list_runs() == []


# ------------------------------------------------------------------------------------------ real signals


def _cli(data, model_dir, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "detox_tui", "baseline", "--model", str(model_dir), "--scorer", "profanity"]
    cmd += ["--device", "cpu", "--samples", "40", "--max-new-tokens", "12", "--batch-size", "2"]
    cmd += ["--seed", "5", "--prompts", str(data / "prompts.txt"), "--json", *extra]
    return cmd


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signalled_baseline_resumes_to_the_uninterrupted_table(tmp_path, tiny_model_dir, signum, code):
    data = tmp_path / "data"
    data.mkdir()
    (data / "prompts.txt").write_text(
        "\n".join(f"{word} number {i} is" for i in range(30) for word in ["The"]) + "\n", encoding="utf-8"
    )
    env = {**os.environ, "DETOX_TUI_HOME": str(data), "HF_HUB_OFFLINE": "1", "DETOX_TUI_THREADS": "1"}
    store = RunStore.open(str(data))
    proc = subprocess.Popen(
        _cli(data, tiny_model_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180
        run_id = None
        while time.monotonic() < deadline and proc.poll() is None:
            runs = store.list_runs()
            if runs and len(store.rows(runs[0]["id"], "baseline")) >= 3:
                run_id = runs[0]["id"]
                break
            time.sleep(0.05)
        assert run_id is not None, "the run finished or never started before the signal"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1].startswith(f"interrupted; run {run_id} is stored as cancelled")
    run = store.get_run(run_id)
    assert run["status"] == "cancelled" and run["error"] is None
    done = len(store.rows(run_id, "baseline"))
    assert 3 <= done < 30

    resumed = subprocess.run(
        _cli(data, tiny_model_dir, "--resume", run_id), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run(_cli(data, tiny_model_dir), env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    a, b = json.loads(whole.stdout), json.loads(resumed.stdout)
    assert b["run_id"] == run_id and a["run_id"] != run_id
    assert b["rows"] == a["rows"] and b["summary"] == a["summary"]
    sa, sb = stored(store, a["run_id"]), stored(store, run_id)
    assert sb == sa and sb["status"] == "finished" and sb["error"] is None
