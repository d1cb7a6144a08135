"""Covariance memory plan: the estimate's numbers, streaming under a cap, the refusal, --stats-device."""

from __future__ import annotations

import json
import re

import pytest
import torch

from detox_tui.backends import stats
from detox_tui.backends.stats import (
    STATS_MEMORY_ENV,
    covariance,
    format_bytes,
    model_bytes,
    plan_stats_memory,
    stats_memory_plan,
)
from detox_tui.cli import main
from detox_tui.errors import UserError
from detox_tui.events import Log, Progress
from detox_tui.tiny import INSULT_PAIRS, neutral_lines

LAYERS = [0, 1, 2, 3]
TOKENS = 400


class ForwardCounter:
    """Counts forward calls of the whole model (one per batch per pass over the corpus)."""

    def __init__(self, lm):
        self.calls = 0
        self._handle = lm.model.register_forward_pre_hook(self._hook)

    def _hook(self, *_args):
        self.calls += 1

    def close(self):
        self._handle.remove()


def test_estimate_for_llama3_8b_shape():
    d = 14336
    llama3_8b_params = 8_030_261_248
    plan = plan_stats_memory(
        d, [4, 5, 6, 7, 8], batch_tokens=8 * 256, model_bytes=llama3_8b_params * 2, device="cuda:0"
    )
    assert plan.float32_bytes == d * d * 4 == 822_083_584
    assert plan.float64_bytes == d * d * 8
    assert (format_bytes(plan.float32_bytes), format_bytes(plan.float64_bytes)) == ("0.8 GB", "1.6 GB")
    # Per layer: the float64 sum and fewer than 2048 + one batch (8 x 256) tokens of float32 keys.
    assert plan.chunk_bytes == (2047 + 8 * 256) * d * 4
    assert plan.per_layer_bytes == d * d * 8 + plan.chunk_bytes
    # Shared by the pass: one float32 product and one concatenated chunk.
    assert plan.one_pass_bytes == d * d * 4 + plan.chunk_bytes + 5 * plan.per_layer_bytes
    assert plan.total_bytes == plan.one_pass_bytes + 16_060_522_496
    assert format_bytes(plan.total_bytes) == "26.5 GB"
    assert plan.groups == ((4, 5, 6, 7, 8),)  # no budget: one pass
    # On a GPU with 5 GB to spare (one pass: 1.1 GB shared + 1.9 GB per layer) five layers take three passes.
    capped = plan_stats_memory(
        d, [4, 5, 6, 7, 8], batch_tokens=8 * 256, budget_bytes=5 * 10**9, device="cuda:0"
    )
    assert capped.groups == ((4, 5), (6, 7), (8,))
    assert all(capped.pass_bytes(len(g)) <= 5 * 10**9 for g in capped.groups)


def test_model_bytes_count_the_element_size(tiny_lm):
    n_params = sum(p.numel() for p in tiny_lm.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in tiny_lm.model.buffers())
    assert model_bytes(tiny_lm.model) == 4 * n_params + buffers
    tiny_lm.model.to(torch.bfloat16)
    buffers = sum(b.numel() * b.element_size() for b in tiny_lm.model.buffers())
    assert model_bytes(tiny_lm.model) == 2 * n_params + buffers


def _cap_for_several_passes(lm) -> int:
    """A budget that holds one layer's pass (after the others' results) but not all four layers at once."""
    free = stats_memory_plan(lm, LAYERS, tokens=TOKENS, batch_size=4, memory_budget=10**12)
    cap = free.pass_bytes(1, held_layers=len(LAYERS) - 1)
    assert cap < free.one_pass_bytes
    return cap


def test_streaming_under_a_cap_equals_one_pass_and_makes_several_passes(tiny_lm):
    texts = neutral_lines()
    counter = ForwardCounter(tiny_lm)
    try:
        one = covariance(tiny_lm, LAYERS, texts=texts, tokens=TOKENS, batch_size=4, memory_budget=10**12)
        batches = counter.calls
        counter.calls = 0
        events = []
        cap = _cap_for_several_passes(tiny_lm)
        streamed = covariance(
            tiny_lm, LAYERS, texts=texts, tokens=TOKENS, batch_size=4, memory_budget=cap, emit=events.append
        )
        streamed_calls = counter.calls
    finally:
        counter.close()
    for layer in LAYERS:
        assert torch.equal(one[layer], streamed[layer]), layer
    plan = stats_memory_plan(tiny_lm, LAYERS, tokens=TOKENS, batch_size=4, memory_budget=cap)
    assert plan.passes > 1
    assert streamed_calls == plan.passes * batches  # one whole pass over the corpus per group
    starts = [e for e in events if isinstance(e, Progress) and e.stage == "covariance" and e.done == 0]
    assert [e.message for e in starts] == [f"pass {i + 1} of {plan.passes}" for i in range(plan.passes)]
    assert any(isinstance(e, Log) and f"{plan.passes} passes" in e.message for e in events)


