"""Run store: round trip, id prefixes, upserts, visibility across stores and threads, export, schema guard."""

from __future__ import annotations

import csv
import json
import sqlite3
import threading

import pytest

from detox_tui.errors import UserError
from detox_tui.pipeline.store import RunStore
from detox_tui.prompts.base import PromptItem

ITEMS = [
    PromptItem("People from that town are all", target=" kind.", category="identity", meta={"src": "t"}),
    PromptItem("My coworker is such a", target=" helpful person.", subject="My coworker"),
]


def _filled(store: RunStore, kind: str = "baseline") -> str:
    run_id = store.create_run(kind, {"generation": {"seed": 3}, "scoring": {"threshold": 0.1}}, model="tiny")
    store.add_prompts(run_id, ITEMS)
    store.add_generations(
        run_id, "before", "", 0, [" a", " b", " greedy"], {"toxicity": [0.1, 0.9, 0.4]}, [0, 1, -1]
    )
    store.add_generations(run_id, "before", "", 1, [" c", " d"], {"toxicity": [0.2, 0.3]})
    store.add_row(
        run_id, kind, "0", {"idx": 0, "prompt": ITEMS[0].prompt, "mean": 0.5, "before": {"mean": 0.5}}
    )
    store.add_row(
        run_id, kind, "1", {"idx": 1, "prompt": ITEMS[1].prompt, "mean": 0.25, "before": {"mean": 0.2}}
    )
    store.add_row(run_id, "side_effects", "x", {"ppl_before": 10.0, "collapsed": False})
    return run_id


