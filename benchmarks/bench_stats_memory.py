"""Benchmark: covariance statistics memory (estimated vs measured peak) and time on a Llama-shaped random model.

For each token budget: one pass for all layers without a cap, then the same under a memory cap that holds
about half the layers at a time (streamed: several passes over the corpus). Records the plan's estimate,
the measured peak (CPU: peak resident set above the resident set before the call, via /proc/self/clear_refs
and VmHWM; CUDA: torch.cuda.max_memory_allocated above the allocation before), the seconds, the number
of forward passes and the largest difference between the streamed and the one-pass statistics.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from detox_tui.backends.models import MODEL_SPECS, LoadedModel
from detox_tui.backends.stats import covariance, format_bytes, stats_memory_plan
from detox_tui.tiny import INSULT_PAIRS, build_tokenizer, neutral_lines


def llama_shaped(n_layers: int, hidden: int, intermediate: int, device: str, seed: int = 0) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer(neutral_lines() + [p + t + s for p, t, s in INSULT_PAIRS])
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    spec = next(s for s in MODEL_SPECS if s.family == "llama")
    return LoadedModel(
        model=model, tokenizer=tokenizer, spec=spec, name="random-llama-shape", device=torch.device(device)
    )


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a block above what was in use when it started (CUDA allocator, or CPU resident set)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated above the allocation before"
            return self
        try:  # hand freed heap back to the OS so the resident set before the call is what is live
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self._start = _status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.method = "peak resident set (VmHWM, reset via /proc/self/clear_refs) above VmRSS before"
        except OSError:
            self._start = None
            self.method = "unavailable on this platform"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None:
            hwm = _status_kb("VmHWM")
            self.peak = None if hwm is None else hwm - self._start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", default="4096,16384", help="token budgets, comma-separated")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the model's device)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "stats_memory.json")
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = llama_shaped(args.layers, args.hidden, args.intermediate, args.device)
    layers = list(range(lm.n_layers))
    budgets = [int(x) for x in args.tokens.split(",")]
    texts = neutral_lines() * (1 + max(budgets) // 300)
    covariance(lm, layers, texts=texts, tokens=64, batch_size=args.batch_size)  # warm-up, untimed
    forwards = {"n": 0}
    lm.model.register_forward_pre_hook(lambda *_: forwards.__setitem__("n", forwards["n"] + 1))
    load_before = loadavg()
    runs = []
    peak_method = ""
    for tokens in budgets:
        free = stats_memory_plan(lm, layers, tokens=tokens, batch_size=args.batch_size, memory_budget=10**15)
        # A cap that holds about half the layers in one pass (on the CPU, finished results count too).
        cap = free.pass_bytes((len(layers) + 1) // 2, held_layers=len(layers) // 2)
        ways = {}
        results = {}
        for way, budget in (("one_pass", None), ("streamed", cap)):
            plan = stats_memory_plan(
                lm, layers, tokens=tokens, batch_size=args.batch_size, memory_budget=budget or 10**15
            )
            forwards["n"] = 0
            with PeakMemory(lm.device) as peak:
                t0 = time.perf_counter()
                results[way] = covariance(
                    lm, layers, texts=texts, tokens=tokens, batch_size=args.batch_size, memory_budget=budget
                )
                seconds = time.perf_counter() - t0
            peak_method = peak.method
            ways[way] = {
                "memory_budget_bytes": budget,
                "passes": plan.passes,
                "groups": [list(g) for g in plan.groups],
                "forward_calls": forwards["n"],
                "estimated_peak_bytes": max(
                    plan.pass_bytes(len(g), sum(len(h) for h in plan.groups[:i]))
                    for i, g in enumerate(plan.groups)
                ),
                "measured_peak_bytes": peak.peak,
                "seconds": round(seconds, 3),
            }
            print(
                f"{tokens} tokens, {way}: {plan.passes} pass(es), estimated "
                f"{format_bytes(ways[way]['estimated_peak_bytes'])}, measured "
                f"{format_bytes(peak.peak or 0)}, {seconds:.2f} s",
                file=sys.stderr,
                flush=True,
            )
        diff = max(float((results["one_pass"][k] - results["streamed"][k]).abs().max()) for k in layers)
        runs.append(
            {
                "tokens": tokens,
                "estimate": free.to_dict() | {"budget_bytes": None, "budget_source": "no limit"},
                **ways,
                "max_abs_difference_streamed_vs_one_pass": diff,
            }
        )
    result = {
        "benchmark": "covariance statistics memory: estimated vs measured peak, one pass vs streamed under a cap",
        "model": (
            f"random Llama ({lm.n_layers} x {lm.d_model}, d_mlp {lm.d_mlp}, "
            f"{sum(p.numel() for p in lm.model.parameters())} parameters, {lm.dtype})"
        ),
        "layers": layers,
        "batch_size": args.batch_size,
        "device": str(lm.device),
        "peak_method": peak_method,
        "precision": "float32 chunk products of k^T k, float64 running sum per layer",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
