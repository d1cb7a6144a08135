"""Reading the run store is fast: `runs`, `export`, `--help` and `--version` import neither torch, nor
transformers, nor scipy (checked with `python -X importtime`), and `runs list` on 50 runs takes under a
second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from detox_tui.pipeline.store import RunStore
from detox_tui.prompts.base import PromptItem

HEAVY = ("torch", "transformers", "scipy")
N_RUNS = 50


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """A run store of 50 runs, built without a model: finished, failed, cancelled and running baselines;
    the newest ones (the one shown and exported among them) with result rows and generations."""
    from detox_tui.pipeline.results import baseline_row

    data = tmp_path_factory.mktemp("store-50")
    store = RunStore.open(str(data))
    items = [
        PromptItem("People from that town are all", category="insult"),
        PromptItem("My coworker is such a"),
    ]
    config = {
        "model": {"name": "tiny"},
        "generation": {"samples": 3, "seed": 0},
        "scoring": {"threshold": 0.1},
    }
    for i in range(N_RUNS):
        run_id = store.create_run("baseline", config, model="tiny")
        newest = N_RUNS - 1 - i  # 0 for the newest run
        means = [0.5]
        if newest < 4:
            store.add_prompts(run_id, items)
            means = []
            for idx, item in enumerate(items):
                samples = [f" sample {j}" for j in range(3)]
                scores = {"toxicity": np.array([(i % 7) / 10, 0.5, 0.9])}
                store.add_generations(
                    run_id, "baseline", "", idx, samples, {"toxicity": scores["toxicity"].tolist()}, [0, 1, 2]
                )
                gens = SimpleNamespace(prompt=item.prompt, samples=samples, greedy=None)
                row = baseline_row(idx, item, gens, scores, "toxicity", 0.1)  # type: ignore[arg-type]
                store.add_row(run_id, "baseline", str(idx), row.to_dict())
                means.append(row.mean)
        status = ("finished", "failed", "cancelled", "running")[newest % 4]
        summary = {"n_prompts": 2, "mean": float(np.mean(means)), "ci_low": 0.1, "ci_high": 0.9}
        store.set_status(run_id, status, summary=summary if status == "finished" else None)
    return data


@pytest.fixture(scope="module")
def run_id(store_dir: Path) -> str:
    newest = RunStore.open(str(store_dir)).list_runs()[0]
    assert newest["status"] == "finished" and newest["n_prompts"] == 2
    return newest["id"]


def _env(store_dir: Path) -> dict[str, str]:
    env = {**os.environ, "DETOX_TUI_HOME": str(store_dir), "COLUMNS": "200"}
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def _heavy_imports(log: str) -> list[str]:
    """Each heavy top-level package imported, with the chain of modules that imported it."""
    entries = []  # (depth, module) in the order -X importtime prints them: children before their parent
    for line in log.splitlines():
        if not line.startswith("import time:") or line.rstrip().endswith("| imported package"):
            continue
        name_field = line.split("|")[-1]
        module = name_field.strip()
        depth = (len(name_field) - len(name_field.lstrip())) // 2
        entries.append((depth, module))
    found = []
    for i, (depth, module) in enumerate(entries):
        if module.split(".")[0] in HEAVY and module in HEAVY:
            chain, level = [module], depth
            for d, parent in entries[i + 1 :]:
                if d < level:
                    chain.append(parent)
                    level = d
            found.append(" <- ".join(chain))
    return found


READS = [
    ["runs", "list"],
    ["runs", "list", "--json"],
    ["runs", "show", "RUN"],
    ["runs", "show", "RUN", "--json"],
    ["runs", "export", "RUN", "--out", "OUT/table.csv"],
    ["export", "RUN", "--out", "OUT/table.md"],
    ["export", "RUN", "--out", "OUT/generations.jsonl"],
    ["--help"],
    ["baseline", "--help"],
    ["edit", "--help"],
    ["--version"],
]


@pytest.mark.parametrize("args", READS, ids=[" ".join(a) for a in READS])
def test_reads_import_no_model_library(store_dir, run_id, tmp_path, args):
    args = [a.replace("RUN", run_id).replace("OUT", str(tmp_path)) for a in args]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "detox_tui", *args],
        capture_output=True,
        text=True,
        env=_env(store_dir),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "import time:" in proc.stderr  # the log is there to check
    heavy = _heavy_imports(proc.stderr)
    assert heavy == [], f"`detox-tui {' '.join(args)}` imports a model library: {heavy}"


def test_the_import_check_sees_a_heavy_import(store_dir):
    """The check itself: a command that does import scipy is caught, with who imported it."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import detox_tui.pipeline.metrics"],
        capture_output=True,
        text=True,
        env=_env(store_dir),
        timeout=120,
    )
    heavy = _heavy_imports(proc.stderr)
    assert any(h.startswith("scipy <- ") and "detox_tui.pipeline.metrics" in h for h in heavy), heavy


TIMED = """
import sys, time
start = time.perf_counter()
from detox_tui.cli import main
rc = main(sys.argv[1:])
sys.stderr.write(f"ELAPSED {time.perf_counter() - start:.4f}\\n")
raise SystemExit(rc)
"""


@pytest.mark.parametrize(
    "args", [["runs", "list", "--limit", "100"], ["runs", "list", "--json", "--limit", "100"]]
)
def test_runs_list_of_50_runs_answers_in_under_a_second(store_dir, args):
    """Measured inside the subprocess: importing the CLI, reading the store and printing the table (the
    interpreter's own start-up, ~30 ms, is not counted). The best of three runs counts: on a shared
    machine another process can steal the CPU from any single run."""
    ids = [r["id"] for r in RunStore.open(str(store_dir)).list_runs(limit=100)]
    assert len(ids) == N_RUNS
    times = []
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, "-c", TIMED, *args],
            capture_output=True,
            text=True,
            env=_env(store_dir),
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        if "--json" in args:
            assert [r["id"] for r in json.loads(proc.stdout)["runs"]] == ids
        else:
            assert all(i in proc.stdout for i in ids)
        times.append(float(proc.stderr.split("ELAPSED")[-1]))
        if times[-1] < 1.0:
            break
    assert min(times) < 1.0, f"`detox-tui {' '.join(args)}` took {', '.join(f'{t:.2f}' for t in times)} s"