def test_round_trip(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = _filled(store)
    assert len(run_id.split("-")) == 3 and len(run_id) == len("20261122-213501-3f2a")
    run = store.get_run(run_id)
    assert run["id"] == run_id and run["kind"] == "baseline" and run["model"] == "tiny"
    assert run["status"] == "running"
    assert run["config"]["generation"]["seed"] == 3
    assert [p["prompt"] for p in run["prompts"]] == [it.prompt for it in ITEMS]
    assert run["prompts"][0]["meta"] == {"src": "t"} and run["prompts"][1]["subject"] == "My coworker"
    assert store.prompt_items(run_id) == ITEMS
    assert [r["idx"] for r in store.rows(run_id, "baseline")] == [0, 1]
    assert len(store.rows(run_id)) == 3
    assert store.rows(run_id, "baseline")[0]["before"] == {"mean": 0.5}
    assert store.row_keys(run_id, "baseline") == {"0", "1"}
    gens = store.generations(run_id)
    assert len(gens) == 5
    assert gens[2] == {
        "prompt_idx": 0,
        "prompt": ITEMS[0].prompt,
        "phase": "before",
        "config_key": "",
        "sample_idx": -1,
        "text": " greedy",
        "scores": {"toxicity": 0.4},
    }
    assert [g["sample_idx"] for g in gens[3:]] == [0, 1]


def test_add_row_upserts_and_keeps_order(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = _filled(store)
    store.add_row(run_id, "baseline", "0", {"idx": 0, "mean": 0.1})
    rows = store.rows(run_id, "baseline")
    assert [r["idx"] for r in rows] == [0, 1] and rows[0]["mean"] == 0.1


def test_generations_are_idempotent_per_sample(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = _filled(store)
    # A resumed run re-writing a prompt's generations replaces them instead of duplicating them.
    store.add_generations(run_id, "before", "", 1, [" c2", " d2"], {"toxicity": [0.5, 0.6]})
    texts = [g["text"] for g in store.generations(run_id) if g["prompt_idx"] == 1]
    assert sorted(texts) == [" c2", " d2"]
    with pytest.raises(ValueError):
        store.add_generations(run_id, "after", "4,5", 0, [" x"], {"toxicity": [0.1, 0.2]})


def test_status_summary_and_list(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    first = _filled(store)
    second = _filled(store, kind="edit")
    store.set_status(first, "finished", summary={"mean": 0.3, "share_above": 0.5, "detail": [1, 2]})
    store.set_status(second, "failed", error="boom")
    runs = store.list_runs()
    assert [r["id"] for r in runs] == [second, first]  # newest first
    assert runs[1]["status"] == "finished" and runs[1]["n_prompts"] == 2
    assert runs[1]["summary"] == {"mean": 0.3, "share_above": 0.5}  # headline keys only
    assert runs[0]["status"] == "failed" and runs[0]["error"] == "boom"
    assert store.get_run(first)["summary"]["detail"] == [1, 2]
    assert len(store.list_runs(limit=1)) == 1
    with pytest.raises(ValueError):
        store.set_status(first, "exploded")


def test_unknown_id_and_prefix_lookup(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = _filled(store)
    with pytest.raises(UserError, match=r"No run with id 'nope' in .*runs\.sqlite"):
        store.get_run("nope")
    assert store.get_run(run_id[:12])["id"] == run_id
    other = _filled(store)
    common = ""
    for a, b in zip(run_id, other):
        if a != b:
            break
        common += a
    with pytest.raises(UserError, match="several runs"):
        store.get_run(common)
    with pytest.raises(UserError, match="No run"):
        store.get_run("%")  # LIKE wildcards are literal


def test_writes_are_visible_from_a_second_store_and_from_threads(tmp_path):
    path = tmp_path / "runs.sqlite"
    writer, reader = RunStore(path), RunStore(path)
    run_id = writer.create_run("baseline", {}, model="tiny")
    writer.add_row(run_id, "baseline", "0", {"idx": 0})
    assert reader.rows(run_id, "baseline") == [{"idx": 0}]

    def work(i: int) -> None:
        writer.add_row(run_id, "baseline", str(i), {"idx": i})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reader.row_keys(run_id, "baseline") == {str(i) for i in range(9)}
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode.lower() == "wal"


def test_open_uses_detox_tui_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DETOX_TUI_HOME", str(tmp_path / "home"))
    store = RunStore.open()
    assert store.path == tmp_path / "home" / "runs.sqlite" and store.path.exists()
    assert RunStore.open(str(tmp_path / "explicit")).path == tmp_path / "explicit" / "runs.sqlite"


def test_export_every_format(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = _filled(store)
    store.set_status(run_id, "finished", summary={"mean": float("nan")})
    data = json.loads(store.export(run_id[:10], tmp_path / "r.json", "json").read_text())
    assert data["meta"]["run_id"] == run_id and data["meta"]["summary"]["mean"] is None
    assert [r["idx"] for r in data["rows"]] == [0, 1]
    assert data["meta"]["other_tables"]["side_effects"][0]["ppl_before"] == 10.0
    with (tmp_path / "r.csv").open("w"):
        pass
    with store.export(run_id, tmp_path / "r.csv", "csv", columns="all").open(newline="") as fh:
        read = list(csv.DictReader(fh))
    assert "before_mean" in read[0] and len(read) == 2
    md = store.export(run_id, tmp_path / "r.md", "md", columns="all").read_text().strip().splitlines()
    # The table (header, separator, two rows), then every field of the summary (its NaN mean is stored as null).
    assert len(md) == 10 and md[5] == "Summary:" and md[-1] == "| mean |  |"
    # By default: the baseline columns these rows have, under human names; the format from the extension.
    with store.export(run_id, tmp_path / "readers.csv").open(newline="") as fh:
        read = list(csv.DictReader(fh))
    assert list(read[0]) == [
        "prompt",
        "mean toxicity",
        "mean toxicity 95% CI low",
        "mean toxicity 95% CI high",
    ]
    assert [float(r["mean toxicity"]) for r in read] == [0.5, 0.25]
    lines = store.export(run_id, tmp_path / "r.jsonl", "jsonl").read_text().splitlines()
    assert len(lines) == 5
    first = json.loads(lines[0])
    assert (
        first["run_id"] == run_id
        and first["scores"] == {"toxicity": 0.1}
        and first["prompt"] == ITEMS[0].prompt
    )


def test_newer_schema_and_garbage_files_are_user_errors(tmp_path):
    path = tmp_path / "runs.sqlite"
    RunStore(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(UserError, match="schema version 99"):
        RunStore(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all, just some text" * 20)
    with pytest.raises(UserError, match="not a readable SQLite database"):
        RunStore(junk)


def test_a_run_written_by_another_process_can_be_followed(tmp_path):
    path = tmp_path / "runs.sqlite"
    writer, reader = RunStore(path), RunStore(path)  # as a CLI in one terminal and the app in another
    run_id = writer.create_run("baseline", {}, model="tiny")
    state = reader.run_state(run_id)
    assert state == {"status": "running", "updated": state["updated"], "n_rows": 0, "error": None}
    assert reader.list_runs()[0]["n_rows"] == 0

    writer.add_prompts(run_id, ITEMS)
    writer.add_row(run_id, "baseline", "0", {"idx": 0})
    writer.add_row(run_id, "baseline", "1", {"idx": 1})
    writer.add_row(run_id, "baseline", "1", {"idx": 1, "mean": 0.5})  # an upsert adds no row
    writer.add_row(run_id, "side_effects", "x", {"ppl_before": 1.0})
    assert reader.run_state(run_id)["n_rows"] == 3
    assert reader.list_runs()[0]["n_rows"] == 3 and reader.list_runs()[0]["n_prompts"] == 2

    writer.set_status(run_id, "failed", error="out of memory")
    assert reader.run_state(run_id) == {
        "status": "failed",
        "updated": reader.get_run(run_id)["updated"],
        "n_rows": 3,
        "error": "out of memory",
    }
    other = writer.create_run("trace", {}, model="tiny")
    assert reader.run_state(other)["n_rows"] == 0  # counts are per run
    with pytest.raises(UserError, match="no-such-run"):
        reader.run_state("no-such-run")
