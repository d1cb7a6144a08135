"""Benchmark: building the `detox-tui demo` model from nothing (target: <= 60 s on two CPU cores).

Each build runs in a fresh Python process into an empty data dir, as a user's first `detox-tui demo` does, so the
time includes importing torch and transformers and training the tokenizer. Recorded per build: the process's
wall seconds, the build alone (``ensure_demo``), torch threads, load averages before and after, the CPU count.
For comparison (``--compare``, on by default): the same build with two torch threads, and the test suite's
model (``train_insult_model(steps=300)``, the tests' fixture) with one.

Usage: ``python benchmarks/bench_demo.py [--repeats 3] [--no-compare] [--out benchmarks/results/bench_demo.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in the child process: import, build into an empty data dir, report the timings as one JSON line.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from detox_tui import demo
t1 = time.perf_counter()
kind, threads, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with demo.torch_threads(threads):
    if kind == "demo":
        built = demo.ensure_demo(folder, threads=None)
        assert built.built
        steps = demo.BUILD["steps"]
    else:
        from detox_tui.tiny import train_insult_model
        train_insult_model(folder, steps=300)
        steps = 300
    n = torch.get_num_threads()
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "build_s": t2 - t1, "in_process_s": t2 - t0, "threads": n, "steps": steps}))
"""


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where /proc/loadavg does not exist)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def one_build(kind: str, threads: int) -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        load_before = loadavg()
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, kind, str(threads), tmp],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"the {kind} build failed:\n{proc.stderr[-2000:]}")
        record = json.loads(proc.stdout.strip().splitlines()[-1])
    record.update(
        {
            "kind": kind,
            "wall_s": round(wall, 2),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        }
    )
    for key in ("import_s", "build_s", "in_process_s"):
        record[key] = round(record[key], 2)
    label = "demo model" if kind == "demo" else "test-suite model (300 steps)"
    print(
        f"{label}, {threads} thread(s): {wall:.1f} s wall ({record['build_s']:.1f} s building, "
        f"load {load_before[:1]})",
        file=sys.stderr,
        flush=True,
    )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="demo builds with one thread")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_demo.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from detox_tui import demo

    runs = [one_build("demo", 1) for _ in range(args.repeats)]
    compare = []
    if args.compare:
        compare = [one_build("demo", 2), one_build("tests", 1)]
    walls = sorted(r["wall_s"] for r in runs)
    result = {
        "benchmark": "demo model build from an empty data dir, fresh process (imports included)",
        "target_s": 60,
        "build_settings": demo.BUILD,
        "demo_one_thread": {
            "median_wall_s": walls[len(walls) // 2],
            "max_wall_s": walls[-1],
            "runs": runs,
        },
        "comparison": compare,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "transformers": __import__("transformers").__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
