"""Benchmark: MEMIT for 1, 10 and 50 requests, batched vs serial z optimisation."""

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

from detox_tui.backends.editing.base import EditContext, EditRequest  # noqa: E402
from detox_tui.backends.editing.common import context_templates  # noqa: E402
from detox_tui.backends.editing.memit import MemitEditor  # noqa: E402
from detox_tui.backends.stats import covariance  # noqa: E402
from detox_tui.tiny import INSULT_PAIRS, neutral_lines  # noqa: E402


def requests_for(n: int) -> list[EditRequest]:
    base = [(p, s) for p, _, s in INSULT_PAIRS]
    lines = neutral_lines()
    out = []
    for i in range(n):
        prompt, target = base[i % len(base)]
        if i >= len(base):  # distinct prompts beyond the six pairs
            prompt = " ".join(lines[i % len(lines)].split()[:6])
        out.append(EditRequest(prompt, target))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", default="1,10,50")
    parser.add_argument("--steps", type=int, default=20, help="v_num_grad_steps")
    parser.add_argument("--templates", type=int, default=5, help="sampled context templates")
    parser.add_argument("--tokens", type=int, default=1024, help="covariance token budget (computed once)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "bench_memit.json")
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = gpt2_medium_shaped()
    layers = [4, 5, 6, 7, 8]
    texts = neutral_lines() * (1 + args.tokens // 500)
    covs = covariance(lm, layers, texts=texts, tokens=args.tokens)
    ctx = EditContext(covariance=lambda _lm, ls: {layer: covs[layer] for layer in ls})
    context_templates(lm, n=args.templates)  # sampled once, cached on the model: not part of the timing
    # No early stop on a random model's losses: every run does the full number of steps.
    hp = {"layers": layers, "v_num_grad_steps": args.steps, "n_templates": args.templates}
    rows = []
    for n in [int(x) for x in args.requests.split(",")]:
        reqs = requests_for(n)
        timing = {}
        for mode, batch_z in (("batched", True), ("serial", False)):
            t0 = time.perf_counter()
            delta = MemitEditor().compute(lm, reqs, {**hp, "batch_z": batch_z}, ctx)
            timing[mode] = time.perf_counter() - t0
            timing[f"{mode}_z_steps"] = sum(delta.info["z_steps"])
        row = {
            "requests": n,
            "seconds_batched": round(timing["batched"], 3),
            "seconds_serial": round(timing["serial"], 3),
            "speedup": round(timing["serial"] / timing["batched"], 2),
            "z_steps_batched": timing["batched_z_steps"],
            "z_steps_serial": timing["serial_z_steps"],
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result = {
        "benchmark": "MEMIT, batched vs serial z optimisation (whole edit timed)",
        "model": "random GPT-2, 24 x 1024, d_mlp 4096",
        "layers": layers,
        "v_num_grad_steps": args.steps,
        "templates": args.templates,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
