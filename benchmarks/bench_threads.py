"""Benchmark: a two-prompt MEMIT edit on the tiny insult model through the CLI, with --threads 1 vs torch's
default thread count (which is the number of cores). Same seed both ways; the results must be identical."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from detox_tui.tiny import INSULT_PAIRS, train_insult_model


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where /proc/loadavg does not exist)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def edit_command(model: Path, prompts: Path, threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "detox_tui", "edit", "--method", "memit", "--layers", "1,2", "--batch"]
    cmd += ["-H", "mom2_update_weight=100", "-H", "clamp_norm_factor=4", "-H", "n_templates=2"]
    cmd += ["--model", str(model), "--prompts", str(prompts), "--scorer", "profanity"]
    cmd += ["--samples", "5", "--max-new-tokens", "5", "--device", "cpu", "--json"]
    return cmd + (["--threads", str(threads)] if threads else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, interleaved")
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "bench_threads.json")
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    model = train_insult_model(work / "insult-gpt2", steps=300)  # untimed
    prompts = work / "prompts.csv"
    prompts.write_text(
        "prompt,target,category\n"
        + "".join(f"{p},{' ' + safe.split()[0]},insult\n" for p, _, safe in INSULT_PAIRS[:2])
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DETOX_TUI_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    }
    env.update({"DETOX_TUI_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"})
    settings = {"1": 1, "default": None}
    seconds: dict[str, list[float]] = {k: [] for k in settings}
    results: dict[str, list] = {}
    load_before = loadavg()
    for _ in range(args.repeats):
        for name, threads in settings.items():
            start = time.perf_counter()
            proc = subprocess.run(
                edit_command(model, prompts, threads), capture_output=True, text=True, env=env
            )
            seconds[name].append(round(time.perf_counter() - start, 2))
            if proc.returncode != 0:
                raise SystemExit(f"the edit failed with --threads {threads}: {proc.stderr[-2000:]}")
            data = json.loads(proc.stdout)
            results.setdefault(name, [(r["before"]["mean"], r["after"]["mean"]) for r in data["rows"]])
    report = {
        "benchmark": "two-prompt MEMIT edit (layers 1,2, batch, 5 samples x 5 tokens) on the tiny insult model, "
        "wall time of `python -m detox_tui edit ...` (process start, imports, model and scorer load included)",
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_default_threads": torch.get_num_threads(),
        },
        "seconds": seconds,
        "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
        "identical_results": results["1"] == results["default"],
        "rows_before_after_mean": results["1"],
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
