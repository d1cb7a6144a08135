"""Benchmark: covariance statistics for layers {1,4,5,6,7,8} in one pass vs one pass per layer (same tokens)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _model import gpt2_medium_shaped  # noqa: E402

from detox_tui.backends.stats import covariance, covariance_per_layer  # noqa: E402
from detox_tui.tiny import neutral_lines  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048, help="token budget (same for both ways)")
    parser.add_argument("--layers", default="1,4,5,6,7,8")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "bench_stats.json")
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    lm = gpt2_medium_shaped()
    # Repeat the builtin neutral text so the corpus covers the budget.
    texts = neutral_lines() * (1 + args.tokens // 500)
    kw = {"texts": texts, "tokens": args.tokens, "batch_size": args.batch_size}
    t0 = time.perf_counter()
    one = covariance(lm, layers, **kw)
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    per = covariance_per_layer(lm, layers, **kw)
    t_per = time.perf_counter() - t0
    max_diff = max(float((one[layer] - per[layer]).abs().max()) for layer in layers)
    result = {
        "benchmark": "covariance statistics, one pass vs one pass per layer",
        "model": "random GPT-2, 24 x 1024, d_mlp 4096",
        "layers": layers,
        "tokens": args.tokens,
        "batch_size": args.batch_size,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "seconds_one_pass": round(t_one, 3),
        "seconds_per_layer": round(t_per, 3),
        "speedup": round(t_per / t_one, 2),
        "max_abs_difference": max_diff,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
