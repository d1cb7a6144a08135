"""Benchmark: covariance statistics for layers {1,4,5,6,7,8}: one pass vs one pass per layer (same tokens)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _model import gpt2_medium_shaped  # noqa: E402

from detox_tui.backends.stats import covariance, covariance_per_layer  # noqa: E402
from detox_tui.tiny import neutral_lines  # noqa: E402


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where /proc/loadavg does not exist)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096, help="token budget (same for every way)")
    parser.add_argument("--layers", default="1,4,5,6,7,8")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: leave as is)")
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "bench_stats.json")
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = sorted(int(x) for x in args.layers.split(","))
    lm = gpt2_medium_shaped()
    n_layers = lm.n_layers
    # Repeat the builtin neutral text so the corpus covers the budget.
    texts = neutral_lines() * (1 + args.tokens // 500)
    kw = {"texts": texts, "tokens": args.tokens, "batch_size": args.batch_size}
    covariance(lm, layers, texts=texts, tokens=64, batch_size=args.batch_size)  # warm-up, untimed
    load_before = loadavg()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    one = covariance(lm, layers, **kw)
    timings["one_pass"] = time.perf_counter() - t0
    print(f"one pass: {timings['one_pass']:.1f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    per = covariance_per_layer(lm, layers, **kw)
    timings["per_layer_early_stop"] = time.perf_counter() - t0
    print(f"per layer, early stop: {timings['per_layer_early_stop']:.1f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    full = covariance_per_layer(lm, layers, **kw, early_stop=False)
    timings["per_layer_full_forward"] = time.perf_counter() - t0
    print(f"per layer, full forward: {timings['per_layer_full_forward']:.1f} s", file=sys.stderr, flush=True)
    load_after = loadavg()
    max_diff = max(
        max(float((one[layer] - other[layer]).abs().max()) for layer in layers) for other in (per, full)
    )
    deepest = max(layers)
    result = {
        "benchmark": "covariance statistics: one pass for all layers vs one pass per layer",
        "model": f"random GPT-2, {n_layers} x {lm.d_model}, d_mlp {lm.d_mlp}",
        "layers": layers,
        "tokens": args.tokens,
        "batch_size": args.batch_size,
        "precision": "float32 forward and per-batch k^T k, float64 streaming sum",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "blocks_run_per_token": {
            "one_pass": deepest + 1,
            "per_layer_early_stop": sum(layer + 1 for layer in layers),
            "per_layer_full_forward": n_layers * len(layers),
        },
        "seconds_one_pass": round(timings["one_pass"], 3),
        "seconds_per_layer_early_stop": round(timings["per_layer_early_stop"], 3),
        "seconds_per_layer_full_forward": round(timings["per_layer_full_forward"], 3),
        "speedup_vs_per_layer_early_stop": round(timings["per_layer_early_stop"] / timings["one_pass"], 2),
        "speedup_vs_per_layer_full_forward": round(
            timings["per_layer_full_forward"] / timings["one_pass"], 2
        ),
        "max_abs_difference": max_diff,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