def test_env_var_imposes_the_cap(tiny_lm, monkeypatch):
    cap = _cap_for_several_passes(tiny_lm)
    monkeypatch.setenv(STATS_MEMORY_ENV, str(cap))
    plan = stats_memory_plan(tiny_lm, LAYERS, tokens=TOKENS, batch_size=4)
    assert plan.budget_bytes == cap and plan.budget_source == STATS_MEMORY_ENV and plan.passes > 1
    monkeypatch.setenv(STATS_MEMORY_ENV, "lots")
    with pytest.raises(UserError, match=r"^The statistics memory budget 'lots' is not a positive size"):
        stats_memory_plan(tiny_lm, LAYERS)


def test_refuses_before_any_forward_when_not_even_one_layer_fits(tiny_lm):
    counter = ForwardCounter(tiny_lm)
    try:
        with pytest.raises(UserError) as info:
            covariance(tiny_lm, LAYERS, texts=neutral_lines(), tokens=TOKENS, memory_budget="50K")
    finally:
        counter.close()
    assert counter.calls == 0
    msg = str(info.value)
    plan = stats_memory_plan(tiny_lm, LAYERS, tokens=TOKENS, memory_budget=10**12)
    need = format_bytes(plan.pass_bytes(1))
    assert re.fullmatch(
        rf"The covariance statistics need {re.escape(need)} on cpu for one layer \(d_mlp {tiny_lm.d_mlp}: .*\) "
        r"but only 50\.0 KB is available \(memory_budget\); free some memory or use fewer layers\.",
        msg,
    ), msg
    assert msg.count(". ") == 0  # one sentence


def test_unknown_stats_device_is_refused(tiny_lm):
    with pytest.raises(UserError, match=r"^Unknown statistics device 'tpu'; use auto or cpu\.$"):
        covariance(tiny_lm, [0], texts=neutral_lines(), stats_device="tpu")


def test_cli_stats_device_cpu_reaches_the_engine(capsys, tiny_model_dir, monkeypatch):
    seen: list[str] = []
    real = stats.stats_memory_plan

    def spy(lm, layers, **kw):
        seen.append(kw.get("stats_device"))
        return real(lm, layers, **kw)

    monkeypatch.setattr(stats, "stats_memory_plan", spy)
    args = ["stats", "--layers", "0,1,2,3", "--stats-tokens", str(TOKENS), "--model", str(tiny_model_dir)]
    rc = main([*args, "--stats-device", "cpu", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    info = json.loads(out)
    assert info["stats_device"] == "cpu" and info["memory"]["device"] == "cpu"
    assert seen and set(seen) == {"cpu"}  # the summary's estimate and covariance() itself
    assert info["memory"]["d_mlp"] == 256 and info["memory"]["float64_matrix_bytes"] == 256 * 256 * 8
    rc = main([*args, "--stats-device", "tpu"])
    _, err = capsys.readouterr()
    assert rc == 2 and "Unknown --stats-device 'tpu'; use auto or cpu." in err


def test_cli_edit_stats_device_reaches_the_covariance(capsys, insult_model_dir, tmp_path, monkeypatch):
    seen: list[str] = []
    real = stats.stats_memory_plan

    def spy(lm, layers, **kw):
        seen.append(kw.get("stats_device"))
        return real(lm, layers, **kw)

    monkeypatch.setattr(stats, "stats_memory_plan", spy)
    monkeypatch.setenv(STATS_MEMORY_ENV, "50K")  # refused at the covariance: no edit is computed
    prompts = tmp_path / "prompts.csv"
    prompt, _, safe = INSULT_PAIRS[0]
    prompts.write_text(f"prompt,target,category\n{prompt},{' ' + safe.split()[0]},insult\n")
    rc = main(
        [
            *("edit", "--method", "memit", "--layers", "1,2", "--stats-device", "cpu"),
            *("--model", str(insult_model_dir), "--prompts", str(prompts), "--scorer", "profanity"),
            *("--samples", "1", "--max-new-tokens", "2", "--device", "cpu"),
        ]
    )
    _, err = capsys.readouterr()
    assert rc == 2
    assert "The covariance statistics need" in err and "on cpu" in err
    assert seen == ["cpu"]
