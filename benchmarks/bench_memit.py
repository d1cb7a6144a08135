"""Benchmark: MEMIT for 1, 10 and 50 requests, batched vs serial z optimisation."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _model import gpt2_medium_shaped  # noqa: E402

import detox_tui.backends.editing.memit as memit_module  # noqa: E402
from detox_tui.backends.editing.base import EditContext, EditRequest  # noqa: E402
from detox_tui.backends.editing.common import context_templates  # noqa: E402
from detox_tui.backends.editing.memit import MemitEditor  # noqa: E402
from detox_tui.backends.stats import covariance  # noqa: E402
from detox_tui.tiny import INSULT_PAIRS, neutral_lines  # noqa: E402


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where /proc/loadavg does not exist)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


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


class _ZTimer:
    """Wraps MEMIT's compute_targets to time the z optimisation alone (the rest of the edit is shared)."""

    def __init__(self) -> None:
        self.inner = memit_module.compute_targets
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", default="1,10,50")
    parser.add_argument("--steps", type=int, default=5, help="v_num_grad_steps")
    parser.add_argument("--templates", type=int, default=2, help="sampled context templates")
    parser.add_argument("--tokens", type=int, default=1024, help="covariance token budget (computed once)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: leave as is)")
    parser.add_argument(
        "--serial-budget",
        type=float,
        default=900.0,
        help="skip a serial run whose predicted time (from the previous serial run) exceeds this many seconds",
    )
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
    templates = context_templates(lm, n=args.templates)  # sampled once, cached on the model: untimed
    # No early stop on a random model's losses: every request runs the full number of steps.
    hp = {"layers": layers, "v_num_grad_steps": args.steps, "n_templates": args.templates}
    timer = _ZTimer()
    memit_module.compute_targets = timer
    rows = []
    prev_serial: tuple[int, float, float] | None = None  # (requests, whole edit s, z s)
    for n in [int(x) for x in args.requests.split(",")]:
        reqs = requests_for(n)
        row: dict[str, Any] = {"requests": n, "loadavg_before": loadavg()}
        for mode, batch_z in (("batched", True), ("serial", False)):
            if mode == "serial" and prev_serial is not None:
                pn, pt, pz = prev_serial
                predicted = (pt - pz) + pz * n / pn
                if predicted > args.serial_budget:
                    row["serial_skipped"] = (
                        f"predicted {predicted:.0f} s (from {pn} serial requests) > budget {args.serial_budget:.0f} s"
                    )
                    row["seconds_serial_predicted"] = round(predicted, 1)
                    continue
            timer.seconds = 0.0
            t0 = time.perf_counter()
            delta = MemitEditor().compute(lm, reqs, {**hp, "batch_z": batch_z}, ctx)
            row[f"seconds_{mode}"] = round(time.perf_counter() - t0, 3)
            row[f"seconds_z_{mode}"] = round(timer.seconds, 3)
            row[f"z_steps_{mode}"] = sum(delta.info["z_steps"])
            if mode == "serial":
                prev_serial = (n, row["seconds_serial"], row["seconds_z_serial"])
        if "seconds_serial" in row:
            row["speedup_whole_edit"] = round(row["seconds_serial"] / row["seconds_batched"], 2)
            row["speedup_z"] = round(row["seconds_z_serial"] / row["seconds_z_batched"], 2)
        row["loadavg_after"] = loadavg()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result = {
        "benchmark": "MEMIT, batched vs serial z optimisation (whole edit and z optimisation alone)",
        "model": f"random GPT-2, {lm.n_layers} x {lm.d_model}, d_mlp {lm.d_mlp}",
        "layers": layers,
        "v_num_grad_steps": args.steps,
        "templates": len(templates),
        "covariance_tokens": args.tokens,
        "notes": "covariance computed once and templates sampled once beforehand (untimed); a random "
        "model never reaches the z early-stop loss, so every request runs all steps",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
