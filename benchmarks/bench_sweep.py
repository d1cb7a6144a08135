"""Benchmark: an 8-experiment sweep on the demo model, in this process (``--backend local``) and on a local Ray
instance (``--backend ray``, one actor per ``--cpus-per-worker`` CPUs), on the machine at hand.

Recorded: each way's wall seconds (the driver's, from the first experiment stored to the sweep finished; the demo
model is built beforehand and Ray's start is counted apart), the ratio local / ray, Ray's fixed cost (starting the
instance and its actors, each loading the model), and Ray's per-experiment overhead: for each experiment, the
seconds between the driver handing it to an idle actor and storing its result, minus the seconds the actor spent on
it (dispatch, serialising the arguments and the result, importing the run into the store). Both runs must give the
same result rows (checked). CPU count, torch threads and load averages are recorded with the numbers.

Usage: ``python benchmarks/bench_sweep.py [--cpus-per-worker 1] [--workers N] [--out benchmarks/results/bench_sweep.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GRID = """
models = ["demo"]
prompts = "demo"
scorer = "profanity"
device = "cpu"
dtype = "float32"
methods = ["memit"]
layers = ["1,2", "1", "2", "0,1"]

[generation]
samples = 5
max_new_tokens = 8

[hparams.memit]
mom2_update_weight = 100.0
clamp_norm_factor = [4.0, 2.0]
n_templates = 2
"""


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def run(backend_name: str, grid_path: Path, home: Path, args) -> dict:
    import torch

    from detox_tui.pipeline.store import RunStore
    from detox_tui.pipeline.sweep import LocalBackend, comparable, load_grid, run_sweep

    store = RunStore(home / "runs.sqlite")
    handed: dict[str, float] = {}
    stored: dict[str, float] = {}
    first: list[float] = []

    def emit(event) -> None:
        if event.kind != "state":
            return
        row = event.row
        if row["state"] == "running":
            handed[row["id"]] = time.perf_counter()
            if not first:
                first.append(time.perf_counter())
        elif row["state"] in ("finished", "failed"):
            stored[row["id"]] = time.perf_counter()

    t0 = time.perf_counter()
    if backend_name == "ray":
        from detox_tui.pipeline.sweep_ray import RayBackend

        backend = RayBackend(workers=args.workers, cpus_per_worker=args.cpus_per_worker, data_dir=str(home))
    else:
        backend = LocalBackend(str(home))
    run_id, summary = run_sweep(store, load_grid(grid_path), backend, data_dir=str(home), emit=emit)
    t_end = max(stored.values())
    rows = store.rows(run_id, "sweep")
    overheads = [stored[r["id"]] - handed[r["id"]] - r["elapsed_s"] for r in rows]
    return {
        "backend": backend_name,
        "total_s": time.perf_counter() - t0,
        "experiments_s": t_end - first[0],
        "startup_and_prepare_s": first[0] - t0,
        "experiment_compute_s": [r["elapsed_s"] for r in rows],
        "overhead_per_experiment_s": {
            "median": statistics.median(overheads),
            "mean": statistics.fmean(overheads),
            "max": max(overheads),
        },
        "workers": sorted({r["worker"] for r in rows}),
        "torch_threads_driver": torch.get_num_threads(),
        "summary": summary,
        "rows": [comparable(r) for r in rows],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_sweep.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.cpus_per_worker)  # the local run gets what one actor gets
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        grid_path = Path(tmp) / "grid.toml"
        grid_path.write_text(GRID, encoding="utf-8")
        from detox_tui.demo import ensure_demo

        ensure_demo(str(home))  # built once, outside both timings
        load_before = loadavg()
        local = run("local", grid_path, home, args)
        ray = run("ray", grid_path, home, args)
        load_after = loadavg()
    same = local["rows"] == ray["rows"]
    result = {
        "benchmark": "bench_sweep",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "grid": GRID.strip(),
        "n_experiments": len(local["rows"]),
        "cpus_per_worker": args.cpus_per_worker,
        "identical_rows": same,
        "local": {k: v for k, v in local.items() if k != "rows"},
        "ray": {k: v for k, v in ray.items() if k != "rows"},
        "ratio_local_over_ray_experiments": local["experiments_s"] / ray["experiments_s"],
        "ratio_local_over_ray_total": local["total_s"] / ray["total_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "n_experiments",
                    "identical_rows",
                    "ratio_local_over_ray_experiments",
                    "ratio_local_over_ray_total",
                )
            },
            indent=2,
        )
    )
    print("local", json.dumps({k: v for k, v in result["local"].items() if k != "summary"}))
    print("ray", json.dumps({k: v for k, v in result["ray"].items() if k != "summary"}))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
